/* y = x @ w^T (+ bias) for few rows of x and weights in 32-value GGUF blocks (Q4_0,
 * Q4_1, Q5_0, Q5_1, Q8_0), with integer dot products: each row of x is quantized to
 * int8 per 32 values (scale dx = max|x| / 127, as llama.cpp's q8 blocks), so a block
 * pair costs one 32-wide integer dot product instead of widening 32 weights to float.
 *
 * For a weight block w = d * q + m (m = -8d for Q4_0, -16d for Q5_0, 0 for Q8_0) and
 * an activation block x ~ dx * xq:
 *     sum(w * x) ~ d * dx * sum(q * xq) + m * dx * sum(xq)
 * The only error is the activations' rounding, |x - dx * xq| <= dx / 2 per value,
 * so |error| <= sum over blocks of dx / 2 * sum(|w|) (tests check this bound).
 * The integer sums are exact; q is unsigned (0..31; Q8_0's signs are moved onto xq),
 * xq signed: AVX512-VNNI's vpdpbusd, or AVX2's vpmaddubsw + vpmaddwd (no overflow:
 * 2 * 31 * 127 < 2^15; Q8_0: 2 * 128 * 127 < 2^15), or a portable loop.
 */
#include <math.h>
#include <stdlib.h>

#include "gguf_blocks.h"

/* x [in] -> xq [in], scales dx [in / 32] and dx * sum(xq) [in / 32] per block. */
static void quantize_row(int8_t *restrict xq, float *restrict dx, float *restrict dx_sum, const float *restrict x,
                         int64_t in) {
    for (int64_t b = 0; b < in / BLOCK; ++b, x += BLOCK, xq += BLOCK) {
        float amax = 0.0f;
        for (int j = 0; j < BLOCK; ++j) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < BLOCK; ++j) {
            const int q = (int)nearbyintf(x[j] * inverse);
            xq[j] = (int8_t)q;
            sum += q;
        }
        dx[b] = d;
        dx_sum[b] = d * (float)sum;
    }
}

/* m of a weight block w = d * q + m (d its scale): stored for the _1 types, implied by the
 * zero point for Q4_0 (-8d) and Q5_0 (-16d), none for Q8_0. */
static inline float block_offset(const uint8_t *blk, int64_t type, float d) {
    switch (type) {
    case Q4_1:
    case Q5_1: return half_at(blk + 2);
    case Q4_0: return -8.0f * d;
    case Q5_0: return -16.0f * d;
    default: return 0.0f;
    }
}

#define X_ROWS 4 /* activation rows per pass over a weight row: each block is unpacked once for 4 */

#if defined(__AVX2__)
#include <immintrin.h>

/* The 32 nibbles of 16 bytes as bytes, in value order: low nibbles are values 0..15. */
static inline __m256i nibbles(const uint8_t *qs) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(15));
}

/* 16 where bit j of the 32 bits at qh is set, for value j: the fifth bit of Q5 values. */
static inline __m256i fifth_bits(const uint8_t *qh) {
    /* byte j gets qh byte j / 8, then keeps only its bit j % 8 */
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)u32_at(qh)),
                                               _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                                                 0x0101010101010101LL, 0));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(16));
}

/* sum(u * s) over 32 unsigned and 32 signed bytes, as 8 int32 partial sums. */
static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

/* A weight block's 32 values as unsigned bytes: q (nibbles, with the fifth bit for Q5),
 * or |q| for Q8_0, whose signs move onto the activations (signed_activations). */
static inline __m256i weight_bytes(const uint8_t *blk, int64_t type) {
    switch (type) {
    case Q4_0: return nibbles(blk + 2);
    case Q4_1: return nibbles(blk + 4);
    case Q5_0: return _mm256_or_si256(nibbles(blk + 6), fifth_bits(blk + 2));
    case Q5_1: return _mm256_or_si256(nibbles(blk + 8), fifth_bits(blk + 4));
    default: {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        return _mm256_sign_epi8(q, q);
    }
    }
}

static inline __m256i signed_activations(const uint8_t *blk, int64_t type, const int8_t *xq) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    return type == Q8_0 ? _mm256_sign_epi8(x, _mm256_loadu_si256((const __m256i *)(blk + 2))) : x;
}

/* acc + one block pair's integer dot product scaled by d * dx; *offset += m * dx_sum. */
static inline __attribute__((always_inline)) __m256 add_block(__m256 acc, float *offset, const uint8_t *blk,
                                                              const int64_t type, const int8_t *xq, float dx,
                                                              float dx_sum) {
    const float d = half_at(blk);
    const __m256i dot = dot_u8_s8(weight_bytes(blk, type), signed_activations(blk, type, xq));
    *offset += block_offset(blk, type, d) * dx_sum;
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * dx), acc);
}

/* One weight row against n <= X_ROWS quantized activation rows (row i at xq + i * in,
 * its per-block scales at dx + i * num_blocks) -> out[0..n). Inlined into row_dots once
 * per block type, so that the type's switches fold away: with them in the loop a block
 * cost ~12 cycles, as much as its arithmetic. One row (decode of a single stream) keeps
 * two accumulators, the FMA latency of one block hidden behind the next. */
static inline __attribute__((always_inline)) void row_dots_of(float *out, const uint8_t *row, const int64_t type,
                                                              const int8_t *xq, const float *dx, const float *dx_sum,
                                                              int64_t in, int64_t num_blocks, int n) {
    const int64_t bytes = block_bytes(type);
    if (n == 1) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        float offset0 = 0.0f, offset1 = 0.0f;
        int64_t b = 0;
        for (; b + 1 < num_blocks; b += 2) {
            acc0 = add_block(acc0, &offset0, row + b * bytes, type, xq + b * BLOCK, dx[b], dx_sum[b]);
            acc1 = add_block(acc1, &offset1, row + (b + 1) * bytes, type, xq + (b + 1) * BLOCK, dx[b + 1],
                             dx_sum[b + 1]);
        }
        if (b < num_blocks) acc0 = add_block(acc0, &offset0, row + b * bytes, type, xq + b * BLOCK, dx[b], dx_sum[b]);
        out[0] = hsum(_mm256_add_ps(acc0, acc1)) + (offset0 + offset1);
        return;
    }
    __m256 acc[X_ROWS];
    float offsets[X_ROWS]; /* sum of m * dx * sum(xq) */
    for (int i = 0; i < X_ROWS; ++i) {
        acc[i] = _mm256_setzero_ps();
        offsets[i] = 0.0f;
    }
    for (int64_t b = 0; b < num_blocks; ++b) {
        const uint8_t *blk = row + b * bytes;
        const float d = half_at(blk);
        const float m = block_offset(blk, type, d);
        const __m256i q = weight_bytes(blk, type);
        for (int i = 0; i < n; ++i) {
            const int64_t at = i * num_blocks + b;
            const __m256i dot = dot_u8_s8(q, signed_activations(blk, type, xq + i * in + b * BLOCK));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * dx[at]), acc[i]);
            offsets[i] += m * dx_sum[at];
        }
    }
    for (int i = 0; i < n; ++i) out[i] = hsum(acc[i]) + offsets[i];
}

static void row_dots(float *out, const uint8_t *row, int64_t type, const int8_t *xq, const float *dx,
                     const float *dx_sum, int64_t in, int64_t num_blocks, int n) {
    switch (type) {
    case Q4_0: row_dots_of(out, row, Q4_0, xq, dx, dx_sum, in, num_blocks, n); break;
    case Q4_1: row_dots_of(out, row, Q4_1, xq, dx, dx_sum, in, num_blocks, n); break;
    case Q5_0: row_dots_of(out, row, Q5_0, xq, dx, dx_sum, in, num_blocks, n); break;
    case Q5_1: row_dots_of(out, row, Q5_1, xq, dx, dx_sum, in, num_blocks, n); break;
    default: row_dots_of(out, row, Q8_0, xq, dx, dx_sum, in, num_blocks, n); break;
    }
}
#else
static inline int block_dot(const uint8_t *blk, int64_t type, const int8_t *xq) {
    int sum = 0;
    if (type == Q8_0) {
        for (int j = 0; j < BLOCK; ++j) sum += (int8_t)blk[2 + j] * xq[j];
        return sum;
    }
    const int offset = type == Q4_0 ? 2 : type == Q4_1 ? 4 : type == Q5_0 ? 6 : 8;
    const uint32_t qh = type == Q5_0 ? u32_at(blk + 2) : type == Q5_1 ? u32_at(blk + 4) : 0;
    for (int j = 0; j < 16; ++j) {
        const int low = (blk[offset + j] & 15) | (((qh >> j) & 1) << 4);
        const int high = (blk[offset + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        sum += low * xq[j] + high * xq[j + 16];
    }
    return sum;
}

static void row_dots(float *out, const uint8_t *row, int64_t type, const int8_t *xq, const float *dx,
                     const float *dx_sum, int64_t in, int64_t num_blocks, int n) {
    const int64_t bytes = block_bytes(type);
    for (int i = 0; i < n; ++i) {
        float acc = 0.0f, offsets = 0.0f;
        for (int64_t b = 0; b < num_blocks; ++b) {
            const uint8_t *blk = row + b * bytes;
            const float d = half_at(blk);
            const float m = block_offset(blk, type, d);
            const int64_t at = i * num_blocks + b;
            acc += (float)block_dot(blk, type, xq + i * in + b * BLOCK) * (d * dx[at]);
            offsets += m * dx_sum[at];
        }
        out[i] = acc + offsets;
    }
}
#endif

/* y [rows, out] (row stride y_stride) = x [rows, in] (row stride x_stride) @ w^T (+ bias
 * [out]), w given as num_segments row segments: segment s holds output rows
 * [first_rows[s], first_rows[s] + num_rows[s]) as blocks of types[s] at w[s] (row_bytes[s]
 * per row), in order and covering [0, out). One call per layer: the fused pieces of QKV
 * or gate/up share one rounding of x and one parallel region. Returns 0, -1 for a type
 * this kernel does not take (the K-quants: the caller uses gguf_gemm) or rows that are
 * not whole blocks, -2 when out of memory. */
int gguf_gemm_int8(float *restrict y, int64_t y_stride, const float *restrict x, int64_t x_stride,
                   int64_t num_segments, const uint8_t *const *w, const int64_t *row_bytes, const int64_t *types,
                   const int64_t *first_rows, const int64_t *num_rows, const float *restrict bias, int64_t rows,
                   int64_t in) {
    int64_t out = 0;
    for (int64_t s = 0; s < num_segments; ++s) {
        if (types[s] >= Q4_K || !valid_rows(types[s], row_bytes[s], in) || first_rows[s] != out) return -1;
        out += num_rows[s];
    }
    const int64_t num_blocks = in / BLOCK;
    int8_t *xq = malloc((size_t)(rows * in));
    float *dx = malloc(sizeof(float) * (size_t)(2 * rows * num_blocks));
    if (xq == NULL || dx == NULL) {
        free(xq);
        free(dx);
        return -2;
    }
    float *dx_sum = dx + rows * num_blocks;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < rows; ++m)
            quantize_row(xq + m * in, dx + m * num_blocks, dx_sum + m * num_blocks, x + m * x_stride, in);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < out; ++r) { /* the weight row stays in L1 across the rows of x */
            int64_t s = 0;
            while (r >= first_rows[s] + num_rows[s]) ++s;
            const uint8_t *row = w[s] + (r - first_rows[s]) * row_bytes[s];
            for (int64_t m = 0; m < rows; m += X_ROWS) {
                const int n = rows - m < X_ROWS ? (int)(rows - m) : X_ROWS;
                float dots[X_ROWS];
                row_dots(dots, row, types[s], xq + m * in, dx + m * num_blocks, dx_sum + m * num_blocks, in,
                         num_blocks, n);
                for (int i = 0; i < n; ++i) y[(m + i) * y_stride + r] = dots[i] + (bias ? bias[r] : 0.0f);
            }
        }
    }
    free(xq);
    free(dx);
    return 0;
}
