/* What the CPU kernels share: when a loop goes parallel, the check and the prefetch of a table's rows, and
 * single-precision exp, log and (cos, sin) of a turn as inline polynomials.
 *
 * Cephes' coefficients, about 1 ulp on their reduced ranges; inline so that gcc vectorises the loops
 * that call them (faster than glibc's libmvec, which gcc under -fopenmp may also replace by libm's scalar
 * expf; see docs/kernels.md).
 */
#ifndef NVKG_VECMATH_H
#define NVKG_VECMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Elements of work below which a loop stays on one thread: waking a second costs more than it saves. */
#define PARALLEL_MIN 32768

/* Rows are scattered over tables far larger than the caches: asking for the row PREFETCH_AHEAD ids on
 * while working on this one hides part of the cache misses of the next rows. */
#define PREFETCH_AHEAD 2

static inline void prefetch_row(const float *row, int64_t width) { /* to update it */
    for (int64_t j = 0; j < width; j += 64 / (int64_t)sizeof(float)) __builtin_prefetch(row + j, 1);
}

static inline void prefetch_row_for_reading(const float *row, int64_t width) {
    for (int64_t j = 0; j < width; j += 64 / (int64_t)sizeof(float)) __builtin_prefetch(row + j, 0);
}

/* Lazy Adam (torch.optim.Adam's update) of one row's `width` numbers p with its moments m, v and gradient g:
 * step_size = lr / (1 - beta1^t), inv_sqrt_bias2 = 1 / sqrt(1 - beta2^t), w1 = 1 - beta1, w2 = 1 - beta2
 * (see rows.c's row_adam; noise.c's sample_kl_update applies it too). */
static inline void adam_row(float *restrict p, float *restrict m, float *restrict v, const float *restrict g,
                            int64_t width, float step_size, float inv_sqrt_bias2, float w1, float beta2, float w2,
                            float eps) {
    for (int64_t j = 0; j < width; j++) {
        const float mj = m[j] + w1 * (g[j] - m[j]); /* lerp, as torch */
        const float vj = beta2 * v[j] + w2 * g[j] * g[j];
        m[j] = mj;
        v[j] = vj;
        p[j] -= step_size * mj / (sqrtf(vj) * inv_sqrt_bias2 + eps);
    }
}

/* Row-wise Adagrad (PyTorch-BigGraph's) of one row p of `parts` equal parts of a row of `width`, each with
 * its accumulator acc[k]: the part's mean squared gradient is added to it, and the part moves by
 * -lr * g / (sqrt(accumulator) + eps) (see rows.c's row_adagrad). */
static inline void adagrad_row(float *restrict p, float *restrict acc, const float *restrict g, int64_t width,
                               int64_t parts, float lr, float eps) {
    const int64_t part = width / parts;
    for (int64_t k = 0; k < parts; k++) {
        float *restrict pk = p + k * part;
        const float *restrict gk = g + k * part;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t j = 0; j < part; j++) squares += gk[j] * gk[j];
        acc[k] += squares / (float)part;
        const float step = lr / (sqrtf(acc[k]) + eps);
        for (int64_t j = 0; j < part; j++) pk[j] -= step * gk[j];
    }
}

/* Whether every id of ids[0..n) is a row of a table of `rows` rows: checked before a kernel writes anything. */
static inline int ids_in_range(const int64_t *ids, int64_t n, int64_t rows) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows) return 0;
    return 1;
}

static inline float from_bits(uint32_t bits) {
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline uint32_t to_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

/* exp(x), x clamped to [-87, 88] (a NaN stays NaN): 2^n * exp(f) with |f| <= ln(2) / 2. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    return (p * f * f + f + 1.0f) * from_bits((uint32_t)((int32_t)n + 127) << 23);
}

/* log(u) for normal u > 0: e * ln(2) + log(m) with m in [sqrt(1/2), sqrt(2)). */
static inline float log_approx(float u) {
    const uint32_t bits = to_bits(u);
    float e = (float)((int32_t)(bits >> 23) - 126);
    float m = from_bits((bits & 0x807FFFFFU) | 0x3F000000U); /* [1/2, 1) */
    const int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
    return m + y + 0.693359375f * e;
}

/* (cos, sin) of 2 pi v for v in [0, 1): the quadrant q = round(4 v) and t = (4 v - q) pi / 2 in [-pi/4, pi/4]. */
static inline void turn_approx(float v, float *cos_out, float *sin_out) {
    const float w = 4.0f * v, q = floorf(w + 0.5f);
    const float t = (w - q) * 1.57079632679489662f, t2 = t * t;
    const float s = t + t * t2 * (-1.6666654611e-1f + t2 * (8.3321608736e-3f + t2 * -1.9515295891e-4f));
    const float c = 1.0f - 0.5f * t2 +
                    t2 * t2 * (4.166664568298827e-2f + t2 * (-1.388731625493765e-3f + t2 * 2.443315711809948e-5f));
    const int quadrant = (int)q;
    const float sine = quadrant & 1 ? c : s, cosine = quadrant & 1 ? s : c;
    *sin_out = quadrant & 2 ? -sine : sine;
    *cos_out = (quadrant + 1) & 2 ? -cosine : cosine;
}

#endif
