/* Linear layers and embeddings whose weights stay in llama.cpp's quantized blocks
 * (GGUF), so the model takes the file's bytes, not float32's (SmolLM2-135M Q4_1:
 * ~0.56 bytes a weight instead of 4), and a decode step streams that much less.
 *
 * A weight row of `in` values is in / 32 blocks, each a float16 scale d (and for
 * the _1 types a float16 offset m) followed by 32 small integers q; value = q * d
 * (+ m). Layouts (ggml-common.h), block bytes in brackets:
 *   Q4_0 [18]: d, 16 bytes of nibbles; q = nibble - 8
 *   Q4_1 [20]: d, m, 16 bytes of nibbles
 *   Q5_0 [22]: d, 32 high bits (uint32), 16 bytes of low nibbles; q = (nibble | high << 4) - 16
 *   Q5_1 [24]: d, m, 32 high bits, 16 bytes of low nibbles
 *   Q8_0 [34]: d, 32 int8
 * In the nibble types, byte j holds value j in its low and value j + 16 in its high
 * nibble. The K-quants group 256 values in a super-block of 8 (Q4_K, Q5_K) or 16 (Q6_K)
 * sub-blocks, each with its own 6- or 8-bit scale (and 6-bit min):
 *   Q4_K [144]: d, dmin, 12 bytes of packed scales / mins, 128 bytes of nibbles;
 *               value = d * scale * q - dmin * min
 *   Q5_K [176]: as Q4_K plus 32 bytes of fifth bits before the nibbles
 *   Q6_K [210]: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d;
 *               value = d * scale * (q - 32)
 * Types are named by their ggml type ids (GGMLQuantizationType).
 *
 * The values computed are exactly those of gguf's reference dequantization (the
 * same float32 products); the matmul then runs small_gemm.c's float dot products
 * on them, so the result equals small_gemm_f32 on the dequantized matrix.
 */
#include <stdlib.h>

#include "dots.h"
#include "gguf_blocks.h"

/* The dequantizers below compute each value with gguf's roundings: separate products
 * and sums, no fused multiply-add. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

/* Scale and min of sub-block j of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4). */
static inline void scale_min_k4(int j, const uint8_t *q, float *scale, float *min) {
    if (j < 4) {
        *scale = q[j] & 63;
        *min = q[j + 4] & 63;
    } else {
        *scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* One K-quant super-block of 256 values into out, in gguf's order of operations. */
static void dequantize_k_block(float *restrict out, const uint8_t *restrict blk, int64_t type) {
    if (type == Q6_K) {
        const uint8_t *ql = blk, *qh = blk + 128;
        const int8_t *scales = (const int8_t *)(blk + 192);
        const float d = half_at(blk + 208);
        for (int half = 0; half < 2; ++half, ql += 64, qh += 32, scales += 8, out += 128) {
            /* quarter k of the 128 values: nibbles of ql (low for k < 2) at byte offset 32 * (k & 1),
             * high bits 2k of qh; each run of 16 values shares one scale */
            for (int k = 0; k < 4; ++k) {
                const uint8_t *low = ql + 32 * (k & 1);
                const int nibble_shift = k < 2 ? 0 : 4, high_shift = 2 * k;
                for (int g = 0; g < 2; ++g) {
                    const float scale = d * scales[2 * k + g];
                    for (int l = 16 * g; l < 16 * g + 16; ++l) {
                        const int q = ((low[l] >> nibble_shift) & 0xF) | (((qh[l] >> high_shift) & 3) << 4);
                        out[32 * k + l] = scale * (float)(q - 32);
                    }
                }
            }
        }
        return;
    }
    /* Q4_K, Q5_K: 4 chunks of 32 nibble bytes; low nibbles are sub-block 2c, high 2c + 1 */
    const float d = half_at(blk), dmin = half_at(blk + 2);
    const uint8_t *scales = blk + 4, *qh = blk + 16;
    const uint8_t *qs = type == Q5_K ? blk + 48 : blk + 16;
    for (int chunk = 0; chunk < 4; ++chunk, qs += 32, out += 64) {
        float scale, min;
        scale_min_k4(2 * chunk, scales, &scale, &min);
        const float d1 = d * scale, m1 = dmin * min;
        scale_min_k4(2 * chunk + 1, scales, &scale, &min);
        const float d2 = d * scale, m2 = dmin * min;
        for (int l = 0; l < 32; ++l) {
            int low = qs[l] & 0xF, high = qs[l] >> 4;
            if (type == Q5_K) {
                low |= ((qh[l] >> (2 * chunk)) & 1) << 4;
                high |= ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
            }
            out[l] = d1 * (float)low - m1;
            out[l + 32] = d2 * (float)high - m2;
        }
    }
}

/* 8 lanes: one AVX2 register of floats. Bytes are widened to int32 with AVX2's
 * vpmovzxbd / vpmovsxbd (GCC's generic vector conversions did it byte by byte). */
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

#if defined(__AVX2__)
#include <immintrin.h>
static inline i32x8 widen_u8(const uint8_t *p) {
    return (i32x8)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}
static inline i32x8 widen_i8(const uint8_t *p) {
    return (i32x8)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
}
#else
static inline i32x8 widen_u8(const uint8_t *p) {
    i32x8 v;
    for (int i = 0; i < 8; ++i) v[i] = p[i];
    return v;
}
static inline i32x8 widen_i8(const uint8_t *p) {
    i32x8 v;
    for (int i = 0; i < 8; ++i) v[i] = (int8_t)p[i];
    return v;
}
#endif

static inline void store8(float *p, vec8 v) { memcpy(p, &v, sizeof v); }

/* The low and high nibbles of the 8 bytes at p, as floats. */
static inline vec8 low_nibbles(const uint8_t *p) { return __builtin_convertvector(widen_u8(p) & 15, vec8); }
static inline vec8 high_nibbles(const uint8_t *p) { return __builtin_convertvector(widen_u8(p) >> 4, vec8); }

/* Bits first .. first + 7 of a 5-bit block's 32 high bits, as 0 or 16. */
static inline vec8 fifth_bits(uint32_t qh, int first) {
    const u32x8 lanes = {0, 1, 2, 3, 4, 5, 6, 7};
    const u32x8 bits = (u32x8){0} + qh;
    return __builtin_convertvector(((bits >> (lanes + first)) & 1) << 4, vec8);
}

/* One row of `in` values (a multiple of 32) from its blocks into out, 8 values per
 * vector: nibble byte j (j = 0..15) gives values j and j + 16. Each value is
 * d * q (+ m) with q an exact small integer in float: the products stay separate
 * roundings (no fused multiply-add), as in the numpy reference. */
static void dequantize_row(float *restrict out, const uint8_t *restrict row, int64_t type, int64_t in) {
    if (type >= Q4_K) {
        for (int64_t b = 0; b < in / SUPER_BLOCK; ++b) dequantize_k_block(out + b * SUPER_BLOCK, row + b * block_bytes(type), type);
        return;
    }
    const int64_t num_blocks = in / BLOCK;
    for (int64_t b = 0; b < num_blocks; ++b, out += BLOCK) {
        switch (type) {
        case Q4_0: {
            const uint8_t *blk = row + b * 18;
            const float d = half_at(blk);
            for (int h = 0; h < 16; h += 8) {
                store8(out + h, d * (low_nibbles(blk + 2 + h) - 8.0f));
                store8(out + 16 + h, d * (high_nibbles(blk + 2 + h) - 8.0f));
            }
            break;
        }
        case Q4_1: {
            const uint8_t *blk = row + b * 20;
            const float d = half_at(blk), m = half_at(blk + 2);
            for (int h = 0; h < 16; h += 8) {
                store8(out + h, d * low_nibbles(blk + 4 + h) + m);
                store8(out + 16 + h, d * high_nibbles(blk + 4 + h) + m);
            }
            break;
        }
        case Q5_0: {
            const uint8_t *blk = row + b * 22;
            const float d = half_at(blk);
            const uint32_t qh = u32_at(blk + 2);
            for (int h = 0; h < 16; h += 8) {
                store8(out + h, d * (low_nibbles(blk + 6 + h) + fifth_bits(qh, h) - 16.0f));
                store8(out + 16 + h, d * (high_nibbles(blk + 6 + h) + fifth_bits(qh, 16 + h) - 16.0f));
            }
            break;
        }
        case Q5_1: {
            const uint8_t *blk = row + b * 24;
            const float d = half_at(blk), m = half_at(blk + 2);
            const uint32_t qh = u32_at(blk + 4);
            for (int h = 0; h < 16; h += 8) {
                store8(out + h, d * (low_nibbles(blk + 8 + h) + fifth_bits(qh, h)) + m);
                store8(out + 16 + h, d * (high_nibbles(blk + 8 + h) + fifth_bits(qh, 16 + h)) + m);
            }
            break;
        }
        case Q8_0: {
            const uint8_t *blk = row + b * 34;
            const float d = half_at(blk);
            for (int h = 0; h < BLOCK; h += 8) store8(out + h, d * __builtin_convertvector(widen_i8(blk + 2 + h), vec8));
            break;
        }
        }
    }
}
#pragma GCC pop_options

/* out [rows, in] <- the rows of w [*, row_bytes] given by ids (or rows 0..rows-1
 * when ids is NULL): an embedding lookup, or a slab of a weight for a large matmul.
 * Returns 0, or -1 for a type this file does not know. */
int gguf_dequantize(float *restrict out, const uint8_t *restrict w, int64_t row_bytes, int64_t type,
                    const int64_t *restrict ids, int64_t rows, int64_t in) {
    if (!valid_rows(type, row_bytes, in)) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) dequantize_row(out + r * in, w + (ids ? ids[r] : r) * row_bytes, type, in);
    return 0;
}

/* y [rows, out] (row stride y_stride) = x [rows, in] (row stride x_stride) @ w^T
 * (+ bias [out]), w [out, row_bytes] in blocks of `type`. For few rows of x, as
 * small_gemm_f32: each thread dequantizes WEIGHT_ROWS weight rows at a time into
 * an L1-sized scratch and takes every row of x through them, so the quantized
 * weights are read from memory once per call. Returns 0, -1 for an unknown type
 * or a row length that is not whole blocks, -2 when out of memory. */
int gguf_gemm(float *restrict y, int64_t y_stride, const float *restrict x, int64_t x_stride,
              const uint8_t *restrict w, int64_t row_bytes, int64_t type, const float *restrict bias, int64_t rows,
              int64_t in, int64_t out) {
    if (!valid_rows(type, row_bytes, in)) return -1;
    const int64_t num_tiles = (out + WEIGHT_ROWS - 1) / WEIGHT_ROWS;
    int failed = 0;
#pragma omp parallel
    {
        float *scratch = malloc(sizeof(float) * WEIGHT_ROWS * in);
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < num_tiles; ++tile) {
            if (scratch == NULL) continue;
            const int64_t first = tile * WEIGHT_ROWS;
            const int64_t num_rows = out - first < WEIGHT_ROWS ? out - first : WEIGHT_ROWS;
            for (int64_t r = 0; r < num_rows; ++r) dequantize_row(scratch + r * in, w + (first + r) * row_bytes, type, in);
            float result[WEIGHT_ROWS];
            for (int64_t m = 0; m < rows; ++m) {
                dots(result, x + m * x_stride, scratch, num_rows, in);
                for (int64_t r = 0; r < num_rows; ++r)
                    y[m * y_stride + first + r] = result[r] + (bias ? bias[first + r] : 0.0f);
            }
        }
        free(scratch);
    }
    return failed ? -2 : 0;
}
