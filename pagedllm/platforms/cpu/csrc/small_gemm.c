/* y = x @ w^T (+ bias) for few rows of x, float32: decode steps of small batches.
 *
 * With few rows a linear layer only streams its weights, once per step, and the
 * step waits on memory. oneDNN's and MKL's kernels reach 4-12 GB/s on such
 * shapes on a 2-core AVX2 EPYC (their blocking is built for many rows); walking
 * each weight row once, in address order, and reusing it from L1 for every row of
 * x reaches 13-19 GB/s: a batch-1 decode step of SmolLM2-135M read its 537 MB
 * of weights in 29 ms instead of 43 ms, and 16 rows in 62 ms instead of 91.
 *
 * x: [rows, in] (row stride x_stride), w: [out, in], bias: [out] or NULL,
 * y: [rows, out]. Output columns are split among the OpenMP threads.
 */
#include "dots.h"
#include "kernels.h"

void small_gemm_f32(float *restrict y, const float *restrict x, int64_t x_stride, const float *restrict w,
                    const float *restrict bias, int64_t rows, int64_t in, int64_t out) {
    const int64_t num_tiles = (out + WEIGHT_ROWS - 1) / WEIGHT_ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
        const int64_t first = tile * WEIGHT_ROWS;
        const int64_t num_rows = out - first < WEIGHT_ROWS ? out - first : WEIGHT_ROWS;
        float result[WEIGHT_ROWS];
        for (int64_t m = 0; m < rows; ++m) { /* the tile's weights stay in L1 across the rows of x */
            dots(result, x + m * x_stride, w + first * in, num_rows, in);
            for (int64_t r = 0; r < num_rows; ++r) y[m * out + first + r] = result[r] + (bias ? bias[first + r] : 0.0f);
        }
    }
}
