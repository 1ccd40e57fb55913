/* Paged decode attention for CPUs, float32.
 *
 * One query token per request attends over the request's whole context, read
 * in place from the KV blocks through its block table (no gather). Work items
 * are (request, KV head) pairs; each loads a key once for all query heads of
 * its group (GQA), so K and V are each read exactly once.
 *
 * kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V)
 * query/out: [num_tokens, num_heads, head_dim]; rows[i] is request i's query row
 * block_table: [num_table_rows, max_blocks]; table_rows[i] is request i's row
 * seq_lens[i]: tokens in request i's context (its query is the last one)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_GROUP 64

void paged_decode_attention_f32(
    float *restrict out, const float *restrict query, const float *restrict kv_cache,
    const int32_t *restrict block_table, const int64_t *restrict rows, const int64_t *restrict table_rows,
    const int64_t *restrict seq_lens, int64_t num_requests, int64_t num_blocks, int64_t max_blocks,
    int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
    int64_t sliding_window, float soft_cap, const float *restrict alibi_slopes) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * token_stride;
    const float *value_cache = kv_cache + num_blocks * block_stride;

#pragma omp parallel for schedule(dynamic, 1) if (num_requests * num_kv_heads >= 8)
    for (int64_t item = 0; item < num_requests * num_kv_heads; ++item) {
        const int64_t req = item / num_kv_heads, kv_head = item % num_kv_heads;
        const int64_t seq_len = seq_lens[req], query_pos = seq_len - 1;
        const int32_t *table = block_table + table_rows[req] * max_blocks;
        const float *q = query + (rows[req] * num_heads + kv_head * group) * head_dim;
        float *o = out + (rows[req] * num_heads + kv_head * group) * head_dim;
        const int64_t first = sliding_window > 0 && seq_len > sliding_window ? seq_len - sliding_window : 0;
        const int64_t num_keys = seq_len - first;
        /* Two passes: scores of every key (pass 1), then the softmax-weighted sum
         * of values (pass 2). K and V are each read once; no rescaling per key. */
        float *scores = malloc(sizeof(float) * group * num_keys);
        float max_score[MAX_GROUP], inv_sum[MAX_GROUP];
        for (int64_t g = 0; g < group; ++g) max_score[g] = -INFINITY;
        for (int64_t pos = first; pos < seq_len; ++pos) {
            const float *k = kv_cache + (int64_t)table[pos / block_size] * block_stride
                             + (pos % block_size) * token_stride + kv_head * head_dim;
            for (int64_t g = 0; g < group; ++g) {
                const float *qg = q + g * head_dim;
                float dot = 0.0f;
                for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * k[d];
                float s = dot * scale;
                if (soft_cap > 0.0f) s = soft_cap * tanhf(s / soft_cap);
                if (alibi_slopes) s += alibi_slopes[kv_head * group + g] * (float)(pos - query_pos);
                scores[g * num_keys + pos - first] = s;
                if (s > max_score[g]) max_score[g] = s;
            }
        }
        for (int64_t g = 0; g < group; ++g) {
            float sum = 0.0f, *sg = scores + g * num_keys;
            for (int64_t j = 0; j < num_keys; ++j) {
                sg[j] = expf(sg[j] - max_score[g]);
                sum += sg[j];
            }
            inv_sum[g] = 1.0f / sum;
            for (int64_t d = 0; d < head_dim; ++d) o[g * head_dim + d] = 0.0f;
        }
        for (int64_t pos = first; pos < seq_len; ++pos) {
            const float *v = value_cache + (int64_t)table[pos / block_size] * block_stride
                             + (pos % block_size) * token_stride + kv_head * head_dim;
            for (int64_t g = 0; g < group; ++g) {
                const float weight = scores[g * num_keys + pos - first] * inv_sum[g];
                float *og = o + g * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) og[d] += weight * v[d];
            }
        }
        free(scores);
    }
}
