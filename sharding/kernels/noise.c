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
 * Sample and KL: the passes over a step's rows are bound by memory traffic, so each pass reads and writes
 * every row once, and writes the sample and KL where the owner sends them from. The backward, the merge of
 * the requests' rows and the row optimiser's update are one pass too (sample_kl_update).
 *
 * Loops over chunks and rows run on the threads of torch's OpenMP pool: the library links libgomp.so.1,
 * which resolves to the copy torch has loaded, so no second pool competes with torch's for the cores.
 * Built with -ffast-math, which lets gcc vectorise the row sums.
 */
#include <math.h>
#include <omp.h>
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
        if (rows) memcpy(rows + 2 * i * dim, mean, 2 * (size_t)dim * sizeof(float));
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
 * values [first, first + m * dim) of stream `seed`. eps [m, dim] receives the noise (kept for the backward),
 * out [m, dim + 1] the sample mean + exp(logvar / 2) * eps and, last, the row's KL to N(0, I),
 * 0.5 * sum(mean^2 + exp(logvar) - logvar - 1), and rows [m, 2 * dim], unless NULL, a copy of the rows: the
 * backward and the one-pass update read them in the table, so only a caller that sends the means on asks.
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

/* The gradient of one row [mean | logvar] (as the forward read it) from its noise e [dim] and its output's
 * gradient g [dim + 1] (the sample's, then the KL's w): d/d mean = g + w * mean and
 * d/d logvar = std * (g * eps + w * std) / 2 - w / 2, into grad [2 * dim]: set, or added (in the order of
 * the calls: sample_kl_update sums a row's requests). */
static inline __attribute__((always_inline)) void form_row_gradient(const float *restrict row, const float *restrict e,
                                                                    const float *restrict g, int64_t dim,
                                                                    float *restrict grad, int add) {
    const float w = g[dim];
    for (int64_t j = 0; j < dim; j++) {
        const float std = exp_approx(0.5f * row[dim + j]);
        const float mean_grad = g[j] + w * row[j], logvar_grad = 0.5f * std * (g[j] * e[j] + w * std) - 0.5f * w;
        grad[j] = add ? grad[j] + mean_grad : 0.0f + mean_grad;
        grad[dim + j] = add ? grad[dim + j] + logvar_grad : 0.0f + logvar_grad;
    }
}

/* Rows [lo, hi) of sample_kl_backward. */
static void sample_grad_rows(const float *table, const int64_t *ids, const float *eps, const float *grad_out,
                             float *grad, int64_t lo, int64_t hi, int64_t dim) {
    for (int64_t i = lo; i < hi; i++) {
        if (i + PREFETCH_AHEAD < hi) prefetch_row_for_reading(table + 2 * ids[i + PREFETCH_AHEAD] * dim, 2 * dim);
        form_row_gradient(table + 2 * ids[i] * dim, eps + i * dim, grad_out + i * (dim + 1), dim, grad + 2 * i * dim,
                          0);
    }
}

/* The gradient [m, 2 * dim] of rows ids[0..m) of `table` (as sample_kl_forward read them: nothing changes a
 * row between a step's forward and its backward) from that of forward's out (grad_out [m, dim + 1]), row by
 * row as form_row_gradient gives it. The ids were checked by the forward. */
void sample_kl_backward(const float *table, const int64_t *ids, const float *eps, const float *grad_out, float *grad,
                        int64_t m, int64_t dim) {
#pragma omp parallel for schedule(static) if (m * dim > PARALLEL_MIN)
    for (int64_t lo = 0; lo < m; lo += ROWS_PER_TASK)
        sample_grad_rows(table, ids, eps, grad_out, grad, lo, lo + ROWS_PER_TASK < m ? lo + ROWS_PER_TASK : m, dim);
}

/* Rows' gradients wider than this are not formed on the stack by sample_kl_update (the caller then
 * forms them with sample_kl_backward); more runs than SAMPLED_MAX_RUNS go to the caller too (the merge
 * scans every run's head for each row, as rows.c's merge_rows). */
#define FUSED_MAX_WIDTH 4096
#define SAMPLED_MAX_RUNS 64
#define SAMPLED_MAX_THREADS 256

/* The row optimiser sample_kl_update applies: rows.c's row_adagrad (state: the accumulators [rows, parts];
 * hyper: lr, eps) or row_adam (state: exp_avg, exp_avg_sq [rows, width]; hyper: step_size,
 * inv_sqrt_bias2, w1, beta2, w2, eps, as row_adam takes them). */
enum { UPDATE_ADAGRAD = 0, UPDATE_ADAM = 1 };

typedef struct {
    int64_t width, parts;
    float *state0, *state1;
    const float *hyper;
} RowUpdate;

/* Row `id` (at `row`) moved by its gradient grad [width], as row_adagrad or row_adam would move it (the
 * update of one row is vecmath.h's, shared with rows.c). Inlined into loops specialised for each kind, so
 * each kind's loops vectorise as rows.c's do. */
static inline __attribute__((always_inline)) void update_row(const RowUpdate *u, int64_t kind, int64_t id,
                                                             float *restrict row, const float *restrict grad) {
    const float *h = u->hyper;
    if (kind == UPDATE_ADAGRAD)
        adagrad_row(row, u->state0 + id * u->parts, grad, u->width, u->parts, h[0], h[1]);
    else
        adam_row(row, u->state0 + id * u->width, u->state1 + id * u->width, grad, u->width, h[0], h[1], h[2], h[3],
                 h[4], h[5]);
}

static inline __attribute__((always_inline)) void prefetch_update(const RowUpdate *u, int64_t kind, float *table,
                                                                  int64_t id) {
    prefetch_row(table + id * u->width, u->width);
    if (kind == UPDATE_ADAM) {
        prefetch_row(u->state0 + id * u->width, u->width);
        prefetch_row(u->state1 + id * u->width, u->width);
    }
}

/* The first position of ids[0..n) (ascending) holding an id >= id. */
static int64_t lower_bound(const int64_t *ids, int64_t n, int64_t id) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (ids[mid] < id) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Rows with ids in [lo, hi) of several ascending runs (see sample_kl_update): merged in id order, each
 * row's gradient summed over the runs that hold it in run order, then applied. Their ids go to out_ids;
 * returns how many. */
static inline __attribute__((always_inline)) int64_t merge_and_update(const RowUpdate *u, int64_t kind, float *table,
                                                                       const int64_t *runs, int64_t k, int64_t dim,
                                                                       int64_t lo, int64_t hi, int64_t *out_ids) {
    int64_t cursor[SAMPLED_MAX_RUNS], end[SAMPLED_MAX_RUNS], m = 0;
    for (int64_t r = 0; r < k; r++) {
        const int64_t *ids = (const int64_t *)(intptr_t)runs[4 * r];
        cursor[r] = lower_bound(ids, runs[4 * r + 3], lo);
        end[r] = lower_bound(ids, runs[4 * r + 3], hi);
        for (int64_t c = cursor[r]; c < end[r] && c < cursor[r] + PREFETCH_AHEAD; c++)
            prefetch_update(u, kind, table, ids[c]);
    }
    float grad[FUSED_MAX_WIDTH];
    for (;;) {
        int64_t id = -1;
        for (int64_t r = 0; r < k; r++) {
            if (cursor[r] == end[r]) continue;
            const int64_t head = ((const int64_t *)(intptr_t)runs[4 * r])[cursor[r]];
            id = id < 0 || head < id ? head : id;
        }
        if (id < 0) return m;
        float *restrict row = table + id * u->width;
        int formed = 0;
        for (int64_t r = 0; r < k; r++) { /* every run whose head is this id, in run order */
            const int64_t c = cursor[r];
            if (c == end[r] || ((const int64_t *)(intptr_t)runs[4 * r])[c] != id) continue;
            const float *e = (const float *)(intptr_t)runs[4 * r + 1] + c * dim;
            const float *g = (const float *)(intptr_t)runs[4 * r + 2] + c * (dim + 1);
            form_row_gradient(row, e, g, dim, grad, formed++);
            /* Ascending ids far apart defeat the hardware's prefetcher: each run asks for its row
             * PREFETCH_AHEAD on, as the one-run loop does (without, two workers' owners updated their half
             * of the rows about as slowly as one worker all of them). */
            const int64_t ahead = ++cursor[r] + PREFETCH_AHEAD - 1;
            if (ahead < end[r]) prefetch_update(u, kind, table, ((const int64_t *)(intptr_t)runs[4 * r])[ahead]);
        }
        update_row(u, kind, id, row, grad);
        out_ids[m++] = id;
    }
}

/* One run's rows (distinct ids) split over the threads by position: formed and updated. */
static inline __attribute__((always_inline)) void update_one_run(const RowUpdate *u, int64_t kind, float *table,
                                                                 const int64_t *runs, int64_t dim) {
    const int64_t *ids = (const int64_t *)(intptr_t)runs[0], m = runs[3];
    const float *eps = (const float *)(intptr_t)runs[1], *grad_out = (const float *)(intptr_t)runs[2];
#pragma omp parallel if (m * dim > PARALLEL_MIN)
    {
        float grad[FUSED_MAX_WIDTH];
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            if (i + PREFETCH_AHEAD < m) prefetch_update(u, kind, table, ids[i + PREFETCH_AHEAD]);
            float *restrict row = table + ids[i] * u->width;
            form_row_gradient(row, eps + i * dim, grad_out + i * (dim + 1), dim, grad, 0);
            update_row(u, kind, ids[i], row, grad);
        }
    }
}

/* The owner's backward through sample_kl_forward, the merge of its requesters' rows and the row update in
 * one pass: what sample_kl_backward, then merge_rows, then row_adagrad or row_adam do with three passes
 * and two gradient tables written out and read back. runs [k, 4] holds each request's (address of its
 * local ids [len], of their noise [len, dim] and of their output's gradient [len, dim + 1], len); a row's
 * gradient is formed from the row as it is in table [rows, 2 * dim] (as the forward read it), summed over
 * the runs that hold it in run order, and applied to it and its optimiser state (`kind`, state0, state1,
 * parts, hyper: see RowUpdate). One run (its ids distinct) is split over the threads by position; several
 * (each strictly ascending: one requester's sorted distinct ids) by ranges of ids, each thread merging
 * the runs' rows in its range, so no two threads touch a row and the result does not depend on the thread
 * count. out_ids [total len] receives the distinct ids updated, ascending for several runs. Returns their
 * number; -1 when there are more than SAMPLED_MAX_RUNS runs or a run of several is not strictly
 * ascending, -2 when 2 * dim is over FUSED_MAX_WIDTH or not a multiple of parts or `kind` is unknown, -3
 * when an id is outside [0, rows): nothing is written then. */
int64_t sample_kl_update(float *table, int64_t rows, const int64_t *runs, int64_t k, int64_t dim, int64_t kind,
                         float *state0, float *state1, int64_t parts, const float *hyper, int64_t *out_ids) {
    const RowUpdate u = {2 * dim, parts, state0, state1, hyper};
    if (u.width > FUSED_MAX_WIDTH || (kind != UPDATE_ADAGRAD && kind != UPDATE_ADAM)) return -2;
    if (kind == UPDATE_ADAGRAD && (parts <= 0 || u.width % parts)) return -2;
    if (k > SAMPLED_MAX_RUNS) return -1;
    int64_t total = 0, lowest = rows, highest = 0;
    for (int64_t r = 0; r < k; r++) {
        const int64_t *ids = (const int64_t *)(intptr_t)runs[4 * r], n = runs[4 * r + 3];
        if (!ids_in_range(ids, n, rows)) return -3;
        for (int64_t i = 1; k > 1 && i < n; i++)
            if (ids[i] <= ids[i - 1]) return -1;
        if (n && ids[0] < lowest) lowest = ids[0];
        if (n && ids[n - 1] >= highest) highest = ids[n - 1] + 1;
        total += n;
    }
    if (k == 1) {
        if (kind == UPDATE_ADAGRAD) update_one_run(&u, UPDATE_ADAGRAD, table, runs, dim);
        else update_one_run(&u, UPDATE_ADAM, table, runs, dim);
        memcpy(out_ids, (const int64_t *)(intptr_t)runs[0], (size_t)runs[3] * sizeof(int64_t));
        return runs[3];
    }
    /* Thread t merges ids [bound[t], bound[t + 1]) into out_ids from start[t] (the runs' rows before its
     * range: room enough), then the pieces close up in order. */
    int64_t bound[SAMPLED_MAX_THREADS + 1], start[SAMPLED_MAX_THREADS], count[SAMPLED_MAX_THREADS] = {0}, pieces = 1;
#pragma omp parallel if (total * dim > PARALLEL_MIN)
    {
#pragma omp single
        {
            pieces = omp_get_num_threads() < SAMPLED_MAX_THREADS ? omp_get_num_threads() : SAMPLED_MAX_THREADS;
            for (int64_t t = 0; t <= pieces; t++) bound[t] = lowest + (highest - lowest) * t / pieces;
            for (int64_t t = 0; t < pieces; t++) {
                start[t] = 0;
                for (int64_t r = 0; r < k; r++)
                    start[t] += lower_bound((const int64_t *)(intptr_t)runs[4 * r], runs[4 * r + 3], bound[t]);
            }
        }
#pragma omp for schedule(static, 1)
        for (int64_t t = 0; t < pieces; t++)
            count[t] = kind == UPDATE_ADAGRAD
                           ? merge_and_update(&u, UPDATE_ADAGRAD, table, runs, k, dim, bound[t], bound[t + 1],
                                              out_ids + start[t])
                           : merge_and_update(&u, UPDATE_ADAM, table, runs, k, dim, bound[t], bound[t + 1],
                                              out_ids + start[t]);
    }
    int64_t m = 0;
    for (int64_t t = 0; t < pieces; t++) {
        memmove(out_ids + m, out_ids + start[t], (size_t)count[t] * sizeof(int64_t));
        m += count[t];
    }
    return m;
}
