/* Row kernels for the CPU: lazy Adam and row-wise Adagrad applied in place to the rows a step touched,
 * the owner's merge of the gradient rows its requesters sent back (merge_rows), the distinct ids of a
 * step's batch (unique_ids) and their per-occurrence KL weights (occurrence_weights).
 *
 * Built on first use by sharding/kernels/native.py and called through ctypes with the tensors' data pointers;
 * torch ops do the same work where these are not available (another device, no C compiler).
 * In place, each row is read and written once, where gather -> update -> scatter makes three passes
 * over three tables. Inner loops vectorise for the machine's CPU (native.py builds with -march=native);
 * rows are split over torch's OpenMP threads (see noise.c). Measurements: docs/kernels.md.
 * The updates return 0, or 1 when an id is outside [0, rows) (nothing is written then).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vecmath.h"

/* Runs merge_rows takes at most (one per requester and data stream): it scans every run's head for each
 * row it writes, so many more runs are better served by a sort (the caller's torch path). */
#define MERGE_MAX_RUNS 64

/* Lazy Adam (torch.optim.Adam's update) on rows ids[0..n) of param, exp_avg, exp_avg_sq [rows, width],
 * with grad [n, width]; step_size = lr / (1 - beta1^t), inv_sqrt_bias2 = 1 / sqrt(1 - beta2^t), and
 * w1 = 1 - beta1, w2 = 1 - beta2 come from the caller in double precision: 1 - 0.999f in float is off
 * by 1.3e-5, which the bias correction would then not cancel. */
int row_adam(float *param, float *exp_avg, float *exp_avg_sq, const int64_t *ids, const float *grad, int64_t n,
             int64_t rows, int64_t width, float step_size, float inv_sqrt_bias2, float w1, float beta2, float w2,
             float eps) {
    if (!ids_in_range(ids, n, rows)) return 1;
#pragma omp parallel for schedule(static) if (n * width > PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) {
            const int64_t ahead = ids[i + PREFETCH_AHEAD] * width;
            prefetch_row(param + ahead, width);
            prefetch_row(exp_avg + ahead, width);
            prefetch_row(exp_avg_sq + ahead, width);
        }
        const int64_t offset = ids[i] * width;
        adam_row(param + offset, exp_avg + offset, exp_avg_sq + offset, grad + i * width, width, step_size,
                 inv_sqrt_bias2, w1, beta2, w2, eps);
    }
    return 0;
}

/* Row-wise Adagrad (PyTorch-BigGraph's) on rows ids[0..n) of param [rows, width], whose `parts` equal
 * parts each keep one accumulator in sum_sq [rows, parts]: the part's mean squared gradient is added to
 * it, and the part moves by -lr * g / (sqrt(accumulator) + eps). */
int row_adagrad(float *param, float *sum_sq, const int64_t *ids, const float *grad, int64_t n, int64_t rows,
                int64_t width, int64_t parts, float lr, float eps) {
    if (!ids_in_range(ids, n, rows)) return 1;
#pragma omp parallel for schedule(static) if (n * width > PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) prefetch_row(param + ids[i + PREFETCH_AHEAD] * width, width);
        adagrad_row(param + ids[i] * width, sum_sq + ids[i] * parts, grad + i * width, width, parts, lr, eps);
    }
    return 0;
}

/* The owner's sum of the gradient rows its requesters sent back: k runs of row ids, each strictly
 * ascending (one requester's sorted distinct ids), merged into the ascending distinct ids with the sum of
 * each id's rows. runs [k, 3] holds each run's (address of its ids, address of its grad rows [len, width],
 * len); out_ids [total len] and out_grad [total len, width] receive the result. Rows of one id are added
 * in run order (0 + the first, then +=), as torch's cat -> unique -> index_add_ adds them.
 * One pass over the rows where cat -> sort -> index_add_ makes three and a sort. Returns the number of
 * distinct ids, or -1 when a run is not strictly ascending (out_* then hold nothing useful). */
int64_t merge_rows(const int64_t *runs, int64_t k, int64_t width, int64_t *out_ids, float *out_grad) {
    if (k > MERGE_MAX_RUNS) return -1;
    for (int64_t r = 0; r < k; r++) {
        const int64_t *ids = (const int64_t *)(intptr_t)runs[3 * r];
        for (int64_t i = 1; i < runs[3 * r + 2]; i++)
            if (ids[i] <= ids[i - 1]) return -1;
    }
    int64_t cursor[MERGE_MAX_RUNS];
    for (int64_t r = 0; r < k; r++) cursor[r] = 0;
    int64_t m = 0;
    for (;;) {
        int64_t best = -1, best_id = 0;
        for (int64_t r = 0; r < k; r++) {
            if (cursor[r] == runs[3 * r + 2]) continue;
            const int64_t id = ((const int64_t *)(intptr_t)runs[3 * r])[cursor[r]];
            if (best < 0 || id < best_id) best = r, best_id = id; /* ties: the earlier run first */
        }
        if (best < 0) return m;
        const float *restrict g = (const float *)(intptr_t)runs[3 * best + 1] + cursor[best] * width;
        cursor[best]++;
        if (m > 0 && out_ids[m - 1] == best_id) {
            float *restrict dst = out_grad + (m - 1) * width;
            for (int64_t j = 0; j < width; j++) dst[j] += g[j];
        } else {
            float *restrict dst = out_grad + m * width;
            for (int64_t j = 0; j < width; j++) dst[j] = 0.0f + g[j]; /* as index_add_ into zeros: -0 -> +0 */
            out_ids[m++] = best_id;
        }
    }
}

/* The ascending distinct ids of ids[0..n) (out_ids) and each position's index among them (inverse [n]),
 * what torch.unique(ids, return_inverse=True) gives, by an LSD radix sort of (id - min, position) packed
 * in one 64-bit key: a step's few thousand ids in tens of microseconds, where torch's sort-based unique
 * took ~0.2 ms inside a training step. Returns the number of distinct ids, or -1 when an id is negative,
 * the keys would not fit 64 bits or no work buffer can be had (the caller then uses torch). */
int64_t unique_ids(const int64_t *ids, int64_t n, int64_t *out_ids, int64_t *inverse) {
    if (n <= 0) return n == 0 ? 0 : -1;
    int64_t lo = ids[0], hi = ids[0];
    for (int64_t i = 1; i < n; i++) {
        lo = ids[i] < lo ? ids[i] : lo;
        hi = ids[i] > hi ? ids[i] : hi;
    }
    if (lo < 0) return -1; /* and so hi - lo cannot overflow */
    int position_bits = 0, id_bits = 0;
    while (position_bits < 63 && ((int64_t)1 << position_bits) < n) position_bits++;
    while (id_bits < 63 && ((uint64_t)1 << id_bits) <= (uint64_t)(hi - lo)) id_bits++;
    if (position_bits + id_bits > 63) return -1;
    uint64_t *keys = malloc(2 * (size_t)n * sizeof(uint64_t));
    if (keys == NULL) return -1;
    uint64_t *other = keys + n;
    for (int64_t i = 0; i < n; i++) keys[i] = (uint64_t)(ids[i] - lo) << position_bits | (uint64_t)i;
    enum { DIGIT = 11, BUCKETS = 1 << DIGIT };
    /* The positions are distinct and already in order: only the id bits need sorting (a stable sort keeps
     * the positions of one id ascending). */
    for (int shift = position_bits; shift < position_bits + id_bits; shift += DIGIT) {
        int64_t count[BUCKETS] = {0};
        for (int64_t i = 0; i < n; i++) count[(keys[i] >> shift) & (BUCKETS - 1)]++;
        int64_t start = 0;
        for (int b = 0; b < BUCKETS; b++) {
            const int64_t c = count[b];
            count[b] = start;
            start += c;
        }
        for (int64_t i = 0; i < n; i++) other[count[(keys[i] >> shift) & (BUCKETS - 1)]++] = keys[i];
        uint64_t *swap = keys;
        keys = other;
        other = swap;
    }
    const uint64_t position_mask = ((uint64_t)1 << position_bits) - 1;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t id = (int64_t)(keys[i] >> position_bits) + lo;
        if (m == 0 || out_ids[m - 1] != id) out_ids[m++] = id;
        inverse[keys[i] & position_mask] = m - 1;
    }
    free(keys < other ? keys : other);
    return m;
}

/* The per-occurrence KL weight of each of a batch's m distinct entities: weights[u] = c_u / divisor[ids[u]],
 * c_u the number of positions p < counted with inverse[p] = u (a batch's heads and tails) and divisor the
 * entities' training frequencies (integers in double), in float32: what torch's bincount, gather, conversions
 * and division give, bit for bit (a count is exact in float32, a frequency is rounded to float32 once, and the
 * division is rounded alike), in one call where those are five operations after the step's largest kernel.
 * Returns 0, 1 when a position or an id is outside its range (nothing is written then), or -1 when no work
 * buffer can be had. */
int occurrence_weights(const int64_t *inverse, int64_t counted, const int64_t *ids, int64_t m, const double *divisor,
                       int64_t divisor_rows, float *weights) {
    if (!ids_in_range(inverse, counted, m) || !ids_in_range(ids, m, divisor_rows)) return 1;
    int64_t *counts = calloc((size_t)(m > 0 ? m : 1), sizeof(int64_t));
    if (counts == NULL) return -1;
    for (int64_t p = 0; p < counted; p++) counts[inverse[p]]++;
    for (int64_t u = 0; u < m; u++) weights[u] = (float)counts[u] / (float)divisor[ids[u]];
    free(counts);
    return 0;
}
