/* The reparameterised samples of Gaussian rows on the CPU: their noise, as a counter-based stream, and
 * the sample and KL of [mean | logvar] rows in one pass each way.
 *
 * Noise: value e of the stream with seed s is one of the two Box-Muller normals of pair e / 2. Pairs come
 * in aligned chunks of CHUNK; a chunk's two 32-bit keys are splitmix64 of (s, chunk), and pair i of the
 * chunk takes its two uniforms from successive rounds of a 32-bit hash (lowbias32) of i under those keys,
 * so the per-value work is 32-bit integer arithmetic that AVX2 vectorises (splitmix64 per pair needs
 * 64-bit products, which AVX2 lacks). A value depends only on (s, e),
 * and a chunk is computed whole by the vector body, never a scalar remainder: any range of a stream
 * gives the same bits as the same range of a longer draw, on one machine (the library is built for the
 * machine's CPU, see native.py, and another instruction set may round differently in the last bit).
 *
 * Sample and KL: the passes over a step's rows are bound by memory traffic, so each pass reads and writes every row once, and writes the sample and KL
 * where the owner sends them from.
 *
 * Loops over chunks and rows run on the threads of torch's OpenMP pool: the library links libgomp.so.1,
 * which resolves to the copy torch has loaded, so no second pool competes with torch's for the cores.
 * Built with -ffast-math, which lets gcc vectorise the row sums.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vecmath.h"

#define CHUNK 256
#define ROWS_PER_TASK 64

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352DU;
    x ^= x >> 15;
    x *= 0x846CA68BU;
    return x ^ (x >> 16);
}

/* The 2 * CHUNK values of chunk `chunk` of stream `seed`, interleaved (cos, sin) into out. */
static void chunk_values(uint64_t seed, int64_t chunk, float *restrict out) {
    const uint64_t key = splitmix64(seed ^ splitmix64((uint64_t)chunk));
    const uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (uint32_t i = 0; i < CHUNK; i++) {
        const uint32_t a = lowbias32(lowbias32(i ^ k0) ^ k1), b = lowbias32(a ^ k0);
        const float radius = sqrtf(-2.0f * log_approx((float)((a >> 8) + 1) * 0x1p-24f)); /* of (0, 1] */
        float cosine, sine;
        turn_approx((float)(b >> 8) * 0x1p-24f, &cosine, &sine);
        out[2 * i] = radius * cosine;
        out[2 * i + 1] = radius * sine;
    }
}

/* Values [first, first + count) of stream `seed` into out[0, count). */
void normal_range(float *out, uint64_t seed, int64_t first, int64_t count) {
    const int64_t span = 2 * CHUNK, last = first + count, lo_chunk = first / span, hi_chunk = (last + span - 1) / span;
#pragma omp parallel for schedule(static) if (count > PARALLEL_MIN)
    for (int64_t chunk = lo_chunk; chunk < hi_chunk; chunk++) {
        const int64_t lo = chunk * span, hi = lo + span;
        if (lo >= first && hi <= last) {
            chunk_values(seed, chunk, out + (lo - first)); /* a whole chunk: straight into place */
            continue;
        }
        float edge[2 * CHUNK];
        chunk_values(seed, chunk, edge);
        const int64_t from = lo > first ? lo : first, to = hi < last ? hi : last;
        memcpy(out + (from - first), edge + (from - lo), (size_t)(to - from) * sizeof(float));
    }
}

/* Row rows[i] of the stream seen as [.., dim] (values [rows[i] * dim, (rows[i] + 1) * dim)) into out[i]. */
void normal_rows(float *out, uint64_t seed, const int64_t *rows, int64_t n, int64_t dim) {
#pragma omp parallel for schedule(static) if (n * dim > PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++)
        normal_range(out + i * dim, seed, rows[i] * dim, dim);
}

/* Rows [lo, hi) of sample_kl_forward. */
static void sample_rows(const float *table, const int64_t *ids, float *rows, const float *eps, float *out, int64_t lo,
                        int64_t hi, int64_t dim) {
    for (int64_t i = lo; i < hi; i++) {
        if (i + PREFETCH_AHEAD < hi) prefetch_row_for_reading(table + 2 * ids[i + PREFETCH_AHEAD] * dim, 2 * dim);
        const float *restrict mean = table + 2 * ids[i] * dim, *restrict logvar = mean + dim, *restrict e = eps + i * dim;
        memcpy(rows + 2 * i * dim, mean, 2 * (size_t)dim * sizeof(float));
        float *restrict sample = out + i * (dim + 1);
        float total = 0.0f;
#pragma omp simd reduction(+ : total) /* under -fopenmp, gcc 12 leaves the reduction scalar without it */
        for (int64_t j = 0; j < dim; j++) {
            const float std = exp_approx(0.5f * logvar[j]);
            sample[j] = mean[j] + std * e[j];
            total += mean[j] * mean[j] + std * std - logvar[j];
        }
        sample[dim] = 0.5f * (total - (float)dim);
    }
}

/* Sample and KL of m rows [mean | logvar]: rows ids[0..m) of `table` [table_rows, 2 * dim], whose noise is
 * values [first, first + m * dim) of stream `seed`. rows [m, 2 * dim] receives the rows (what the backward
 * reads), eps [m, dim] the noise (kept for the backward too), out [m, dim + 1] the sample
 * mean + exp(logvar / 2) * eps and, last, the row's KL to N(0, I), 0.5 * sum(mean^2 + exp(logvar) - logvar - 1).
 * The gather and the sample in one pass, the next rows prefetched, where a gather (index_select) and then
 * a pass over its rows read every row twice and wait on each row's cache misses with nothing to do.
 * Returns 0, or 1 when an id is outside [0, table_rows) (nothing is written then). */
int sample_kl_forward(const float *table, const int64_t *ids, int64_t table_rows, float *rows, float *eps, float *out,
                      int64_t m, int64_t dim, uint64_t seed, int64_t first) {
    if (!ids_in_range(ids, m, table_rows)) return 1;
    normal_range(eps, seed, first, m * dim);
#pragma omp parallel for schedule(static) if (m * dim > PARALLEL_MIN)
    for (int64_t lo = 0; lo < m; lo += ROWS_PER_TASK)
        sample_rows(table, ids, rows, eps, out, lo, lo + ROWS_PER_TASK < m ? lo + ROWS_PER_TASK : m, dim);
    return 0;
}

/* Rows [lo, hi) of sample_kl_backward. */
static void sample_grad_rows(const float *rows, const float *eps, const float *grad_out, float *grad, int64_t lo,
                             int64_t hi, int64_t dim) {
    for (int64_t i = lo; i < hi; i++) {
        const float *restrict mean = rows + 2 * i * dim, *restrict logvar = mean + dim, *restrict e = eps + i * dim;
        const float *restrict g = grad_out + i * (dim + 1);
        const float w = g[dim];
        float *restrict grad_mean = grad + 2 * i * dim, *restrict grad_logvar = grad_mean + dim;
        for (int64_t j = 0; j < dim; j++) {
            const float std = exp_approx(0.5f * logvar[j]);
            grad_mean[j] = g[j] + w * mean[j];
            grad_logvar[j] = 0.5f * std * (g[j] * e[j] + w * std) - 0.5f * w;
        }
    }
}

/* The gradient [m, 2 * dim] of the rows from that of forward's out (grad_out [m, dim + 1]): with g the
 * sample's gradient and w the KL's, d/d mean = g + w * mean and
 * d/d logvar = std * (g * eps + w * std) / 2 - w / 2. */
void sample_kl_backward(const float *rows, const float *eps, const float *grad_out, float *grad, int64_t m,
                        int64_t dim) {
#pragma omp parallel for schedule(static) if (m * dim > PARALLEL_MIN)
    for (int64_t lo = 0; lo < m; lo += ROWS_PER_TASK)
        sample_grad_rows(rows, eps, grad_out, grad, lo, lo + ROWS_PER_TASK < m ? lo + ROWS_PER_TASK : m, dim);
}
