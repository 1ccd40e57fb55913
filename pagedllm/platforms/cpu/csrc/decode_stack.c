/* Every decoder layer of a Llama-shaped model for one decode step, in one call.
 *
 * A batch-1 decode step of SmolLM2-135M with GGUF weights spent 25 ms in its 30
 * layers on a 2-core AVX2 EPYC, of which the kernels were ~10 ms: the rest was Python
 * between them (~60 tensor and ctypes operations a layer, ~8 us each: views, casts,
 * argument checks and conversions). This file runs the same kernels in the same order
 * with the same arguments as the layers do (models/llama.py), so its results are bit
 * for bit theirs; only the Python between them is gone.
 *
 * Per layer, for rows decode tokens (one per request), all float32:
 *     x = rms_norm(residual)            (layer 0; residual = the embeddings)
 *     x = rms_norm(residual += x)       (later layers: x = the previous MLP output)
 *     qkv = x @ Wqkv^T (+ b)            [rows, (H + 2 Hkv) D]
 *     (Qwen3: q, k = rms_norm of each head)
 *     rotate q and k; write k and v into the layer's KV blocks
 *     attn = decode_attention(q)        [rows, H D]
 *     x = attn @ Wo^T (+ b); x = rms_norm(residual += x)
 *     x = (silu(gate) * up)(x @ Wgate_up^T) @ Wdown^T
 * and the caller adds and norms the last x into the final hidden states.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* One linear layer: a float32 matrix (the small-batch GEMM) or GGUF 32-value blocks in
 * row segments (the int8 GEMM; the fields are gguf_gemm_int8's). */
typedef struct {
    const float *dense; /* [out, in], or NULL: the segments below */
    int64_t num_segments;
    const uint8_t *const *segments;
    const int64_t *row_bytes, *types, *first_rows, *num_rows;
    const float *bias; /* [out] or NULL */
    int64_t out;
} StackLinear;

typedef struct {
    StackLinear qkv, o, gate_up, down;
    const float *input_norm, *post_norm; /* [hidden] */
    const float *q_norm, *k_norm;        /* [D]: Qwen3's per-head norms of q and k before RoPE, or NULL */
    void *kv_cache;                      /* float32 [2, num_blocks, block_size, Hkv, D] */
    int64_t sliding_window;              /* 0: none */
} StackLayer;

typedef struct {
    int64_t num_layers, hidden, intermediate, num_heads, num_kv_heads, head_dim, rotary_dim;
    int64_t num_blocks, block_size;
    float eps, norm_offset, scale;
    const float *cos_cache, *sin_cache; /* [positions, rotary_dim]; NULL: no rotary */
    const StackLayer *layers;
} Stack;

static int linear(const StackLinear *l, float *y, const float *x, int64_t rows, int64_t in) {
    if (l->dense != NULL) {
        small_gemm_f32(y, x, in, l->dense, l->bias, rows, in, l->out);
        return 0;
    }
    return gguf_gemm_int8(y, l->out, x, in, l->num_segments, l->segments, l->row_bytes, l->types, l->first_rows,
                          l->num_rows, l->bias, rows, in);
}

/* x [rows, hidden]: out, the last layer's MLP output; residual [rows, hidden]: in, the
 * embeddings, out, the residual stream before the final norm. positions, slots: [rows];
 * block_table [.., max_blocks] and the request arrays as paged_decode_attention takes
 * them. Returns 0, -1 when a kernel refuses its arguments, -2 when out of memory. */
int decode_stack_f32(const Stack *s, float *restrict x, float *restrict residual, int64_t rows,
                     const int64_t *positions, const int64_t *slots, const int32_t *block_table, int64_t max_blocks,
                     const int64_t *query_rows, const int64_t *table_rows, const int64_t *seq_lens) {
    const int64_t q_size = s->num_heads * s->head_dim, kv_size = s->num_kv_heads * s->head_dim;
    const int64_t qkv_out = q_size + 2 * kv_size;
    float *qkv = malloc(sizeof(float) * rows * (qkv_out + 2 * q_size + kv_size + 3 * s->intermediate));
    if (qkv == NULL) return -2;
    float *query = qkv + rows * qkv_out, *attn = query + rows * q_size, *key = attn + rows * q_size;
    float *gate_up = key + rows * kv_size, *act = gate_up + rows * 2 * s->intermediate;
    int status = 0;
    for (int64_t i = 0; i < s->num_layers && status == 0; ++i) {
        const StackLayer *layer = s->layers + i;
        if (i == 0) rms_norm_f32(x, residual, layer->input_norm, rows, s->hidden, s->eps, s->norm_offset);
        else add_rms_norm_f32(x, residual, layer->input_norm, rows, s->hidden, s->eps, s->norm_offset);
        if ((status = linear(&layer->qkv, qkv, x, rows, s->hidden))) break;
        /* q and k: rotated in place as QKV columns, or normed per head into their own rows first */
        float *q = qkv, *k = qkv + q_size;
        int64_t q_stride = qkv_out, k_stride = qkv_out;
        if (layer->q_norm != NULL) {
            for (int64_t r = 0; r < rows; ++r) {
                rms_norm_f32(query + r * q_size, qkv + r * qkv_out, layer->q_norm, s->num_heads, s->head_dim, s->eps,
                             s->norm_offset);
                rms_norm_f32(key + r * kv_size, qkv + r * qkv_out + q_size, layer->k_norm, s->num_kv_heads,
                             s->head_dim, s->eps, s->norm_offset);
            }
            q = query, k = key, q_stride = q_size, k_stride = kv_size;
        }
        if (s->cos_cache != NULL) {
            rotary_f32(q, q_stride, rows, s->num_heads, s->head_dim, s->rotary_dim, positions, s->cos_cache,
                       s->sin_cache);
            rotary_f32(k, k_stride, rows, s->num_kv_heads, s->head_dim, s->rotary_dim, positions, s->cos_cache,
                       s->sin_cache);
        }
        write_kv(layer->kv_cache, (const char *)k, (const char *)(qkv + q_size + kv_size), slots, rows,
                 kv_size * (int64_t)sizeof(float), k_stride * (int64_t)sizeof(float),
                 qkv_out * (int64_t)sizeof(float), s->num_blocks * s->block_size);
        if (layer->q_norm == NULL)
            for (int64_t r = 0; r < rows; ++r) memcpy(query + r * q_size, qkv + r * qkv_out, sizeof(float) * q_size);
        if ((status = paged_decode_attention(attn, query, layer->kv_cache, 0 /* KV_FLOAT32 */, block_table,
                                             query_rows, table_rows, seq_lens, rows, s->num_blocks, max_blocks,
                                             s->block_size, s->num_heads, s->num_kv_heads, s->head_dim, s->scale,
                                             layer->sliding_window, 0.0f, NULL, 0)))
            break;
        if ((status = linear(&layer->o, x, attn, rows, q_size))) break;
        add_rms_norm_f32(x, residual, layer->post_norm, rows, s->hidden, s->eps, s->norm_offset);
        if ((status = linear(&layer->gate_up, gate_up, x, rows, s->hidden))) break;
        silu_and_mul_f32(act, gate_up, rows, s->intermediate);
        status = linear(&layer->down, x, act, rows, s->intermediate);
    }
    free(qkv);
    return status;
}
