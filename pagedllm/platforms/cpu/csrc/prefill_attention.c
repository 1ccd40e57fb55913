/* Causal attention for the prompt tokens of a step (whole prompts or chunks of
 * them), reading K/V in place from the paged cache: a tiled, flash-style kernel.
 *
 * A work item is (request, KV head, tile of query tokens): the tile's queries of
 * every query head in that KV group -- up to LANES query vectors, e.g. 10 tokens
 * x 3 heads -- are computed together, each one a lane of the vectors (WIDTH). The
 * item walks the keys 16 at a time (KEYS per chunk, converted to float32 once
 * for all its lanes), with an online softmax (running max and sum per lane), so
 * nothing grows with the context:
 *   scores  S[j] (one vector over the lanes) = sum_d K[j][d] * QT[d]
 *   weights P[j] = exp(S[j] - max), masked where key j lies after a lane's token
 *   output  OT[d] = OT[d] * correction + sum_j P[j] * V[j][d]
 * Queries and outputs are kept transposed (QT, OT: [head_dim][lanes]), so every
 * multiply-add broadcasts one K or V element against a vector of lanes: no
 * horizontal sums and no transposed copy of K. Compared with torch's flash SDPA
 * on one layer of a 288-token prompt (9 query / 3 KV heads of 64, 2 cores,
 * bfloat16): see the commit that added this file for the figures.
 *
 * query/out: [num_tokens, num_heads, head_dim] float32 (out may be written in any order)
 * kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] in kv_format
 * request r: query rows [q_starts[r], q_starts[r] + q_lens[r]); its context has
 *   seq_lens[r] tokens (this chunk's K/V already written), so query token i of the
 *   chunk sits at position seq_lens[r] - q_lens[r] + i and attends keys [0, position].
 * block_table: [num_table_rows, max_blocks]; table_rows[r] is request r's row.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kv_elements.h"

/* One vector of lanes: 16 floats with AVX-512, 8 elsewhere. (GCC lowers comparisons,
 * selects and conversions of 16-float vectors to scalar code lane by lane on AVX2:
 * one layer of a 7 x 288-token float32 prefill took 380 ms there, ten times torch's
 * SDPA, before the vectors were made as wide as the registers.) */
#if defined(__AVX512F__)
#define WIDTH 16
#else
#define WIDTH 8
#endif
#define LANES 32 /* query vectors of one work item: LANES / WIDTH vectors */
#define NV (LANES / WIDTH)
#define KEYS 16 /* keys per chunk */
#define NO_SCORE (-1e30f) /* "minus infinity" that survives -ffast-math */
/* dims of the output per pass of the P.V product: 4 x NV accumulators fit AVX-512's 32
 * registers, 2 x NV AVX2's 16 */
#define DIMS_PER_PASS (WIDTH == 16 ? 4 : 2)

typedef float vecf __attribute__((vector_size(WIDTH * 4)));
typedef int32_t veci __attribute__((vector_size(WIDTH * 4)));

static inline vecf loadv(const float *p) {
    vecf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storev(float *p, vecf v) { memcpy(p, &v, sizeof v); }

static inline vecf splatv(float x) { return (vecf){0} + x; }

/* mask ? a : b, lane by lane (mask lanes are all ones or all zeros). */
static inline vecf selectv(veci mask, vecf a, vecf b) {
    veci ia, ib;
    memcpy(&ia, &a, sizeof ia), memcpy(&ib, &b, sizeof ib);
    const veci r = (mask & ia) | (~mask & ib);
    vecf out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline vecf maxv(vecf a, vecf b) { return selectv(a > b, a, b); }

/* exp(x) for x <= 0 (Cephes' expf polynomial, relative error ~1e-7): 2^n * p(r) with
 * r = x - n ln 2; inputs below -87 give ~0, which is what a masked score needs. */
static inline vecf expv(vecf x) {
    x = maxv(x, splatv(-87.0f));
    const vecf fx = x * 1.44269504088896341f + 0.5f;
    veci n = __builtin_convertvector(fx, veci); /* truncates toward zero */
    vecf nf = __builtin_convertvector(n, vecf);
    const veci too_big = nf > fx; /* floor for negative values */
    n += too_big, nf = __builtin_convertvector(n, vecf);
    x = x - nf * 0.693359375f - nf * -2.12194440e-4f;
    const vecf z = x * x;
    vecf y = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x + 4.1665795894e-2f) * x
              + 1.6666665459e-1f) * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    const veci bits = (n + 127) << 23;
    vecf scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* Eight elements of a K/V row, as floats (a row is head_dim elements, a multiple of 8). */
static inline void row_to_float(float *dst, const void *row, int64_t head_dim, int format) {
    for (int64_t d = 0; d < head_dim; d += 8) store8(dst + d, load_kv8(kv_at(row, d, format), format));
}

/* A tile's running softmax state per lane vector: each lane's position (lanes past
 * the tile attend everything; their output is dropped), max and sum. */
static inline void start_tile(vecf *positions, vecf *running_max, vecf *running_sum, int64_t num_lanes,
                              int64_t first_position, int64_t group) {
    float position_of[LANES];
    for (int64_t lane = 0; lane < LANES; ++lane)
        position_of[lane] = lane < num_lanes ? (float)(first_position + lane / group) : 1e9f;
    for (int v = 0; v < NV; ++v)
        positions[v] = loadv(position_of + WIDTH * v), running_max[v] = splatv(NO_SCORE), running_sum[v] = splatv(0);
}

/* Opens a chunk for lane vector v: the causal mask over its scores (only chunks reaching
 * past the tile's first token need it), in place; the running max raised to the chunk's;
 * what was summed so far (the running sum and OT's lanes, OT [head_dim][LANES]) rescaled
 * by exp(old max - new max). Returns the new max, which the caller takes the chunk's
 * weights against and adds them to *running_sum. */
static inline vecf open_chunk(vecf scores[KEYS][NV], int v, int64_t num_keys, int64_t chunk,
                              int64_t first_position, vecf positions, vecf *running_max, vecf *running_sum,
                              float *ot, int64_t head_dim) {
    const int masked = chunk + num_keys - 1 > first_position;
    vecf chunk_max = *running_max;
    for (int64_t j = 0; j < num_keys; ++j) {
        if (masked)
            scores[j][v] = selectv(splatv((float)(chunk + j)) > positions, splatv(NO_SCORE), scores[j][v]);
        chunk_max = maxv(chunk_max, scores[j][v]);
    }
    const vecf correction = expv(*running_max - chunk_max);
    *running_max = chunk_max, *running_sum *= correction;
    for (int64_t d = 0; d < head_dim; ++d)
        storev(ot + d * LANES + WIDTH * v, loadv(ot + d * LANES + WIDTH * v) * correction);
    return chunk_max;
}

/* Output rows of the tile's lanes: OT [head_dim][LANES] divided by each lane's sum. */
static inline void finish_tile(float *restrict out, const float *restrict ot, const vecf *running_sum,
                               int64_t num_lanes, int64_t first_row, int64_t num_heads, int64_t kv_head,
                               int64_t group, int64_t head_dim) {
    float inverse[LANES];
    for (int v = 0; v < NV; ++v) storev(inverse + WIDTH * v, 1.0f / running_sum[v]);
    for (int64_t lane = 0; lane < num_lanes; ++lane) {
        const int64_t row = (first_row + lane / group) * num_heads + kv_head * group + lane % group;
        for (int64_t d = 0; d < head_dim; ++d) out[row * head_dim + d] = ot[d * LANES + lane] * inverse[lane];
    }
}

/* One work item. scratch: head_dim * LANES * 2 (QT, OT) + 2 * KEYS * head_dim (K, V)
 * + KEYS * LANES (P) floats. */
static void attend_tile(float *restrict out, const float *restrict query, const void *restrict key_cache,
                        const void *restrict value_cache, const int32_t *restrict table, int64_t first_row,
                        int64_t first_position, int64_t num_tokens, int64_t kv_head, int64_t group,
                        int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t block_stride,
                        int64_t token_stride, float scale, float *restrict scratch, int format) {
    const int64_t num_lanes = num_tokens * group; /* lane = token * group + head in group */
    float *qt = scratch, *ot = qt + head_dim * LANES;
    float *keys = ot + head_dim * LANES, *values = keys + KEYS * head_dim, *p = values + KEYS * head_dim;
    for (int64_t d = 0; d < head_dim; ++d)
        for (int64_t lane = 0; lane < LANES; ++lane) {
            const int64_t row = (first_row + lane / group) * num_heads + kv_head * group + lane % group;
            qt[d * LANES + lane] = lane < num_lanes ? query[row * head_dim + d] * scale : 0.0f;
            ot[d * LANES + lane] = 0.0f;
        }
    vecf positions[NV], running_max[NV], running_sum[NV];
    start_tile(positions, running_max, running_sum, num_lanes, first_position, group);

    const int64_t last_key = first_position + num_tokens - 1;
    for (int64_t chunk = 0; chunk <= last_key; chunk += KEYS) {
        const int64_t num_keys = last_key + 1 - chunk < KEYS ? last_key + 1 - chunk : KEYS;
        for (int64_t j = 0; j < num_keys; ++j) {
            const int64_t key = chunk + j;
            const int64_t offset = table[key / block_size] * block_stride + key % block_size * token_stride
                                   + kv_head * head_dim;
            row_to_float(keys + j * head_dim, kv_at(key_cache, offset, format), head_dim, format);
            row_to_float(values + j * head_dim, kv_at(value_cache, offset, format), head_dim, format);
        }
        /* Scores, two keys at a time: 2 x NV accumulators, each K element broadcast once per vector. */
        vecf scores[KEYS][NV];
        for (int64_t j = 0; j < num_keys; j += 2) {
            const int pair = j + 1 < num_keys;
            vecf a0[NV] = {{0}}, a1[NV] = {{0}};
            const float *k0 = keys + j * head_dim, *k1 = k0 + head_dim;
            for (int64_t d = 0; d < head_dim; ++d) {
                const float kd0 = k0[d], kd1 = pair ? k1[d] : 0.0f;
                for (int v = 0; v < NV; ++v) {
                    const vecf q = loadv(qt + d * LANES + WIDTH * v);
                    a0[v] += kd0 * q, a1[v] += kd1 * q;
                }
            }
            for (int v = 0; v < NV; ++v) {
                scores[j][v] = a0[v];
                if (pair) scores[j + 1][v] = a1[v];
            }
        }
        /* Causal mask, online softmax. */
        for (int v = 0; v < NV; ++v) {
            const vecf chunk_max = open_chunk(scores, v, num_keys, chunk, first_position, positions[v],
                                              &running_max[v], &running_sum[v], ot, head_dim);
            for (int64_t j = 0; j < num_keys; ++j) {
                const vecf weight = expv(scores[j][v] - chunk_max);
                storev(p + j * LANES + WIDTH * v, weight);
                running_sum[v] += weight;
            }
        }
        /* Weighted values, DIMS_PER_PASS dims at a time: each V element broadcast against P's vectors. */
        for (int64_t d = 0; d < head_dim; d += DIMS_PER_PASS) {
            vecf acc[DIMS_PER_PASS][NV];
            for (int e = 0; e < DIMS_PER_PASS; ++e)
                for (int v = 0; v < NV; ++v) acc[e][v] = loadv(ot + (d + e) * LANES + WIDTH * v);
            for (int64_t j = 0; j < num_keys; ++j) {
                const float *vj = values + j * head_dim + d;
                for (int v = 0; v < NV; ++v) {
                    const vecf weight = loadv(p + j * LANES + WIDTH * v);
                    for (int e = 0; e < DIMS_PER_PASS; ++e) acc[e][v] += vj[e] * weight;
                }
            }
            for (int e = 0; e < DIMS_PER_PASS; ++e)
                for (int v = 0; v < NV; ++v) storev(ot + (d + e) * LANES + WIDTH * v, acc[e][v]);
        }
    }
    finish_tile(out, ot, running_sum, num_lanes, first_row, num_heads, kv_head, group, head_dim);
}

#if HAVE_BF16_DOTS
/* The bits of x rounded to bfloat16 (to nearest even). */
static inline uint32_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u + 0x7fffu + (u >> 16 & 1u)) >> 16;
}

/* Sixteen lanes of two weight vectors as bfloat16 pairs (w0[l], w1[l]); *rounded0 and
 * *rounded1 get the weights as rounded. */
static inline __m512i weight_pairs(vecf w0, vecf w1, vecf *rounded0, vecf *rounded1) {
    const __m512i b0 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)w0));
    const __m512i b1 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)w1));
    *rounded0 = (vecf)_mm512_slli_epi32(b0, 16), *rounded1 = (vecf)_mm512_slli_epi32(b1, 16);
    return _mm512_or_si512(b0, _mm512_slli_epi32(b1, 16));
}

/* attend_tile for a bfloat16 model over a bfloat16 cache, head_dim a multiple of
 * 32, on a CPU with AVX512-BF16: both products by vdpbf16ps, which multiplies two
 * dims of 16 lanes (pairs of bfloat16, summed in float32) per instruction.
 *   scores: the queries are held as pairs QP[d/2][lane] = (q[d], q[d+1]) and a
 *     key's pair (k[d], k[d+1]) is broadcast straight from the cache (never widened);
 *   values: the weights are rounded to bfloat16 pairs PP[j/2][lane] = (p[j], p[j+1]),
 *     as flash attention rounds P for its P.V product (the running sum adds the
 *     rounded weights, so they still sum to one), against value pairs
 *     VP[j/2][d] = (v_j[d], v_j+1[d]) interleaved once per chunk.
 * Same work item and scratch as attend_tile. */
static void attend_tile_bf16(float *restrict out, const float *restrict query, const uint16_t *restrict key_cache,
                             const uint16_t *restrict value_cache, const int32_t *restrict table,
                             int64_t first_row, int64_t first_position, int64_t num_tokens, int64_t kv_head,
                             int64_t group, int64_t num_heads, int64_t head_dim, int64_t block_size,
                             int64_t block_stride, int64_t token_stride, float scale, float *restrict scratch) {
    const int64_t num_lanes = num_tokens * group; /* lane = token * group + head in group */
    uint32_t *qp = (uint32_t *)scratch;                     /* [head_dim / 2][LANES] */
    float *ot = scratch + head_dim * LANES;                 /* [head_dim][LANES] */
    uint32_t *vp = (uint32_t *)(ot + head_dim * LANES);     /* [KEYS / 2][head_dim], see below */
    uint32_t *pp = vp + KEYS / 2 * head_dim;                /* [KEYS / 2][LANES] */
    for (int64_t lane = 0; lane < LANES; ++lane) {
        const float *q = query + ((first_row + lane / group) * num_heads + kv_head * group + lane % group) * head_dim;
        for (int64_t d = 0; d < head_dim; d += 2)
            qp[d / 2 * LANES + lane] = lane < num_lanes ? bf16_bits(q[d]) | bf16_bits(q[d + 1]) << 16 : 0;
        for (int64_t d = 0; d < head_dim; ++d) ot[d * LANES + lane] = 0.0f;
    }
    vecf positions[NV], running_max[NV], running_sum[NV];
    start_tile(positions, running_max, running_sum, num_lanes, first_position, group);

    const int64_t last_key = first_position + num_tokens - 1;
    for (int64_t chunk = 0; chunk <= last_key; chunk += KEYS) {
        const int64_t num_keys = last_key + 1 - chunk < KEYS ? last_key + 1 - chunk : KEYS;
        const uint16_t *key_row[KEYS], *value_row[KEYS]; /* keys past num_keys repeat the first: loads stay valid */
        for (int64_t j = 0; j < KEYS; ++j) {
            const int64_t key = chunk + (j < num_keys ? j : 0);
            const int64_t offset = table[key / block_size] * block_stride + key % block_size * token_stride
                                   + kv_head * head_dim;
            key_row[j] = key_cache + offset, value_row[j] = value_cache + offset;
        }
        /* Scores, eight keys at a time: 8 x NV accumulators. */
        vecf scores[KEYS][NV];
        for (int64_t g = 0; g < num_keys; g += 8) {
            __m512 acc[8][NV];
            for (int k = 0; k < 8; ++k)
                for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_setzero_ps();
            for (int64_t d = 0; d < head_dim; d += 2) {
                __m512bh q[NV];
                for (int v = 0; v < NV; ++v) q[v] = (__m512bh)_mm512_loadu_si512(qp + d / 2 * LANES + WIDTH * v);
                for (int k = 0; k < 8; ++k) {
                    uint32_t pair;
                    memcpy(&pair, key_row[g + k] + d, sizeof pair);
                    const __m512bh kd = (__m512bh)_mm512_set1_epi32((int)pair);
                    for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_dpbf16_ps(acc[k][v], q[v], kd);
                }
            }
            for (int k = 0; k < 8; ++k)
                for (int v = 0; v < NV; ++v) scores[g + k][v] = (vecf)acc[k][v] * scale;
        }
        /* Value pairs: per 32 dims, unpacking rows j and j + 1 leaves, in each 128-bit
         * lane c, the pairs of dims 8c..8c+3 (first 16 entries) and 8c+4..8c+7 (last 16). */
        const int64_t num_pairs = (num_keys + 1) / 2;
        for (int64_t jp = 0; jp < num_pairs; ++jp)
            for (int64_t d = 0; d < head_dim; d += 32) {
                const __m512i a = _mm512_loadu_si512(value_row[2 * jp] + d);
                const __m512i b = 2 * jp + 1 < num_keys ? _mm512_loadu_si512(value_row[2 * jp + 1] + d)
                                                        : _mm512_setzero_si512();
                _mm512_storeu_si512(vp + jp * head_dim + d, _mm512_unpacklo_epi16(a, b));
                _mm512_storeu_si512(vp + jp * head_dim + d + 16, _mm512_unpackhi_epi16(a, b));
            }
        /* Causal mask, online softmax; the weights go out as bfloat16 pairs. */
        for (int v = 0; v < NV; ++v) {
            const vecf chunk_max = open_chunk(scores, v, num_keys, chunk, first_position, positions[v],
                                              &running_max[v], &running_sum[v], ot, head_dim);
            for (int64_t jp = 0; jp < num_pairs; ++jp) {
                const vecf w0 = expv(scores[2 * jp][v] - chunk_max);
                const vecf w1 = 2 * jp + 1 < num_keys ? expv(scores[2 * jp + 1][v] - chunk_max) : splatv(0);
                vecf r0, r1;
                _mm512_storeu_si512(pp + jp * LANES + WIDTH * v, weight_pairs(w0, w1, &r0, &r1));
                running_sum[v] += r0 + r1;
            }
        }
        /* Weighted values, eight dims at a time: each value pair broadcast against PP's vectors. */
        for (int64_t d = 0; d < head_dim; d += 8) {
            __m512 acc[8][NV];
            for (int e = 0; e < 8; ++e)
                for (int v = 0; v < NV; ++v) acc[e][v] = _mm512_loadu_ps(ot + (d + e) * LANES + WIDTH * v);
            /* where dims d..d+7 sit among their 32-dim group's pairs (see above) */
            const int64_t group_start = d - d % 32, c = d % 32 / 8;
            for (int64_t jp = 0; jp < num_pairs; ++jp) {
                __m512bh w[NV];
                for (int v = 0; v < NV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(pp + jp * LANES + WIDTH * v);
                const uint32_t *pairs = vp + jp * head_dim + group_start + 4 * c;
                for (int e = 0; e < 8; ++e) {
                    const __m512bh vd = (__m512bh)_mm512_set1_epi32((int)pairs[e < 4 ? e : 16 + e - 4]);
                    for (int v = 0; v < NV; ++v) acc[e][v] = _mm512_dpbf16_ps(acc[e][v], w[v], vd);
                }
            }
            for (int e = 0; e < 8; ++e)
                for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ot + (d + e) * LANES + WIDTH * v, acc[e][v]);
        }
    }
    finish_tile(out, ot, running_sum, num_lanes, first_row, num_heads, kv_head, group, head_dim);
}
#endif

/* bf16_queries: nonzero when the float32 queries hold bfloat16 values (a bfloat16
 * model), which with a bfloat16 cache selects attend_tile_bf16 where the CPU has it.
 * Returns 0, or -1 when head_dim is not a multiple of 8, a KV group has more than
 * LANES query heads (the caller checks both first) or memory cannot be allocated. */
int paged_prefill_attention(float *restrict out, const float *restrict query, const void *restrict kv_cache,
                            int64_t kv_format, const int32_t *restrict block_table, const int64_t *restrict q_starts,
                            const int64_t *restrict q_lens, const int64_t *restrict table_rows,
                            const int64_t *restrict seq_lens, int64_t num_requests, int64_t num_blocks,
                            int64_t max_blocks, int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, float scale, int64_t bf16_queries) {
    const int64_t group = num_heads / num_kv_heads;
    if (head_dim % 8 || group > LANES) return -1;
    const int64_t tile_tokens = LANES / group;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * token_stride;
    const void *value_cache = kv_at(kv_cache, num_blocks * block_stride, (int)kv_format);
    int64_t num_tiles = 0;
    for (int64_t r = 0; r < num_requests; ++r) num_tiles += (q_lens[r] + tile_tokens - 1) / tile_tokens;
    int64_t *tile_request = malloc(sizeof(int64_t) * 2 * (num_tiles ? num_tiles : 1));
    if (tile_request == NULL) return -1;
    int64_t *tile_first = tile_request + num_tiles;
    for (int64_t r = 0, t = 0; r < num_requests; ++r)
        for (int64_t first = 0; first < q_lens[r]; first += tile_tokens) tile_request[t] = r, tile_first[t++] = first;
    const int64_t scratch_floats = 2 * head_dim * LANES + 2 * KEYS * head_dim + KEYS * LANES;
    int failed = 0;
#pragma omp parallel if (num_tiles * num_kv_heads >= 2)
    {
        float *scratch = aligned_alloc(64, sizeof(float) * ((scratch_floats + 15) / 16 * 16));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        /* Later tiles see more keys: taking them first evens out the threads' shares. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = num_tiles * num_kv_heads - 1; item >= 0; --item) {
            if (scratch == NULL) continue;
            const int64_t tile = item / num_kv_heads, kv_head = item % num_kv_heads, r = tile_request[tile];
            const int64_t first = tile_first[tile];
            const int64_t num_tokens = q_lens[r] - first < tile_tokens ? q_lens[r] - first : tile_tokens;
#if HAVE_BF16_DOTS
            if (kv_format == KV_BFLOAT16 && head_dim % 32 == 0 && bf16_queries) {
                attend_tile_bf16(out, query, kv_cache, value_cache, block_table + table_rows[r] * max_blocks,
                                 q_starts[r] + first, seq_lens[r] - q_lens[r] + first, num_tokens, kv_head, group,
                                 num_heads, head_dim, block_size, block_stride, token_stride, scale, scratch);
                continue;
            }
#endif
            attend_tile(out, query, kv_cache, value_cache, block_table + table_rows[r] * max_blocks,
                        q_starts[r] + first, seq_lens[r] - q_lens[r] + first, num_tokens, kv_head, group, num_heads,
                        head_dim, block_size, block_stride, token_stride, scale, scratch, (int)kv_format);
        }
        free(scratch);
    }
    free(tile_request);
    return failed ? -1 : 0;
}
