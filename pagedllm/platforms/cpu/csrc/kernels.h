/* The kernels one C file calls from another (decode_stack.c runs a model's layers
 * through them); each defining file includes this header, so the compiler checks that
 * the two agree. Arguments are documented at the definitions. */
#ifndef PAGEDLLM_KERNELS_H
#define PAGEDLLM_KERNELS_H

#include <stdint.h>

void rms_norm_f32(float *restrict out, const float *restrict x, const float *restrict weight, int64_t rows,
                  int64_t dim, float eps, float weight_offset);
void add_rms_norm_f32(float *restrict x, float *restrict residual, const float *restrict weight, int64_t rows,
                      int64_t dim, float eps, float weight_offset);
void silu_and_mul_f32(float *restrict out, const float *restrict x, int64_t rows, int64_t d);
void rotary_f32(float *restrict x, int64_t row_stride, int64_t tokens, int64_t heads, int64_t head_dim,
                int64_t rotary_dim, const int64_t *restrict positions, const float *restrict cos_cache,
                const float *restrict sin_cache);
void small_gemm_f32(float *restrict y, const float *restrict x, int64_t x_stride, const float *restrict w,
                    const float *restrict bias, int64_t rows, int64_t in, int64_t out);
int gguf_gemm_int8(float *restrict y, int64_t y_stride, const float *restrict x, int64_t x_stride,
                   int64_t num_segments, const uint8_t *const *w, const int64_t *row_bytes, const int64_t *types,
                   const int64_t *first_rows, const int64_t *num_rows, const float *restrict bias, int64_t rows,
                   int64_t in);
void write_kv(char *restrict kv_cache, const char *restrict key, const char *restrict value,
              const int64_t *restrict slots, int64_t num_tokens, int64_t row_bytes, int64_t key_stride,
              int64_t value_stride, int64_t num_slots);
int paged_decode_attention(float *restrict out, const float *restrict query, const void *restrict kv_cache,
                           int64_t kv_format, const int32_t *restrict block_table, const int64_t *restrict rows,
                           const int64_t *restrict table_rows, const int64_t *restrict seq_lens,
                           int64_t num_requests, int64_t num_blocks, int64_t max_blocks, int64_t block_size,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                           int64_t sliding_window, float soft_cap, const float *restrict alibi_slopes,
                           int64_t bf16_queries);

#endif
