/* The log-partition of the 1-vs-all likelihood on the CPU: log sum_c exp(logit_c) per query over a
 * [queries, candidates] block, and its backward, softmax times the query's gradient.
 *
 * torch's path (log_softmax, then exp and a product in the backward) makes five passes over the logits,
 * which are the largest tensor of a 1-vs-all step, and its exp takes MKL's generic path on AMD CPUs.
 * Here the forward reads the logits twice (torch's max, then this sum) and the backward once. Rows run on torch's OpenMP threads (see noise.c). Built without
 * -ffast-math: a NaN logit gives a NaN log-partition, as in torch.
 */
#include <stdint.h>

#include "vecmath.h"

/* out[i] = sum_j exp(x[i, j] - shift[i]) for x [rows, n]. */
void row_sum_exp(const float *x, const float *shift, float *out, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > PARALLEL_MIN)
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict row = x + i * n;
        const float s = shift[i];
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; j++) total += exp_approx(row[j] - s);
        out[i] = total;
    }
}

/* out[i, j] = exp(x[i, j] - log_z[i]) * scale[i]: each row's softmax times that row's gradient. */
void softmax_scale(const float *x, const float *log_z, const float *scale, float *out, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > PARALLEL_MIN)
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict row = x + i * n;
        float *restrict dst = out + i * n;
        const float z = log_z[i], g = scale[i];
#pragma omp simd
        for (int64_t j = 0; j < n; j++) dst[j] = exp_approx(row[j] - z) * g;
    }
}
