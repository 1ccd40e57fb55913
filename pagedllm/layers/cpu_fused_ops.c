/* Fused elementwise kernels for CPUs, float32: one pass over memory where the
 * PyTorch expressions they replace make 3-6 (each op reads and writes the whole
 * activation). Rows are independent and split among the OpenMP threads.
 * Sums of squares accumulate in double, as exact as the torch reference. */
#include <math.h>
#include <stdint.h>

#define PARALLEL_MIN_ELEMENTS 16384 /* below this, threads cost more than they save */

/* out[r] = x[r] / rms(x[r]) * (weight + weight_offset). x, out: [rows, dim]. */
void rms_norm_f32(float *restrict out, const float *restrict x, const float *restrict weight, int64_t rows,
                  int64_t dim, float eps, float weight_offset) {
#pragma omp parallel for if (rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * dim;
        double sum = 0.0;
        for (int64_t i = 0; i < dim; ++i) sum += (double)xr[i] * xr[i];
        const float inv_rms = 1.0f / sqrtf((float)(sum / dim) + eps);
        for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = xr[i] * inv_rms * (weight[i] + weight_offset);
    }
}

/* In place: residual += x, then x = rms_norm(residual). x, residual: [rows, dim]. */
void add_rms_norm_f32(float *restrict x, float *restrict residual, const float *restrict weight, int64_t rows,
                      int64_t dim, float eps, float weight_offset) {
#pragma omp parallel for if (rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r) {
        float *xr = x + r * dim, *rr = residual + r * dim;
        double sum = 0.0;
        for (int64_t i = 0; i < dim; ++i) {
            rr[i] += xr[i];
            sum += (double)rr[i] * rr[i];
        }
        const float inv_rms = 1.0f / sqrtf((float)(sum / dim) + eps);
        for (int64_t i = 0; i < dim; ++i) xr[i] = rr[i] * inv_rms * (weight[i] + weight_offset);
    }
}

/* out[r, i] = silu(x[r, i]) * x[r, d + i]. x: [rows, 2d] (gate | up), out: [rows, d]. */
void silu_and_mul_f32(float *restrict out, const float *restrict x, int64_t rows, int64_t d) {
#pragma omp parallel for if (rows * d >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r) {
        const float *gate = x + r * 2 * d, *up = gate + d;
        for (int64_t i = 0; i < d; ++i) out[r * d + i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* Rotary embedding in place, "rotate half" layout: for each token t and head h,
 * the first rotary_dim features (x1 | x2) become (x1 cos - x2 sin | x2 cos + x1 sin)
 * at position positions[t]. x: [tokens, heads, head_dim] with row stride
 * row_stride (q and k are column slices of the fused QKV output);
 * cos/sin: [max_position, rotary_dim]. */
void rotary_f32(float *restrict x, int64_t row_stride, int64_t tokens, int64_t heads, int64_t head_dim,
                int64_t rotary_dim, const int64_t *restrict positions, const float *restrict cos_cache,
                const float *restrict sin_cache) {
    const int64_t half = rotary_dim / 2;
#pragma omp parallel for if (tokens * heads * rotary_dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *cos = cos_cache + positions[t] * rotary_dim, *sin = sin_cache + positions[t] * rotary_dim;
        for (int64_t h = 0; h < heads; ++h) {
            float *v = x + t * row_stride + h * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * cos[i] - x2 * sin[i];
                v[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
            }
        }
    }
}
