/* Float dot products for the linear-layer kernels (small_gemm.c, quantized_gemm.c):
 * one row of x against a few consecutive weight rows, 8 floats at a time. */
#ifndef PAGEDLLM_DOTS_H
#define PAGEDLLM_DOTS_H

#include <stdint.h>
#include <string.h>

#define WEIGHT_ROWS 8 /* 8 accumulator chains: enough to hide the FMA latency */

typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p) {
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum8(vec8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* Dot products of x (in floats) with num_rows (<= WEIGHT_ROWS) consecutive weight rows. */
static inline void dots(float *out, const float *x, const float *w, int64_t num_rows, int64_t in) {
    vec8 acc[WEIGHT_ROWS] = {{0}};
    const int64_t vec_end = in - in % 8;
    if (num_rows == WEIGHT_ROWS) { /* the common case, unrolled by the compiler */
        for (int64_t k = 0; k < vec_end; k += 8) {
            const vec8 xv = load8(x + k);
            for (int r = 0; r < WEIGHT_ROWS; ++r) acc[r] += xv * load8(w + r * in + k);
        }
    } else {
        for (int64_t k = 0; k < vec_end; k += 8) {
            const vec8 xv = load8(x + k);
            for (int64_t r = 0; r < num_rows; ++r) acc[r] += xv * load8(w + r * in + k);
        }
    }
    for (int64_t r = 0; r < num_rows; ++r) {
        float s = sum8(acc[r]);
        for (int64_t k = vec_end; k < in; ++k) s += x[k] * w[r * in + k];
        out[r] = s;
    }
}

#endif
