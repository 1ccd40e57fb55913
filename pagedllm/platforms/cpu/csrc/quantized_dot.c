/* y = x @ w^T (+ bias) for weights in 32-value GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0), with integer dot products: each row of x is quantized to int8 per 32 values
 * (scale dx = max|x| / 127, as llama.cpp's q8 blocks), so a block pair costs one
 * 32-wide integer dot product instead of widening 32 weights to float.
 *
 * For a weight block w = d * q + m (m = -8d for Q4_0, -16d for Q5_0, 0 for Q8_0) and
 * an activation block x ~ dx * xq:
 *     sum(w * x) ~ d * dx * sum(q * xq) + m * dx * sum(xq)
 * The only error is the activations' rounding, |x - dx * xq| <= dx / 2 per value,
 * so |error| <= sum over blocks of dx / 2 * sum(|w|) (tests check this bound).
 * The integer sums are exact; q is unsigned (0..31; Q8_0's signs are moved onto xq),
 * xq signed: AVX512-VNNI's vpdpbusd, or AVX2's vpmaddubsw + vpmaddwd (no overflow:
 * 2 * 31 * 127 < 2^15; Q8_0: 2 * 128 * 127 < 2^15), or a portable loop.
 *
 * Batch invariance: every output y[i, r] is computed by the same operations in the same
 * order however many rows x has and wherever the pair falls in a tile, so a request's
 * logits do not depend on the batch it runs in (tests compare rows bit for bit).
 */
#include <math.h>
#include <stdlib.h>

#include "gguf_blocks.h"
#include "kernels.h"

/* Per-block arrays (scales, offsets) have rows padded with zeros to a multiple of 8
 * blocks, so that their products are summed 8 blocks a vector with no tail. */
static inline int64_t padded_blocks(int64_t in) { return (in / BLOCK + 7) / 8 * 8; }

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

/* TILE_ROWS weight rows are unpacked once into a Tile and then taken through the rows of
 * x, X_ROWS at a time against two of them: 2 x 3 accumulators and the vectors they need
 * fit AVX2's 16 registers. Rows of x left over (all of them in a decode step of one or
 * two streams) take the four weight rows at once, straight from their blocks: four
 * independent accumulators hide the latency of each. */
#define TILE_ROWS 4
#define X_ROWS 3

/* q [TILE_ROWS][in]: the integers of the weights' values; d, m [TILE_ROWS][padded blocks]. */
typedef struct {
    uint8_t *q;
    float *d, *m;
} Tile;

/* What tile_dots reads the weights from: the unpacked tile, or the blocks themselves. */
#define UNPACKED (-1)

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

/* A block's 32 integers in value order: q (0..31) for the nibble types, the signed
 * int8 of Q8_0. */
static inline __m256i block_vector(const uint8_t *blk, int64_t type) {
    switch (type) {
    case Q4_0: return nibbles(blk + 2);
    case Q4_1: return nibbles(blk + 4);
    case Q5_0: return _mm256_or_si256(nibbles(blk + 6), fifth_bits(blk + 2));
    case Q5_1: return _mm256_or_si256(nibbles(blk + 8), fifth_bits(blk + 4));
    default: return _mm256_loadu_si256((const __m256i *)(blk + 2));
    }
}

static inline void block_integers(uint8_t *restrict out, const uint8_t *restrict blk, int64_t type) {
    _mm256_storeu_si256((__m256i *)out, block_vector(blk, type));
}

/* sum(u * s) over 32 unsigned and 32 signed bytes, as 8 int32 partial sums. */
static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* The lane sums of four vectors, each ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)),
 * into sums[0..3]: one order for every output, whichever vectors it is reduced with. */
static inline void sum4(float *sums, __m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 all = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1)));
}

/* sums[i * nx + j] = sum over blocks of float(q_i . xq_j) * dx_j * d_i + m_i * dx_sum_j,
 * for nw weight rows and nx rows of x (xq[j], dx[j], dx_sum[j]). The weights are the
 * tile's rows[i] (source UNPACKED; q8: they are Q8_0), or read straight from the blocks
 * at raw[i] (source: their block type), whose m are then stored in the tile's row i.
 * Inlined for each shape and source so that the loops unroll into registers and the
 * block type's switches fold away; each output's arithmetic is the same in all of them. */
static inline __attribute__((always_inline)) void tile_dots(float *sums, const Tile *tile, const int *rows,
                                                            const uint8_t *const *raw, const int64_t source,
                                                            const int nw, const int8_t *const *xq,
                                                            const float *const *dx, const float *const *dx_sum,
                                                            const int nx, const int q8, int64_t in) {
    const int64_t num_blocks = in / BLOCK, stride = padded_blocks(in);
    const int64_t bytes = source == UNPACKED ? 0 : block_bytes(source);
    __m256 acc[TILE_ROWS * X_ROWS];
    for (int k = 0; k < nw * nx; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t b = 0; b < num_blocks; ++b) {
        __m256i w[TILE_ROWS];
        __m256 d[TILE_ROWS];
        for (int i = 0; i < nw; ++i) {
            if (source == UNPACKED) {
                w[i] = _mm256_loadu_si256((const __m256i *)(tile->q + rows[i] * in + b * BLOCK));
                d[i] = _mm256_set1_ps(tile->d[rows[i] * stride + b]);
            } else {
                const uint8_t *blk = raw[i] + b * bytes;
                const float scale = half_at(blk);
                w[i] = block_vector(blk, source);
                d[i] = _mm256_set1_ps(scale);
                tile->m[i * stride + b] = block_offset(blk, source, scale);
            }
        }
        for (int j = 0; j < nx; ++j) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq[j] + b * BLOCK));
            const __m256 scale = _mm256_set1_ps(dx[j][b]);
            for (int i = 0; i < nw; ++i) {
                /* Q8_0: |q| against xq with q's signs */
                const __m256i dot = q8 ? dot_u8_s8(_mm256_sign_epi8(w[i], w[i]), _mm256_sign_epi8(x, w[i]))
                                       : dot_u8_s8(w[i], x);
                acc[i * nx + j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), scale), d[i], acc[i * nx + j]);
            }
        }
    }
    /* the offsets m * dx_sum, 8 blocks a vector, join each accumulator before its lanes are summed */
    const float *m[TILE_ROWS];
    for (int i = 0; i < nw; ++i) m[i] = tile->m + (source == UNPACKED ? rows[i] : i) * stride;
    for (int64_t b = 0; b < stride; b += 8)
        for (int j = 0; j < nx; ++j) {
            const __m256 s = _mm256_loadu_ps(dx_sum[j] + b);
            for (int i = 0; i < nw; ++i) acc[i * nx + j] = _mm256_fmadd_ps(_mm256_loadu_ps(m[i] + b), s, acc[i * nx + j]);
        }
    for (int k = nw * nx; k % 4; ++k) acc[k] = _mm256_setzero_ps();
    for (int k = 0; k < nw * nx; k += 4) sum4(sums + k, acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
}
#else
/* A block's 32 integers in value order: q (0..31) for the nibble types, the signed int8
 * of Q8_0. In the nibble types byte j holds value j in its low and value j + 16 in its
 * high nibble; Q5's fifth bits are a uint32 before them. */
static inline void block_integers(uint8_t *restrict out, const uint8_t *restrict blk, int64_t type) {
    if (type == Q8_0) {
        memcpy(out, blk + 2, BLOCK);
        return;
    }
    const int nibbles = type == Q4_0 ? 2 : type == Q4_1 ? 4 : type == Q5_0 ? 6 : 8;
    const uint32_t qh = type == Q5_0 ? u32_at(blk + 2) : type == Q5_1 ? u32_at(blk + 4) : 0;
    for (int j = 0; j < 16; ++j) {
        out[j] = (uint8_t)((blk[nibbles + j] & 15) | (((qh >> j) & 1) << 4));
        out[j + 16] = (uint8_t)((blk[nibbles + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
}

static inline void tile_dots(float *sums, const Tile *tile, const int *rows, const uint8_t *const *raw,
                             const int64_t source, const int nw, const int8_t *const *xq, const float *const *dx,
                             const float *const *dx_sum, const int nx, const int q8, int64_t in) {
    const int64_t num_blocks = in / BLOCK, stride = padded_blocks(in);
    const int64_t bytes = source == UNPACKED ? 0 : block_bytes(source);
    for (int i = 0; i < nw; ++i) {
        const int row = source == UNPACKED ? rows[i] : i;
        for (int j = 0; j < nx; ++j) {
            float acc = 0.0f;
            for (int64_t b = 0; b < num_blocks; ++b) {
                uint8_t own[BLOCK];
                const uint8_t *q = own;
                float d;
                if (source == UNPACKED) {
                    q = tile->q + rows[i] * in + b * BLOCK;
                    d = tile->d[row * stride + b];
                } else {
                    const uint8_t *blk = raw[i] + b * bytes;
                    block_integers(own, blk, source);
                    d = half_at(blk);
                    tile->m[row * stride + b] = block_offset(blk, source, d);
                }
                int dot = 0;
                for (int k = 0; k < BLOCK; ++k) dot += (q8 ? (int)(int8_t)q[k] : (int)q[k]) * xq[j][b * BLOCK + k];
                acc += (float)dot * dx[j][b] * d;
            }
            for (int64_t b = 0; b < num_blocks; ++b) acc += tile->m[row * stride + b] * dx_sum[j][b];
            sums[i * nx + j] = acc;
        }
    }
}
#endif

static void unpack_row(Tile *tile, int i, const uint8_t *row, int64_t type, int64_t in) {
    const int64_t num_blocks = in / BLOCK, stride = padded_blocks(in), bytes = block_bytes(type);
    for (int64_t b = 0; b < num_blocks; ++b) {
        const uint8_t *blk = row + b * bytes;
        const float d = half_at(blk);
        block_integers(tile->q + i * in + b * BLOCK, blk, type);
        tile->d[i * stride + b] = d;
        tile->m[i * stride + b] = block_offset(blk, type, d);
    }
}

/* y[i, r] (+ bias[r]) for the rows [0, rows) of x (xq, and dx / dx_sum with padded rows)
 * and count <= TILE_ROWS weight rows at raw[r] in blocks of `type`. A short tile repeats
 * its last row; the copies' results are dropped. */
static void tile_gemm(float *restrict y, int64_t y_stride, Tile *tile, const uint8_t *const *raw, int64_t type,
                      int count, const int8_t *xq, const float *dx, const float *dx_sum, const float *bias,
                      int64_t rows, int64_t in) {
    const int64_t stride = padded_blocks(in);
    const int all[TILE_ROWS] = {0, count > 1 ? 1 : 0, count > 2 ? 2 : count - 1, count > 3 ? 3 : count - 1};
    const uint8_t *const repeated[TILE_ROWS] = {raw[all[0]], raw[all[1]], raw[all[2]], raw[all[3]]};
    const int8_t *xrows[X_ROWS];
    const float *scales[X_ROWS], *sums_of_x[X_ROWS];
    float sums[TILE_ROWS * X_ROWS];
    int64_t i = 0;
    if (rows >= X_ROWS)
        for (int r = 0; r < count; ++r) unpack_row(tile, r, raw[r], type, in);
    for (; i + X_ROWS <= rows; i += X_ROWS) {
        for (int j = 0; j < X_ROWS; ++j) {
            xrows[j] = xq + (i + j) * in;
            scales[j] = dx + (i + j) * stride;
            sums_of_x[j] = dx_sum + (i + j) * stride;
        }
        for (int half = 0; half < count; half += 2) {
            if (type == Q8_0)
                tile_dots(sums, tile, all + half, NULL, UNPACKED, 2, xrows, scales, sums_of_x, X_ROWS, 1, in);
            else
                tile_dots(sums, tile, all + half, NULL, UNPACKED, 2, xrows, scales, sums_of_x, X_ROWS, 0, in);
            for (int r = half; r < half + 2 && r < count; ++r)
                for (int j = 0; j < X_ROWS; ++j)
                    y[(i + j) * y_stride + r] = sums[(r - half) * X_ROWS + j] + (bias ? bias[r] : 0.0f);
        }
    }
    for (; i < rows; ++i) {
        xrows[0] = xq + i * in;
        scales[0] = dx + i * stride;
        sums_of_x[0] = dx_sum + i * stride;
        if (rows >= X_ROWS) { /* the tile is unpacked */
            if (type == Q8_0)
                tile_dots(sums, tile, all, NULL, UNPACKED, TILE_ROWS, xrows, scales, sums_of_x, 1, 1, in);
            else
                tile_dots(sums, tile, all, NULL, UNPACKED, TILE_ROWS, xrows, scales, sums_of_x, 1, 0, in);
        } else {
            switch (type) { /* one inlined copy per type: the blocks' switches fold away */
            case Q4_0: tile_dots(sums, tile, NULL, repeated, Q4_0, TILE_ROWS, xrows, scales, sums_of_x, 1, 0, in); break;
            case Q4_1: tile_dots(sums, tile, NULL, repeated, Q4_1, TILE_ROWS, xrows, scales, sums_of_x, 1, 0, in); break;
            case Q5_0: tile_dots(sums, tile, NULL, repeated, Q5_0, TILE_ROWS, xrows, scales, sums_of_x, 1, 0, in); break;
            case Q5_1: tile_dots(sums, tile, NULL, repeated, Q5_1, TILE_ROWS, xrows, scales, sums_of_x, 1, 0, in); break;
            default: tile_dots(sums, tile, NULL, repeated, Q8_0, TILE_ROWS, xrows, scales, sums_of_x, 1, 1, in); break;
            }
        }
        for (int r = 0; r < count; ++r) y[i * y_stride + r] = sums[r] + (bias ? bias[r] : 0.0f);
    }
}

static inline int64_t tiles_of(int64_t rows) { return (rows + TILE_ROWS - 1) / TILE_ROWS; }

/* Tile t of the segments (num_rows[s] rows each, in order): its segment, its first row
 * there and its number of rows (TILE_ROWS, fewer at a segment's end). */
static inline int64_t locate_tile(int64_t t, const int64_t *num_rows, int64_t *segment, int *count) {
    int64_t s = 0;
    while (t >= tiles_of(num_rows[s])) t -= tiles_of(num_rows[s++]);
    const int64_t first = t * TILE_ROWS;
    *segment = s;
    *count = num_rows[s] - first < TILE_ROWS ? (int)(num_rows[s] - first) : TILE_ROWS;
    return first;
}

/* Rows of x per panel: their int8 copy (PANEL_ROWS * in bytes) stays in L2 while every
 * weight tile passes through it. */
#define PANEL_ROWS 192

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
    int64_t out = 0, num_tiles = 0;
    for (int64_t s = 0; s < num_segments; ++s) {
        if (types[s] >= Q4_K || !valid_rows(types[s], row_bytes[s], in) || first_rows[s] != out) return -1;
        out += num_rows[s];
        num_tiles += tiles_of(num_rows[s]);
    }
    const int64_t stride = padded_blocks(in);
    int8_t *xq = malloc((size_t)(rows * in));
    float *dx = calloc((size_t)(2 * rows * stride), sizeof(float)); /* zeros: the rows' padding */
    if (xq == NULL || dx == NULL) {
        free(xq);
        free(dx);
        return -2;
    }
    float *dx_sum = dx + rows * stride;
    int failed = 0;
#pragma omp parallel
    {
        Tile tile = {malloc((size_t)(TILE_ROWS * in)), calloc((size_t)(2 * TILE_ROWS * stride), sizeof(float)), NULL};
        if (tile.q == NULL || tile.d == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        tile.m = tile.d ? tile.d + TILE_ROWS * stride : NULL;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < rows; ++m)
            quantize_row(xq + m * in, dx + m * stride, dx_sum + m * stride, x + m * x_stride, in);
        for (int64_t panel = 0; panel < rows; panel += PANEL_ROWS) {
            const int64_t panel_rows = rows - panel < PANEL_ROWS ? rows - panel : PANEL_ROWS;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < num_tiles; ++t) {
                if (tile.q == NULL || tile.d == NULL) continue;
                int64_t s, n;
                int count, next_count;
                const int64_t first = locate_tile(t, num_rows, &s, &count);
                if (t + 1 < num_tiles) { /* the next tile's rows, on their way while this one is computed */
                    const int64_t next = locate_tile(t + 1, num_rows, &n, &next_count);
                    prefetch_bytes(w[n] + next * row_bytes[n], next_count * row_bytes[n]);
                }
                const uint8_t *raw[TILE_ROWS];
                for (int r = 0; r < count; ++r) raw[r] = w[s] + (first + r) * row_bytes[s];
                const int64_t column = first_rows[s] + first;
                tile_gemm(y + panel * y_stride + column, y_stride, &tile, raw, types[s], count, xq + panel * in,
                          dx + panel * stride, dx_sum + panel * stride, bias ? bias + column : NULL, panel_rows,
                          in);
            }
        }
        free(tile.q);
        free(tile.d);
    }
    free(xq);
    free(dx);
    return failed ? -2 : 0;
}
