/* Paged decode attention for CPUs: float32 queries and outputs, K/V stored as
 * float32, float16 or bfloat16 (kv_format) and computed in float32.
 *
 * One query token per request attends over the request's whole context, read
 * in place from the KV blocks through its block table (no gather). A work item
 * is a request (or one of its KV heads when there are too few requests to
 * share among the threads); it streams the context block by block with an
 * online softmax (running max and sum per head), so no buffer grows with the
 * context. The query heads of a KV group are computed together, up to three
 * at a time: each K/V row is loaded once for all of them (one layer, 128
 * requests of 400 tokens, 3 heads per KV head: compute alone 2.7 -> 2.3 ms).
 *
 * Decode attention waits on memory (every step reads the whole KV context), so
 * whole-request items first read a few blocks at a time in address order, one
 * load per cache line: sequential reads let the hardware prefetcher keep many
 * misses in flight, and the strided per-head reads that follow hit L2. (One layer,
 * 128 requests of 400 tokens: 42 ms with plain strided reads, 8.1 ms copying the
 * blocks to a buffer with memcpy, 7.3 ms touching them in place.) Per-head items
 * prefetch the next block, and the inner loops keep independent accumulator
 * chains in flight: four keys' dot products per head at a time, reduced by one
 * transposing tree, 8-wide vectors (GCC/Clang vector extensions, lowered to
 * AVX2 / NEON / SSE by -march=native).
 * head_dim 64 and 128 get their own copies of the loops (fully unrolled), and
 * each KV format its own copy (the format is a constant inside them).
 * A 16-bit cache halves the bytes every step reads (one layer, 128 requests of
 * 400 tokens: 7.2 ms from float32, 4.5 ms from float16, 5.1 ms from bfloat16).
 * A bfloat16 model over a bfloat16 cache on a CPU with AVX512-BF16 takes its
 * own loops (block_scores_bf16): dot products of bfloat16 pairs, nothing widened
 * for q . k.
 *
 * kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V)
 * query/out: [num_tokens, num_heads, head_dim]; rows[i] is request i's query row
 * block_table: [num_table_rows, max_blocks]; table_rows[i] is request i's row
 * seq_lens[i]: tokens in request i's context (its query is the last one)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "kv_elements.h"

#define STAGE_BYTES (96 * 1024) /* blocks touched ahead per thread: well inside a 512 KiB L2 */

static inline float sum8(vec8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* q . k over head_dim (a multiple of 8); k in `format`. */
static inline __attribute__((always_inline)) float dot(const float *q, const void *k, int64_t head_dim,
                                                       int format) {
    vec8 acc = {0};
    for (int64_t d = 0; d < head_dim; d += 8) acc += load8(q + d) * load_kv8(kv_at(k, d, format), format);
    return sum8(acc);
}

/* Blocks are scattered in the pool, so the hardware prefetcher cannot run
 * ahead from one block to the next: ask for the next block's K and V rows
 * (into L2) while this block is computed. */
static inline void prefetch_rows(const char *k, const char *v, int64_t num_rows, int64_t row_bytes,
                                 int64_t row_stride_bytes) {
    for (int64_t r = 0; r < num_rows; ++r)
        for (int64_t b = 0; b < row_bytes; b += 64) {
            __builtin_prefetch(k + r * row_stride_bytes + b, 0, 1);
            __builtin_prefetch(v + r * row_stride_bytes + b, 0, 1);
        }
}

static float adjust_score(float s, float soft_cap, float slope, int64_t distance) {
    if (soft_cap > 0.0f) s = soft_cap * tanhf(s / soft_cap);
    return s + slope * (float)distance;
}

/* Reads every cache line of a block's K and V (block_bytes each). Four sums,
 * so the loads do not wait on one add chain; they are kept alive so they are
 * not optimized away. The bytes are summed as integers whatever they hold:
 * only the loads matter. */
static inline void touch_block(const char *k, const char *v, int64_t block_bytes) {
    u32x8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t b = 0;
    for (; b + 128 <= block_bytes; b += 128) {
        u32x8 x[4];
        memcpy(&x[0], k + b, 32), memcpy(&x[1], v + b, 32), memcpy(&x[2], k + b + 64, 32);
        memcpy(&x[3], v + b + 64, 32);
        s0 += x[0], s1 += x[1], s2 += x[2], s3 += x[3];
    }
    for (; b + 32 <= block_bytes; b += 64) {
        u32x8 x[2];
        memcpy(&x[0], k + b, 32), memcpy(&x[1], v + b, 32);
        s0 += x[0] + x[1];
    }
    __asm__ volatile("" : : "x"(s0 + s1 + s2 + s3));
}

typedef float vec4 __attribute__((vector_size(16)));

/* (sum of a0, sum of a1, sum of a2, sum of a3): one transposing tree instead of four reductions. */
static inline vec4 sum8x4(vec8 a0, vec8 a1, vec8 a2, vec8 a3) {
    const vec8 t0 = __builtin_shufflevector(a0, a1, 0, 8, 1, 9, 4, 12, 5, 13)
                    + __builtin_shufflevector(a0, a1, 2, 10, 3, 11, 6, 14, 7, 15);
    const vec8 t1 = __builtin_shufflevector(a2, a3, 0, 8, 1, 9, 4, 12, 5, 13)
                    + __builtin_shufflevector(a2, a3, 2, 10, 3, 11, 6, 14, 7, 15);
    const vec8 u = __builtin_shufflevector(t0, t1, 0, 1, 8, 9, 4, 5, 12, 13)
                   + __builtin_shufflevector(t0, t1, 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(u, u, 0, 1, 2, 3) + __builtin_shufflevector(u, u, 4, 5, 6, 7);
}

#define MAX_FUSED_HEADS 3 /* attend_heads names each size 1..3 as a constant, so its loops unroll */

/* scores[h * block_size + j] = q_h . k_j for nh (<= MAX_FUSED_HEADS) query
 * heads of one KV head and keys [lo, hi) of a block: each key row is loaded
 * once for all nh heads, four keys at a time. q: [nh, head_dim]. */
static inline __attribute__((always_inline)) void block_scores(
    float *restrict scores, const float *restrict q, const void *restrict keys, int64_t lo, int64_t hi,
    int64_t token_stride, int64_t block_size, int64_t head_dim, int nh, int format) {
    int64_t j = lo;
    for (; j + 4 <= hi; j += 4) {
        const void *k = kv_at(keys, j * token_stride, format);
        vec8 a[MAX_FUSED_HEADS][4] = {{{0}}};
        for (int64_t d = 0; d < head_dim; d += 8) {
            const vec8 k0 = load_kv8(kv_at(k, d, format), format);
            const vec8 k1 = load_kv8(kv_at(k, token_stride + d, format), format);
            const vec8 k2 = load_kv8(kv_at(k, 2 * token_stride + d, format), format);
            const vec8 k3 = load_kv8(kv_at(k, 3 * token_stride + d, format), format);
            for (int h = 0; h < nh; ++h) {
                const vec8 qd = load8(q + h * head_dim + d);
                a[h][0] += qd * k0, a[h][1] += qd * k1, a[h][2] += qd * k2, a[h][3] += qd * k3;
            }
        }
        for (int h = 0; h < nh; ++h) {
            const vec4 s = sum8x4(a[h][0], a[h][1], a[h][2], a[h][3]);
            memcpy(scores + h * block_size + j, &s, sizeof s);
        }
    }
    for (; j < hi; ++j)
        for (int h = 0; h < nh; ++h)
            scores[h * block_size + j] = dot(q + h * head_dim, kv_at(keys, j * token_stride, format), head_dim,
                                             format);
}

/* acc_h[d, d + 8 * width) = acc_h * correction[h] + sum_j p[h * block_size + j] * v_j
 * over keys [lo, hi): each slice of a value row is loaded once for all nh heads. */
static inline __attribute__((always_inline)) void block_values_slice(
    float *restrict acc, const float *restrict p, const float *restrict correction,
    const void *restrict values, int64_t lo, int64_t hi, int64_t token_stride, int64_t block_size,
    int64_t head_dim, int nh, int64_t d, int width, int format) {
    vec8 a[MAX_FUSED_HEADS][2];
    for (int h = 0; h < nh; ++h)
        for (int w = 0; w < width; ++w) a[h][w] = load8(acc + h * head_dim + d + 8 * w) * correction[h];
    for (int64_t j = lo; j < hi; ++j) {
        const void *v = kv_at(values, j * token_stride + d, format);
        vec8 vw[2];
        for (int w = 0; w < width; ++w) vw[w] = load_kv8(kv_at(v, 8 * w, format), format);
        for (int h = 0; h < nh; ++h) {
            const float ph = p[h * block_size + j];
            for (int w = 0; w < width; ++w) a[h][w] += ph * vw[w];
        }
    }
    for (int h = 0; h < nh; ++h)
        for (int w = 0; w < width; ++w) store8(acc + h * head_dim + d + 8 * w, a[h][w]);
}

/* The weighted values of one block for nh heads, 16 dims at a time. acc: [nh, head_dim]. */
static inline __attribute__((always_inline)) void block_values(
    float *restrict acc, const float *restrict p, const float *restrict correction,
    const void *restrict values, int64_t lo, int64_t hi, int64_t token_stride, int64_t block_size,
    int64_t head_dim, int nh, int format) {
    int64_t d = 0;
    for (; d + 16 <= head_dim; d += 16)
        block_values_slice(acc, p, correction, values, lo, hi, token_stride, block_size, head_dim, nh, d, 2,
                           format);
    if (d < head_dim)
        block_values_slice(acc, p, correction, values, lo, hi, token_stride, block_size, head_dim, nh, d, 1,
                           format);
}

/* Online softmax over the scores of keys [lo, hi) of a block, for nh heads:
 * scores become exp(score - new max) in place, the running max / sum are updated,
 * and correction[h] is what the values summed so far must be scaled by. */
static inline __attribute__((always_inline)) void softmax_update(
    float *restrict scores, float *restrict running_max, float *restrict running_sum, float *restrict correction,
    int64_t lo, int64_t hi, int64_t block_size, int nh, float soft_cap, const float *slopes, int64_t distance0) {
    for (int h = 0; h < nh; ++h) {
        float *sh = scores + h * block_size;
        if (soft_cap > 0.0f || slopes != NULL) {
            const float slope = slopes ? slopes[h] : 0.0f;
            for (int64_t j = lo; j < hi; ++j) sh[j] = adjust_score(sh[j], soft_cap, slope, distance0 + j);
        }
        /* Rescale what was summed so far when the max grows. */
        float block_max = running_max[h];
        for (int64_t j = lo; j < hi; ++j) block_max = sh[j] > block_max ? sh[j] : block_max;
        correction[h] = expf(running_max[h] - block_max);
        float sum = running_sum[h] * correction[h];
        for (int64_t j = lo; j < hi; ++j) {
            sh[j] = expf(sh[j] - block_max);
            sum += sh[j];
        }
        running_max[h] = block_max, running_sum[h] = sum;
    }
}

#if HAVE_BF16_DOTS
/* A bfloat16 cache on a CPU with AVX512-BF16, head_dim a multiple of 32: q . k
 * by vdpbf16ps (32 products of bfloat16 pairs, summed in float32, per
 * instruction) with the query rounded to bfloat16 once per request -- exact in a
 * bfloat16 model, whose queries are bfloat16 values -- and the values widened to
 * float32 16 at a time. The generic loops spend most of their time widening
 * every key element; one layer, 128 requests of 400 tokens, head size 64:
 * 2.40 -> 1.63 ms (4.14 -> 2.42 ms at head size 128; Zen 5, 2 cores). */

/* (sum of a0's 16 lanes, of a1's, of a2's, of a3's) */
static inline __m128 sum16x4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    /* per 128-bit lane: [a0 0+2, a1 0+2, a0 1+3, a1 1+3], then the same for a2 / a3 */
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    /* per 128-bit lane: [a0, a1, a2, a3] summed over the lane */
    const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 v = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
    return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

static inline __m512bh load_bf16x32(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }

/* scores[h * block_size + j] = scale * q_h . k_j for nh heads and keys [lo, hi),
 * four keys at a time. q: [nh, head_dim] bfloat16, keys: bfloat16 rows. */
static inline __attribute__((always_inline)) void block_scores_bf16(
    float *restrict scores, const uint16_t *restrict q, const uint16_t *restrict keys, int64_t lo, int64_t hi,
    int64_t token_stride, int64_t block_size, int64_t head_dim, int nh, float scale) {
    int64_t j = lo;
    for (; j + 4 <= hi; j += 4) {
        const uint16_t *k = keys + j * token_stride;
        __m512 a[MAX_FUSED_HEADS][4];
        for (int h = 0; h < nh; ++h)
            for (int i = 0; i < 4; ++i) a[h][i] = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_dim; d += 32) {
            __m512bh kd[4];
            for (int i = 0; i < 4; ++i) kd[i] = load_bf16x32(k + i * token_stride + d);
            for (int h = 0; h < nh; ++h) {
                const __m512bh qd = load_bf16x32(q + h * head_dim + d);
                for (int i = 0; i < 4; ++i) a[h][i] = _mm512_dpbf16_ps(a[h][i], qd, kd[i]);
            }
        }
        for (int h = 0; h < nh; ++h)
            _mm_storeu_ps(scores + h * block_size + j,
                          _mm_mul_ps(sum16x4(a[h][0], a[h][1], a[h][2], a[h][3]), _mm_set1_ps(scale)));
    }
    for (; j < hi; ++j)
        for (int h = 0; h < nh; ++h) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t d = 0; d < head_dim; d += 32)
                a = _mm512_dpbf16_ps(a, load_bf16x32(q + h * head_dim + d), load_bf16x32(keys + j * token_stride + d));
            scores[h * block_size + j] = scale * _mm512_reduce_add_ps(a);
        }
}

/* 16 bfloat16 values at p as floats (a bfloat16 is the top half of a float). */
static inline __m512 bf16x16_to_float(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* block_values_slice for a bfloat16 cache: acc_h[d, d + 16 * width) over keys [lo, hi). */
static inline __attribute__((always_inline)) void block_values_bf16_slice(
    float *restrict acc, const float *restrict p, const float *restrict correction,
    const uint16_t *restrict values, int64_t lo, int64_t hi, int64_t token_stride, int64_t block_size,
    int64_t head_dim, int nh, int64_t d, int width) {
    __m512 a[MAX_FUSED_HEADS][4];
    for (int h = 0; h < nh; ++h)
        for (int w = 0; w < width; ++w)
            a[h][w] = _mm512_mul_ps(_mm512_loadu_ps(acc + h * head_dim + d + 16 * w), _mm512_set1_ps(correction[h]));
    for (int64_t j = lo; j < hi; ++j) {
        __m512 vw[4];
        for (int w = 0; w < width; ++w) vw[w] = bf16x16_to_float(values + j * token_stride + d + 16 * w);
        for (int h = 0; h < nh; ++h) {
            const __m512 ph = _mm512_set1_ps(p[h * block_size + j]);
            for (int w = 0; w < width; ++w) a[h][w] = _mm512_fmadd_ps(ph, vw[w], a[h][w]);
        }
    }
    for (int h = 0; h < nh; ++h)
        for (int w = 0; w < width; ++w) _mm512_storeu_ps(acc + h * head_dim + d + 16 * w, a[h][w]);
}

static inline __attribute__((always_inline)) void block_values_bf16(
    float *restrict acc, const float *restrict p, const float *restrict correction,
    const uint16_t *restrict values, int64_t lo, int64_t hi, int64_t token_stride, int64_t block_size,
    int64_t head_dim, int nh) {
    int64_t d = 0;
    for (; d + 64 <= head_dim; d += 64)
        block_values_bf16_slice(acc, p, correction, values, lo, hi, token_stride, block_size, head_dim, nh, d, 4);
    if (d < head_dim) /* head_dim is a multiple of 32 */
        block_values_bf16_slice(acc, p, correction, values, lo, hi, token_stride, block_size, head_dim, nh, d, 2);
}
#endif

/* Whether attend_block takes the AVX512-BF16 path: only for queries that are
 * bfloat16 values (a bfloat16 model), which it rounds to bfloat16 without loss; a
 * float32 model over a bfloat16 cache keeps its float32 queries. */
static inline int bf16_dots(int format, int64_t head_dim, int64_t bf16_queries) {
    return HAVE_BF16_DOTS && format == KV_BFLOAT16 && head_dim % 32 == 0 && bf16_queries;
}

/* One block for nh query heads of one KV head: scores, online-softmax update
 * of running_max / running_sum, then the weighted values into acc.
 * q: [nh, head_dim], float32 pre-multiplied by scale, or bfloat16 unscaled
 * where `dots` (bf16_dots). */
static inline __attribute__((always_inline)) void attend_block(
    float *restrict acc, float *restrict running_max, float *restrict running_sum, float *restrict scores,
    const void *restrict q, const void *restrict keys, const void *restrict values, int64_t lo, int64_t hi,
    int64_t token_stride, int64_t block_size, int64_t head_dim, int nh, float scale, float soft_cap,
    const float *slopes, int64_t distance0, int format, int dots) {
    float correction[MAX_FUSED_HEADS];
#if HAVE_BF16_DOTS
    if (dots) {
        block_scores_bf16(scores, q, keys, lo, hi, token_stride, block_size, head_dim, nh, scale);
        softmax_update(scores, running_max, running_sum, correction, lo, hi, block_size, nh, soft_cap, slopes,
                       distance0);
        block_values_bf16(acc, scores, correction, values, lo, hi, token_stride, block_size, head_dim, nh);
        return;
    }
#endif
    block_scores(scores, q, keys, lo, hi, token_stride, block_size, head_dim, nh, format);
    softmax_update(scores, running_max, running_sum, correction, lo, hi, block_size, nh, soft_cap, slopes,
                   distance0);
    block_values(acc, scores, correction, values, lo, hi, token_stride, block_size, head_dim, nh, format);
}

/* Query heads [0, num_q) of one request, which read KV heads [kv_first,
 * kv_first + num_q / group).
 * q/o: [num_q, head_dim]; scratch: 2 * num_q * head_dim + num_q * (block_size + 2) floats;
 * stage_blocks: blocks touched at a time when the item covers all KV heads, else 0.
 * Strides count elements; key_cache / value_cache hold them in `format`. */
/* always inlined: each head_dim and format the caller names as a constant gets its own unrolled copy */
static inline __attribute__((always_inline)) void attend_heads(
                         float *restrict o, const float *restrict q, const void *restrict key_cache,
                         const void *restrict value_cache, const int32_t *restrict table, int64_t first,
                         int64_t seq_len, int64_t block_size, int64_t block_stride, int64_t token_stride,
                         int64_t kv_first, int64_t num_q, int64_t group, int64_t head_dim, float scale,
                         float soft_cap, const float *slopes, float *restrict scratch, int64_t stage_blocks,
                         int format, int dots) {
    const int64_t element_bytes = kv_element_bytes(format);
    float *q_scaled = scratch, *acc = q_scaled + num_q * head_dim;
    float *running_max = acc + num_q * head_dim, *running_sum = running_max + num_q;
    float *scores = running_sum + num_q; /* [num_q, block_size] */
    for (int64_t i = 0; i < num_q * head_dim; ++i) acc[i] = 0.0f;
#if HAVE_BF16_DOTS
    if (dots) /* bfloat16, unscaled, in the float32 copy's place (half its size) */
        for (int64_t i = 0; i < num_q * head_dim; i += 16)
            _mm256_storeu_si256((__m256i *)((uint16_t *)q_scaled + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(q + i)));
    else
#endif
        for (int64_t i = 0; i < num_q * head_dim; ++i) q_scaled[i] = q[i] * scale;
    for (int64_t h = 0; h < num_q; ++h) running_max[h] = -INFINITY, running_sum[h] = 0.0f;

    const int64_t first_tile = first - first % block_size;
    for (int64_t tile_start = first_tile; tile_start < seq_len; tile_start += block_size) {
        const int64_t block = table[tile_start / block_size];
        const int64_t lo = tile_start < first ? first - tile_start : 0;
        const int64_t hi = seq_len - tile_start < block_size ? seq_len - tile_start : block_size;
        const void *block_keys = kv_at(key_cache, block * block_stride, format);
        const void *block_values = kv_at(value_cache, block * block_stride, format);
        if (stage_blocks && (tile_start - first_tile) / block_size % stage_blocks == 0)
            for (int64_t b = 0; b < stage_blocks && tile_start + b * block_size < seq_len; ++b) {
                const int64_t offset = table[tile_start / block_size + b] * block_stride;
                touch_block(kv_at(key_cache, offset, format), kv_at(value_cache, offset, format),
                            block_stride * element_bytes);
            }
        for (int64_t h = 0; h < num_q;) {
            /* heads h .. h + nh - 1 share one KV head */
            const int64_t left_in_group = group - h % group; /* 4 splits as 2 + 2, not 3 + 1 */
            const int nh = left_in_group == 4                 ? 2
                           : left_in_group < MAX_FUSED_HEADS ? (int)left_in_group
                                                             : MAX_FUSED_HEADS;
            const int64_t head_start = (kv_first + h / group) * head_dim;
            if (!stage_blocks && h % group == 0 && tile_start + block_size < seq_len) {
                const int64_t next = table[tile_start / block_size + 1] * block_stride + head_start;
                prefetch_rows(kv_at(key_cache, next, format), kv_at(value_cache, next, format), block_size,
                              head_dim * element_bytes, token_stride * element_bytes);
            }
#define ATTEND_BLOCK(NH)                                                                                     \
    attend_block(acc + h * head_dim, running_max + h, running_sum + h, scores + h * block_size,              \
                 dots ? (const void *)((const uint16_t *)q_scaled + h * head_dim)     \
                                             : (const void *)(q_scaled + h * head_dim),                       \
                 kv_at(block_keys, head_start, format), kv_at(block_values, head_start, format), lo, hi,     \
                 token_stride, block_size, head_dim, NH, scale, soft_cap, slopes ? slopes + h : NULL,         \
                 tile_start - (seq_len - 1), format, dots)
            if (nh == MAX_FUSED_HEADS) ATTEND_BLOCK(MAX_FUSED_HEADS);
            else if (nh == 2) ATTEND_BLOCK(2);
            else ATTEND_BLOCK(1);
#undef ATTEND_BLOCK
            h += nh;
        }
    }
    for (int64_t h = 0; h < num_q; ++h) {
        const float inv = 1.0f / running_sum[h];
        for (int64_t d = 0; d < head_dim; ++d) o[h * head_dim + d] = acc[h * head_dim + d] * inv;
    }
}

/* kv_format: KV_FLOAT32, KV_FLOAT16 or KV_BFLOAT16; bf16_queries: nonzero when the
 * float32 queries hold bfloat16 values (a bfloat16 model). Returns 0, or -1 when
 * head_dim is not a multiple of 8 (the caller checks first) or scratch memory
 * cannot be allocated. */
int paged_decode_attention(
    float *restrict out, const float *restrict query, const void *restrict kv_cache, int64_t kv_format,
    const int32_t *restrict block_table, const int64_t *restrict rows, const int64_t *restrict table_rows,
    const int64_t *restrict seq_lens, int64_t num_requests, int64_t num_blocks, int64_t max_blocks,
    int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
    int64_t sliding_window, float soft_cap, const float *restrict alibi_slopes, int64_t bf16_queries) {
    const int64_t group = num_heads / num_kv_heads;
    if (head_dim % 8) return -1;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * token_stride;
    const void *value_cache = kv_at(kv_cache, num_blocks * block_stride, (int)kv_format);

    /* A work item is one request, or one (request, KV head) pair when there are
     * too few requests to keep every thread busy. */
    const int64_t heads_per_item = num_requests >= 4 ? num_kv_heads : 1;
    const int64_t items_per_request = num_kv_heads / heads_per_item;
    const int64_t num_q = heads_per_item * group;
    const int64_t block_bytes = 2 * block_stride * kv_element_bytes((int)kv_format);
    const int64_t stage_blocks = heads_per_item < num_kv_heads ? 0
                                 : STAGE_BYTES / block_bytes > 1 ? STAGE_BYTES / block_bytes : 1;
    const int64_t scratch_floats = 2 * num_q * head_dim + num_q * (block_size + 2);
    int failed = 0;
#pragma omp parallel if (num_requests * items_per_request >= 2)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats);
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_requests * items_per_request; ++item) {
            if (scratch == NULL) continue;
            const int64_t req = item / items_per_request, kv_first = item % items_per_request * heads_per_item;
            const int64_t seq_len = seq_lens[req];
            const int64_t first = sliding_window > 0 && seq_len > sliding_window ? seq_len - sliding_window : 0;
            const int64_t head_offset = (rows[req] * num_heads + kv_first * group) * head_dim;
#define ATTEND(HEAD_DIM, FORMAT)                                                                            \
    attend_heads(out + head_offset, query + head_offset, kv_cache, value_cache,                               \
                 block_table + table_rows[req] * max_blocks, first, seq_len, block_size, block_stride,        \
                 token_stride, kv_first, num_q, group, HEAD_DIM, scale, soft_cap,                             \
                 alibi_slopes ? alibi_slopes + kv_first * group : NULL, scratch, stage_blocks, FORMAT,        \
                 bf16_dots(FORMAT, HEAD_DIM, bf16_queries))
#define ATTEND_FORMAT(HEAD_DIM)                                                                             \
    if (kv_format == KV_FLOAT16) ATTEND(HEAD_DIM, KV_FLOAT16);                                                \
    else ATTEND(HEAD_DIM, KV_FLOAT32)
            /* Constant head_dim: the inner loops unroll. Every copy adds seconds to
             * the one-time build, so bfloat16 (the less common choice) has one. */
            if (kv_format == KV_BFLOAT16) ATTEND(head_dim, KV_BFLOAT16);
            else if (head_dim == 64) ATTEND_FORMAT(64);
            else if (head_dim == 128) ATTEND_FORMAT(128);
            else ATTEND_FORMAT(head_dim);
#undef ATTEND_FORMAT
#undef ATTEND
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
