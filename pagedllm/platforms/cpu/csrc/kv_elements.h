/* K/V elements as floats, for the attention kernels (decode_attention.c,
 * prefill_attention.c): the cache holds float32, float16 or bfloat16 (kv_format),
 * read 8 at a time into float vectors (GCC/Clang vector extensions). */
#ifndef PAGEDLLM_KV_ELEMENTS_H
#define PAGEDLLM_KV_ELEMENTS_H

#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* AVX512-BF16's vdpbf16ps: the attention kernels' loops for a bfloat16 model over a
 * bfloat16 cache multiply bfloat16 pairs instead of widening them. */
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
#define HAVE_BF16_DOTS 1
#else
#define HAVE_BF16_DOTS 0
#endif

typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p) {
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, vec8 v) { memcpy(p, &v, sizeof v); }

/* How K/V elements are stored (the kv_format argument; the Python caller uses the same numbers). */
enum { KV_FLOAT32 = 0, KV_FLOAT16 = 1, KV_BFLOAT16 = 2 };

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

static inline int64_t kv_element_bytes(int format) { return format == KV_FLOAT32 ? 4 : 2; }

/* The address of element `index` of a K/V array in `format`. */
static inline const void *kv_at(const void *base, int64_t index, int format) {
    return (const char *)base + index * kv_element_bytes(format);
}

static inline vec8 bits_as_float(u32x8 bits) {
    vec8 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* IEEE half -> float without F16C: realign exponent and mantissa, rebias the
 * exponent by multiplying by 2^112 (exact, subnormal halves included unless the
 * thread treats denormals as zero), then restore the sign and the all-ones
 * exponent of inf/NaN. */
static inline vec8 half8_to_float_portable(u16x8 half) {
    const u32x8 h = __builtin_convertvector(half, u32x8);
    const u32x8 magnitude = (h & 0x7fff) << 13;
    u32x8 bits;
    const vec8 scaled = bits_as_float(magnitude) * 0x1p112f;
    memcpy(&bits, &scaled, sizeof bits);
    const u32x8 special = (u32x8)(magnitude >= (0x7c00u << 13)) & 0x7f800000u;
    return bits_as_float(bits | special | (h & 0x8000) << 16);
}

/* Eight K/V elements at p, in `format`, as floats. */
static inline __attribute__((always_inline)) vec8 load_kv8(const void *p, int format) {
    if (format == KV_FLOAT32) return load8(p);
    u16x8 raw;
    memcpy(&raw, p, sizeof raw);
    /* GCC lowers the vector-extension widening to two 4-wide halves and an insert: the
     * intrinsic is one instruction (one layer of bfloat16 decode attention: 1.15x) */
#if defined(__AVX2__)
    if (format == KV_BFLOAT16) return (vec8)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)raw), 16);
#else
    if (format == KV_BFLOAT16) return bits_as_float(__builtin_convertvector(raw, u32x8) << 16);
#endif
#if defined(__F16C__)
    return (vec8)_mm256_cvtph_ps((__m128i)raw);
#else
    return half8_to_float_portable(raw);
#endif
}

#endif
