/* The Bernoulli negative log-likelihood of chunks of facts under a bilinear scorer (DistMult or ComplEx),
 * forward and backward, with the queries, the scores and their sigmoids computed in one pass per chunk.
 *
 * A batch of B facts (s, r, o) is cut into chunks of `chunk` facts; chunk c shares K negatives, the first
 * K/2 replacing heads and the rest tails. Per fact i of chunk c:
 *   q_tail = s * r,  q_head = conj(r) * o       (ComplEx: complex products of (re, im) pairs)
 *   pos = q_tail . o + b_i,  head_j = q_head . neg_j + b_i,  tail_j = q_tail . neg_j + b_i
 *   nll_i = softplus(-pos) + w * (sum_j softplus(head_j) + sum_j softplus(tail_j))
 * which is what trainer/objective.py's torch path computes, where it takes some fifty operations each way
 * (queries, batched products, softplus, sums, their backward and the complex products' backward); at a
 * batch of a thousand facts their dispatch costs more than their arithmetic.
 *
 * The forward scores the negatives by matrix products per chunk and side (the queries by the negatives
 * transposed) and keeps the derivative of each term in its score (a sigmoid, from the exp its softplus
 * takes anyway), so the backward takes no exp; the backward's gradients are matrix products per chunk and
 * side too (the queries' G N, the negatives' G^T Q): `matmul` below.
 *
 * The rows are read where they are, by position in the step's tables: the sampled rows of the batch's
 * distinct entities (s, o and the negatives at positions index[i], index[B + i] and index[2B + c K + j])
 * and the relation rows (at r_index[i]); the backward sums each position's gradient into its row. So the
 * scorer's inputs need no gather before and no scatter of their gradients after, which in torch are six
 * operations and three copies of the batch's rows.
 *
 * Chunks run on torch's OpenMP threads, each writing only its own facts' and negatives' per-position
 * gradients; the sums into rows are split by row between the threads (`scatter_rows`), so no two threads
 * write one place and the result does not depend on the thread count.
 * Built without -ffast-math: a NaN input gives a NaN loss and NaN gradients, as in torch, which the
 * training step stops on.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vecmath.h"

/* softplus(x) = max(x, 0) + log(1 + exp(-|x|)) and sigmoid(x) from one exp, to about 1e-7 absolute (a
 * softplus term below that, x < -16, counts as 0, where the loss sums a thousand terms of order one); NaN
 * stays NaN in both, and -inf gives a softplus of 0 and a sigmoid of about 1e-38 (exp_approx stops at
 * -87). */
static inline float softplus_sigmoid(float x, float *sig) {
    const float e = exp_approx(-fabsf(x));
    *sig = (x >= 0.0f ? 1.0f : e) / (1.0f + e);
    return (x > 0.0f ? x : (x != x ? x : 0.0f)) + log_approx(1.0f + e);
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t d) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t k = 0; k < d; k++) total += a[k] * b[k];
    return total;
}

/* The products are small matrix products (a chunk's 32 facts by its 64 negatives over 128 numbers) done in
 * register tiles: TILE_ROWS rows of C by one or two vectors of LANES columns stay in registers over the
 * whole sum, each step a broadcast of A times a load of B, so no sum is reduced across lanes. With AVX-512,
 * eight rows by two vectors are 16 sums in half the 32 vector registers, and each load of B serves eight
 * products (against four rows: forward 0.31 -> 0.26 ms, backward 0.51 -> 0.46 ms at PBG's sampling, the
 * same numbers out); with 16 registers of half the width (AVX2) four rows already fill them. gcc's vector
 * extension, not intrinsics: the same code builds for any width the CPU has. */
#define LANES 16
#ifdef __AVX512F__
#define TILE_ROWS 8
#else
#define TILE_ROWS 4
#endif
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* C[i, v*LANES..] = alpha * sum_k A(i, k) B[k, v*LANES..] (+ C when accumulate) for i < rows, v < vectors,
 * A(i, k) = A[i * a_row + k * a_k]. Inlined with constant rows and vectors, so acc lives in registers. */
static inline __attribute__((always_inline)) void tile(int rows, int vectors, int64_t p, const float *A, int64_t a_row,
                                                       int64_t a_k, const float *B, int64_t ldb, float *C, int64_t ldc,
                                                       float alpha, int accumulate) {
    vec acc[TILE_ROWS][2];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < vectors; v++) acc[i][v] = (vec){0};
    for (int64_t k = 0; k < p; k++) {
        vec b[2];
        for (int v = 0; v < vectors; v++) b[v] = load(B + k * ldb + v * LANES);
        for (int i = 0; i < rows; i++) {
            const float x = A[i * a_row + k * a_k];
            for (int v = 0; v < vectors; v++) acc[i][v] += x * b[v];
        }
    }
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < vectors; v++) {
            float *c = C + i * ldc + v * LANES;
            store(c, accumulate ? load(c) + alpha * acc[i][v] : alpha * acc[i][v]);
        }
}

/* C [m, n] = alpha * A B (+ C when accumulate), A(i, k) = A[i * a_row + k * a_k] [m, p], B [p, n] and C
 * row-major with leading dimensions ldb and ldc. */
static void matmul(int64_t m, int64_t n, int64_t p, const float *A, int64_t a_row, int64_t a_k, const float *B,
                   int64_t ldb, float *C, int64_t ldc, float alpha, int accumulate) {
    int64_t j = 0;
    for (; j + 2 * LANES <= n; j += 2 * LANES) {
        int64_t i = 0;
        for (; i + TILE_ROWS <= m; i += TILE_ROWS)
            tile(TILE_ROWS, 2, p, A + i * a_row, a_row, a_k, B + j, ldb, C + i * ldc + j, ldc, alpha, accumulate);
        for (; i + TILE_ROWS / 2 <= m; i += TILE_ROWS / 2)
            tile(TILE_ROWS / 2, 2, p, A + i * a_row, a_row, a_k, B + j, ldb, C + i * ldc + j, ldc, alpha, accumulate);
        for (; i < m; i++) tile(1, 2, p, A + i * a_row, a_row, a_k, B + j, ldb, C + i * ldc + j, ldc, alpha, accumulate);
    }
    for (; j + LANES <= n; j += LANES) {
        int64_t i = 0;
        for (; i + TILE_ROWS <= m; i += TILE_ROWS)
            tile(TILE_ROWS, 1, p, A + i * a_row, a_row, a_k, B + j, ldb, C + i * ldc + j, ldc, alpha, accumulate);
        for (; i + TILE_ROWS / 2 <= m; i += TILE_ROWS / 2)
            tile(TILE_ROWS / 2, 1, p, A + i * a_row, a_row, a_k, B + j, ldb, C + i * ldc + j, ldc, alpha, accumulate);
        for (; i < m; i++) tile(1, 1, p, A + i * a_row, a_row, a_k, B + j, ldb, C + i * ldc + j, ldc, alpha, accumulate);
    }
    for (; j < n; j++) /* the last columns of a width that is not a multiple of LANES (DistMult, odd D) */
        for (int64_t i = 0; i < m; i++) {
            float total = 0.0f;
            for (int64_t k = 0; k < p; k++) total += A[i * a_row + k * a_k] * B[k * ldb + j];
            C[i * ldc + j] = accumulate ? C[i * ldc + j] + alpha * total : alpha * total;
        }
}

/* q_tail = s * r and q_head = conj(r) * o (ComplEx), or s * r and r * o (DistMult). */
static void queries(const float *restrict s, const float *restrict r, const float *restrict o, int64_t d,
                    int complex_valued, float *restrict q_tail, float *restrict q_head) {
    if (!complex_valued) {
#pragma omp simd
        for (int64_t k = 0; k < d; k++) {
            q_tail[k] = s[k] * r[k];
            q_head[k] = r[k] * o[k];
        }
        return;
    }
    for (int64_t k = 0; k < d; k += 2) {
        const float sr = s[k], si = s[k + 1], rr = r[k], ri = r[k + 1], orr = o[k], oi = o[k + 1];
        q_tail[k] = sr * rr - si * ri;
        q_tail[k + 1] = sr * ri + si * rr;
        q_head[k] = rr * orr + ri * oi;
        q_head[k + 1] = rr * oi - ri * orr;
    }
}

/* The gradients of s, r and o given those of the queries: through q_tail = s * r and q_head = conj(r) * o,
 * d/ds = g_tail * conj(r), d/dr = g_tail * conj(s) + conj(g_head) * o, d/do = g_head * r (ComplEx);
 * g_tail * r, g_tail * s + g_head * o and g_head * r (DistMult). d/do is added to what `go` holds. */
static void query_backward(const float *restrict s, const float *restrict r, const float *restrict o,
                           const float *restrict g_tail, const float *restrict g_head, int64_t d, int complex_valued,
                           float *restrict gs, float *restrict gr, float *restrict go) {
    if (!complex_valued) {
#pragma omp simd
        for (int64_t k = 0; k < d; k++) {
            gs[k] = g_tail[k] * r[k];
            gr[k] = g_tail[k] * s[k] + g_head[k] * o[k];
            go[k] += g_head[k] * r[k];
        }
        return;
    }
    for (int64_t k = 0; k < d; k += 2) {
        const float sr = s[k], si = s[k + 1], rr = r[k], ri = r[k + 1], orr = o[k], oi = o[k + 1];
        const float tr = g_tail[k], ti = g_tail[k + 1], hr = g_head[k], hi = g_head[k + 1];
        gs[k] = tr * rr + ti * ri;
        gs[k + 1] = ti * rr - tr * ri;
        gr[k] = tr * sr + ti * si + hr * orr + hi * oi;
        gr[k + 1] = ti * sr - tr * si + hr * oi - hi * orr;
        go[k] += hr * rr - hi * ri;
        go[k + 1] += hr * ri + hi * rr;
    }
}

/* Where a batch's rows are: the entity rows ent (row stride ld) at positions index [2B + C K] (s, then o,
 * then each chunk's K negatives), the relation rows rel (stride r_ld) at r_index [B]. */
typedef struct {
    const float *ent, *rel;
    const int64_t *index, *r_index;
    int64_t ld, r_ld, B;
} Rows;

static inline const float *s_row(const Rows *x, int64_t i) { return x->ent + x->index[i] * x->ld; }
static inline const float *o_row(const Rows *x, int64_t i) { return x->ent + x->index[x->B + i] * x->ld; }
static inline const float *r_row(const Rows *x, int64_t i) { return x->rel + x->r_index[i] * x->r_ld; }

/* Fact i's rows, asked for while an earlier fact is worked on: they are scattered over the table. */
static inline void prefetch_fact(const Rows *x, int64_t i, int64_t D) {
    if (i >= x->B) return;
    prefetch_row_for_reading(s_row(x, i), D);
    prefetch_row_for_reading(o_row(x, i), D);
}

/* Chunk c's K negatives copied into buf [K, D], for the products' contiguous reads. */
static const float *chunk_negatives(const Rows *x, int64_t c, int64_t K, int64_t D, float *buf) {
    const int64_t *at = x->index + 2 * x->B + c * K;
    for (int64_t j = 0; j < K; j++) {
        if (j + PREFETCH_AHEAD < K) prefetch_row_for_reading(x->ent + at[j + PREFETCH_AHEAD] * x->ld, D);
        memcpy(buf + j * D, x->ent + at[j] * x->ld, (size_t)D * sizeof(float));
    }
    return buf;
}

/* Chunk c's K negatives transposed into buf [D, K] (buf[k * K + j]: number k of negative j), the right-hand
 * side of the forward's products. */
static void chunk_negatives_transposed(const Rows *x, int64_t c, int64_t K, int64_t D, float *restrict buf) {
    const int64_t *at = x->index + 2 * x->B + c * K;
    for (int64_t j = 0; j < K; j++) {
        if (j + PREFETCH_AHEAD < K) prefetch_row_for_reading(x->ent + at[j + PREFETCH_AHEAD] * x->ld, D);
        const float *restrict row = x->ent + at[j] * x->ld;
        for (int64_t k = 0; k < D; k++) buf[k * K + j] = row[k];
    }
}

/* Chunk c's forward. Rows as above (D of each row read); bias [B] or NULL. Returns the chunk's NLL and
 * writes what the backward needs, the derivative of each term of the NLL in its score, into its facts' rows
 * of probs [B, 1 + K]: -sigmoid(-pos), then sigmoid(score) of each of the chunk's negatives in order. The
 * negatives' scores are two matrix products, the chunk's head queries by its head negatives and its tail
 * queries by its tail negatives, written into probs before the sigmoids replace them; the negatives are
 * transposed once per chunk so that each product's tile broadcasts a query's number against a vector of
 * negatives and sums nothing across lanes (dot products per negative spent most of the forward summing
 * each one's lanes). work: (2 chunk + K) D floats. */
static double forward_chunk(const Rows *x, const float *bias, int64_t c, int64_t chunk, int64_t K, int64_t D,
                            int complex_valued, float weight, float *probs, float *work) {
    const int64_t B = x->B, half = K / 2, rows = chunk < B ? chunk : B;
    float *q_tail = work, *q_head = work + rows * D, *negs = q_head + rows * D;
    chunk_negatives_transposed(x, c, K, D, negs);
    const int64_t first = c * chunk, n = (c + 1) * chunk < B ? chunk : B - first;
    float *p = probs + first * (1 + K);
    for (int64_t i = 0; i < n; i++) {
        prefetch_fact(x, first + i + PREFETCH_AHEAD, D);
        const float *o = o_row(x, first + i);
        queries(s_row(x, first + i), r_row(x, first + i), o, D, complex_valued, q_tail + i * D, q_head + i * D);
        p[i * (1 + K)] = dot(q_tail + i * D, o, D);
    }
    matmul(n, half, D, q_head, D, 1, negs, K, p + 1, 1 + K, 1.0f, 0);
    matmul(n, K - half, D, q_tail, D, 1, negs + half, K, p + 1 + half, 1 + K, 1.0f, 0);
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const float b = bias ? bias[first + i] : 0.0f;
        float *row = p + i * (1 + K), sig;
        const float pos = softplus_sigmoid(-(row[0] + b), &sig);
        row[0] = -sig;
        float negatives = 0.0f;
#pragma omp simd reduction(+ : negatives)
        for (int64_t j = 1; j <= K; j++) negatives += softplus_sigmoid(row[j] + b, row + j);
        total += (double)pos + (double)weight * negatives;
    }
    return total;
}

/* Chunk c's backward, given the forward's probs and the gradient `grad` of the summed NLL: the gradients at
 * its positions in gs, gr, go [B, D], gneg [C, K, D] and, when not NULL, gbias [B] (the derivative of every
 * score of fact i in its bias). With G the negatives' sigmoids times w * grad: the queries' gradients G N
 * and the negatives' G^T Q, as matrix products. work: (4 chunk + K) D floats. */
static void backward_chunk(const Rows *x, const float *probs, int64_t c, int64_t chunk, int64_t K, int64_t D,
                           int complex_valued, float weight, float grad, float *gs, float *gr, float *go,
                           float *gneg, float *gbias, float *work) {
    const int64_t B = x->B, half = K / 2, rows = chunk < B ? chunk : B;
    const float negative_grad = weight * grad;
    /* The chunk's queries and their gradients [n, D]. */
    float *q_tail = work, *q_head = work + rows * D, *g_tail = q_head + rows * D, *g_head = g_tail + rows * D;
    const float *negs = chunk_negatives(x, c, K, D, g_head + rows * D), *p = probs + c * chunk * (1 + K);
    float *g_negs = gneg + c * K * D;
    const int64_t first = c * chunk, n = (c + 1) * chunk < B ? chunk : B - first;
    for (int64_t i = 0; i < n; i++) {
        const int64_t f = first + i;
        prefetch_fact(x, f + PREFETCH_AHEAD, D);
        const float *o = o_row(x, f);
        queries(s_row(x, f), r_row(x, f), o, D, complex_valued, q_tail + i * D, q_head + i * D);
        const float g_pos = p[i * (1 + K)] * grad;
#pragma omp simd
        for (int64_t k = 0; k < D; k++) g_tail[i * D + k] = g_pos * o[k];
    }
    /* G(i, j) = p[i * (1 + K) + 1 + j], the sigmoids of fact i's negatives. */
    matmul(n, D, half, p + 1, 1 + K, 1, negs, D, g_head, D, negative_grad, 0);
    matmul(n, D, K - half, p + 1 + half, 1 + K, 1, negs + half * D, D, g_tail, D, negative_grad, 1);
    matmul(half, D, n, p + 1, 1, 1 + K, q_head, D, g_negs, D, negative_grad, 0);
    matmul(K - half, D, n, p + 1 + half, 1, 1 + K, q_tail, D, g_negs + half * D, D, negative_grad, 0);
    for (int64_t i = 0; i < n; i++) {
        const int64_t f = first + i;
        const float *row = p + i * (1 + K);
        const float g_pos = row[0] * grad;
        float *go_f = go + f * D;
#pragma omp simd
        for (int64_t k = 0; k < D; k++) go_f[k] = g_pos * q_tail[i * D + k];
        query_backward(s_row(x, f), r_row(x, f), o_row(x, f), g_tail + i * D, g_head + i * D, D, complex_valued,
                       gs + f * D, gr + f * D, go_f);
        if (gbias) {
            float total = 0.0f;
#pragma omp simd reduction(+ : total)
            for (int64_t j = 1; j <= K; j++) total += row[j];
            gbias[f] = g_pos + negative_grad * total;
        }
    }
}

/* The chunks on torch's OpenMP threads, each its forward (when chunk_nll is not NULL: each chunk's NLL [C]
 * in double, and probs) then its backward (when gs is not NULL, from probs: the gradients at each position,
 * as backward_chunk), so a chunk's rows are still in the caches when its backward reads them again. Returns
 * 0, or -1 when a work buffer cannot be had. */
static int chunks(const Rows *x, const float *bias, int64_t chunk, int64_t K, int64_t D, int complex_valued,
                  float weight, float grad, float *probs, double *chunk_nll, float *gs, float *gr, float *go,
                  float *gneg, float *gbias) {
    const int64_t B = x->B, C = (B + chunk - 1) / chunk;
    int failed = 0;
#pragma omp parallel if (B * (K + 1) * D > PARALLEL_MIN) reduction(| : failed)
    {
        const int64_t rows = chunk < B ? chunk : B; /* a chunk's facts at most */
        float *work = malloc(((gs ? 4 : 2) * (size_t)rows + (size_t)K) * (size_t)D * sizeof(float));
        failed = work == NULL;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c++) {
            if (work == NULL) continue;
            if (chunk_nll) chunk_nll[c] = forward_chunk(x, bias, c, chunk, K, D, complex_valued, weight, probs, work);
            if (gs) backward_chunk(x, probs, c, chunk, K, D, complex_valued, weight, grad, gs, gr, go, gneg, gbias, work);
        }
        free(work);
    }
    return failed ? -1 : 0;
}

/* out[u] = the sum of src[p] over the positions p with index[p] = u, for u < rows (out [rows, >= D], row
 * stride ld; src [n, D]), added in the order of p: each thread owns a range of out's rows and reads every
 * index, so no two threads write one row and the sums do not depend on the thread count. Columns past D of
 * a wider out are left as they are. Returns 0 when every number written is finite, else NaN: each partial
 * sum x adds x - x to the check as it is written (an inf or a NaN stays one until the row is done), which
 * costs nothing beside the adds where a pass over the rows afterwards would read them all again. */
static float scatter_rows(const float *src, const int64_t *index, int64_t n, int64_t D, float *out, int64_t ld,
                          int64_t rows) {
    float check = 0.0f;
#pragma omp parallel if (n * D > PARALLEL_MIN) reduction(+ : check)
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = rows * t / threads, hi = rows * (t + 1) / threads;
        if (ld == D)
            memset(out + lo * D, 0, (size_t)((hi - lo) * D) * sizeof(float));
        else
            for (int64_t u = lo; u < hi; u++) memset(out + u * ld, 0, (size_t)D * sizeof(float));
        for (int64_t p = 0; p < n; p++) {
            const int64_t u = index[p];
            if (u < lo || u >= hi) continue;
            float *restrict to = out + u * ld;
            const float *restrict from = src + p * D;
#pragma omp simd reduction(+ : check)
            for (int64_t k = 0; k < D; k++) {
                to[k] += from[k];
                check += to[k] - to[k];
            }
        }
    }
    return check;
}

/* The NLL of B facts in chunks of `chunk` sharing K negatives, from entity rows ent [U, >= D] (row stride
 * ld), s, o and the negatives at index [2B + C K], and relation rows rel [R, >= D] (stride r_ld) at
 * r_index [B]; bias [B] or NULL. Writes each chunk's NLL [C] and probs [B, 1 + K] (forward_chunk). Returns
 * 0, -1 when a work buffer cannot be had, or 1 when a position is outside its table (nothing is computed
 * then). */
int bernoulli_forward(const float *ent, int64_t U, int64_t ld, const int64_t *index, const float *rel, int64_t R,
                      int64_t r_ld, const int64_t *r_index, const float *bias, int64_t B, int64_t chunk, int64_t K,
                      int64_t D, int64_t complex_valued, float weight, float *probs, double *chunk_nll) {
    const int64_t C = (B + chunk - 1) / chunk;
    if (!ids_in_range(index, 2 * B + C * K, U) || !ids_in_range(r_index, B, R)) return 1;
    const Rows x = {ent, rel, index, r_index, ld, r_ld, B};
    return chunks(&x, bias, chunk, K, D, (int)complex_valued, weight, 0.0f, probs, chunk_nll, NULL, NULL, NULL,
                  NULL, NULL);
}

/* The gradients of the tables given probs, g_ent [U, >= D] (row stride g_ld: columns past D are left as
 * they are) and g_rel [R, D] (each position's gradient summed into its row), by way of each position's:
 * work [2B + C K, D] (s, o, then the negatives, as index lists them) and r_work [B, D] are work space.
 * With chunk_nll not NULL, each chunk's forward first (bernoulli_forward's NLL and probs, written), then
 * its backward: the same numbers as the two calls, in one pass over the chunks. check, unless NULL, receives
 * 0 when every number written into g_ent and g_rel is finite and NaN otherwise (scatter_rows), so a caller
 * that checks the gradients need not read them again. */
int bernoulli_backward(const float *ent, int64_t U, int64_t ld, const int64_t *index, const float *rel, int64_t R,
                       int64_t r_ld, const int64_t *r_index, const float *bias, double *chunk_nll, float *probs,
                       int64_t B, int64_t chunk, int64_t K, int64_t D, int64_t complex_valued, float weight,
                       float grad, float *work, float *r_work, float *gbias, float *g_ent, int64_t g_ld,
                       float *g_rel, float *check) {
    const int64_t C = (B + chunk - 1) / chunk, n = 2 * B + C * K;
    if (!ids_in_range(index, n, U) || !ids_in_range(r_index, B, R)) return 1;
    const Rows x = {ent, rel, index, r_index, ld, r_ld, B};
    const int status = chunks(&x, bias, chunk, K, D, (int)complex_valued, weight, grad, probs, chunk_nll, work,
                              r_work, work + B * D, work + 2 * B * D, gbias);
    if (status) return status;
    const float entities = scatter_rows(work, index, n, D, g_ent, g_ld, U);
    const float relations = scatter_rows(r_work, r_index, B, D, g_rel, D, R);
    if (check) *check = entities + relations;
    return 0;
}
