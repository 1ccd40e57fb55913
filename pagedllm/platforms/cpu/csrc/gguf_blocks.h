/* llama.cpp's block types as GGUF stores them (layouts in quantized_gemm.c), shared by
 * the float path (quantized_gemm.c) and the int8 dot products (quantized_dot.c). */
#ifndef PAGEDLLM_GGUF_BLOCKS_H
#define PAGEDLLM_GGUF_BLOCKS_H

#include <stdint.h>
#include <string.h>

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };
#define BLOCK 32
#define SUPER_BLOCK 256

static inline float half_at(const uint8_t *p) {
    _Float16 h; /* F16C's vcvtph2ps where the CPU has it, else libgcc's exact conversion */
    memcpy(&h, p, sizeof h);
    return (float)h;
}

static inline uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline int64_t block_bytes(int64_t type) {
    switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: return 0;
    }
}

/* Asks for the cache lines of [p, p + bytes) ahead of their use. A decode step's GEMMs
 * compute little per weight byte, and with weights streamed from DRAM the hardware
 * prefetchers alone left them waiting: asking for the next tile of weight rows while the
 * current one is computed took a batch-1 step of SmolLM2 Q4_1's 30 layers of GEMMs from
 * 7.8 to 5.8 ms (2-core AVX2 EPYC). */
static inline void prefetch_bytes(const uint8_t *p, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 3);
}

static inline int64_t block_values(int64_t type) { return type >= Q4_K ? SUPER_BLOCK : BLOCK; }

/* Whether rows of `in` values of this type take row_bytes: whole blocks of a known type. */
static inline int valid_rows(int64_t type, int64_t row_bytes, int64_t in) {
    return block_bytes(type) != 0 && in % block_values(type) == 0 && row_bytes == in / block_values(type) * block_bytes(type);
}

#endif
