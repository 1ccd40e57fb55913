/* Writes new tokens' K and V rows into their KV-cache slots.
 *
 * torch's index_copy_ moved these rows at ~0.6 GB/s (2048 prompt tokens: 2.6 ms
 * per layer and K or V); one memcpy per row, rows split among the threads, is
 * bandwidth-bound. The rows are already in the cache's dtype (the caller casts).
 *
 * key/value: [num_tokens, row_bytes] rows at key_stride / value_stride bytes
 * (slices of the QKV projection); kv_cache: [2, num_slots, row_bytes] (K then V,
 * slot = block * block_size + offset); slots[t] is token t's slot.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define PARALLEL_MIN_TOKENS 64 /* below this, threads cost more than they save */

void write_kv(char *restrict kv_cache, const char *restrict key, const char *restrict value,
              const int64_t *restrict slots, int64_t num_tokens, int64_t row_bytes, int64_t key_stride,
              int64_t value_stride, int64_t num_slots) {
    char *restrict value_cache = kv_cache + num_slots * row_bytes;
#pragma omp parallel for if (num_tokens >= PARALLEL_MIN_TOKENS)
    for (int64_t t = 0; t < num_tokens; ++t) {
        memcpy(kv_cache + slots[t] * row_bytes, key + t * key_stride, (size_t)row_bytes);
        memcpy(value_cache + slots[t] * row_bytes, value + t * value_stride, (size_t)row_bytes);
    }
}
