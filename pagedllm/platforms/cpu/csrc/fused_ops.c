/* Fused elementwise kernels for CPUs, float32 and bfloat16: one pass over memory
 * where the PyTorch expressions they replace make 3-6 (each op reads and writes
 * the whole activation; in bfloat16 each also converts to float32 and back).
 * Rows are independent and split among the OpenMP threads. Arithmetic is in
 * float32 whatever the storage (sums of squares in double, as exact as the torch
 * reference); bfloat16 results are rounded once, to nearest even, as torch rounds.
 * Each kernel is written once (DEFINE_* below) and instantiated per storage type:
 * name_f32 takes float, name_bf16 takes bfloat16 bit patterns (uint16_t). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define PARALLEL_MIN_ELEMENTS 16384 /* below this, threads cost more than they save */

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 cast; NaN stays a (quiet) NaN. */
static inline bf16 f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16)(bits >> 16);
}

#define LOAD_f32(p, i) ((p)[i])
#define STORE_f32(p, i, v) ((p)[i] = (v))
#define LOAD_bf16(p, i) bf16_to_f32((p)[i])
#define STORE_bf16(p, i, v) ((p)[i] = f32_to_bf16(v))

/* out[r] = x[r] / rms(x[r]) * (weight + weight_offset). x, out: [rows, dim]. */
#define DEFINE_RMS_NORM(S, T)                                                                                    \
    void rms_norm_##S(T *restrict out, const T *restrict x, const T *restrict weight, int64_t rows, int64_t dim, \
                      float eps, float weight_offset) {                                                          \
        _Pragma("omp parallel for if (rows * dim >= PARALLEL_MIN_ELEMENTS)")                                     \
        for (int64_t r = 0; r < rows; ++r) {                                                                     \
            const T *xr = x + r * dim;                                                                           \
            double sum = 0.0;                                                                                    \
            for (int64_t i = 0; i < dim; ++i) sum += (double)LOAD_##S(xr, i) * LOAD_##S(xr, i);                  \
            const float inv_rms = 1.0f / sqrtf((float)(sum / dim) + eps);                                        \
            for (int64_t i = 0; i < dim; ++i)                                                                    \
                STORE_##S(out, r * dim + i, LOAD_##S(xr, i) * inv_rms * (LOAD_##S(weight, i) + weight_offset));  \
        }                                                                                                        \
    }

/* In place: residual += x (rounded to T, as the torch add), then x = rms_norm(residual).
 * x, residual: [rows, dim]. */
#define DEFINE_ADD_RMS_NORM(S, T)                                                                                \
    void add_rms_norm_##S(T *restrict x, T *restrict residual, const T *restrict weight, int64_t rows,           \
                          int64_t dim, float eps, float weight_offset) {                                         \
        _Pragma("omp parallel for if (rows * dim >= PARALLEL_MIN_ELEMENTS)")                                     \
        for (int64_t r = 0; r < rows; ++r) {                                                                     \
            T *xr = x + r * dim, *rr = residual + r * dim;                                                       \
            double sum = 0.0;                                                                                    \
            for (int64_t i = 0; i < dim; ++i) {                                                                  \
                STORE_##S(rr, i, LOAD_##S(rr, i) + LOAD_##S(xr, i));                                             \
                sum += (double)LOAD_##S(rr, i) * LOAD_##S(rr, i);                                                \
            }                                                                                                    \
            const float inv_rms = 1.0f / sqrtf((float)(sum / dim) + eps);                                        \
            for (int64_t i = 0; i < dim; ++i)                                                                    \
                STORE_##S(xr, i, LOAD_##S(rr, i) * inv_rms * (LOAD_##S(weight, i) + weight_offset));             \
        }                                                                                                        \
    }

/* out[r, i] = silu(x[r, i]) * x[r, d + i]. x: [rows, 2d] (gate | up), out: [rows, d]. */
#define DEFINE_SILU_AND_MUL(S, T)                                                                                \
    void silu_and_mul_##S(T *restrict out, const T *restrict x, int64_t rows, int64_t d) {                       \
        _Pragma("omp parallel for if (rows * d >= PARALLEL_MIN_ELEMENTS)")                                       \
        for (int64_t r = 0; r < rows; ++r) {                                                                     \
            const T *gate = x + r * 2 * d, *up = gate + d;                                                       \
            for (int64_t i = 0; i < d; ++i) {                                                                    \
                const float g = LOAD_##S(gate, i);                                                               \
                STORE_##S(out, r * d + i, g / (1.0f + expf(-g)) * LOAD_##S(up, i));                              \
            }                                                                                                    \
        }                                                                                                        \
    }

/* Rotary embedding in place, "rotate half" layout: for each token t and head h,
 * the first rotary_dim features (x1 | x2) become (x1 cos - x2 sin | x2 cos + x1 sin)
 * at position positions[t]. x: [tokens, heads, head_dim] with row stride
 * row_stride (q and k are column slices of the fused QKV output);
 * cos/sin: [max_position, rotary_dim] float32 whatever T is. */
#define DEFINE_ROTARY(S, T)                                                                                      \
    void rotary_##S(T *restrict x, int64_t row_stride, int64_t tokens, int64_t heads, int64_t head_dim,          \
                    int64_t rotary_dim, const int64_t *restrict positions, const float *restrict cos_cache,      \
                    const float *restrict sin_cache) {                                                           \
        const int64_t half = rotary_dim / 2;                                                                     \
        _Pragma("omp parallel for if (tokens * heads * rotary_dim >= PARALLEL_MIN_ELEMENTS)")                    \
        for (int64_t t = 0; t < tokens; ++t) {                                                                   \
            const float *cos = cos_cache + positions[t] * rotary_dim;                                            \
            const float *sin = sin_cache + positions[t] * rotary_dim;                                            \
            for (int64_t h = 0; h < heads; ++h) {                                                                \
                T *v = x + t * row_stride + h * head_dim;                                                        \
                for (int64_t i = 0; i < half; ++i) {                                                             \
                    const float x1 = LOAD_##S(v, i), x2 = LOAD_##S(v, i + half);                                 \
                    STORE_##S(v, i, x1 * cos[i] - x2 * sin[i]);                                                  \
                    STORE_##S(v, i + half, x2 * cos[i + half] + x1 * sin[i + half]);                             \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }

#define DEFINE_FUSED_OPS(S, T) DEFINE_RMS_NORM(S, T) DEFINE_ADD_RMS_NORM(S, T) DEFINE_SILU_AND_MUL(S, T) \
    DEFINE_ROTARY(S, T)

DEFINE_FUSED_OPS(f32, float)
DEFINE_FUSED_OPS(bf16, bf16)
