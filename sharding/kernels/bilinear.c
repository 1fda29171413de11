/* The Bernoulli negative log-likelihood of chunks of facts under a bilinear scorer (DistMult or ComplEx),
 * forward and backward, with the queries, the scores and their sigmoids computed in one pass per chunk.
 *
 * A batch of B facts (s, r, o) [B, D] is cut into chunks of `chunk` facts; chunk c shares the K negatives
 * neg[c] [K, D], the first K/2 replacing heads and the rest tails. Per fact i of chunk c:
 *   q_tail = s * r,  q_head = conj(r) * o       (ComplEx: complex products of (re, im) pairs)
 *   pos = q_tail . o + b_i,  head_j = q_head . neg_j + b_i,  tail_j = q_tail . neg_j + b_i
 *   nll_i = softplus(-pos) + w * (sum_j softplus(head_j) + sum_j softplus(tail_j))
 * which is what trainer/objective.py's torch path computes, where it takes some fifty operations each way
 * (queries, batched products, softplus, sums, their backward and the complex products' backward); at a
 * batch of a thousand facts their dispatch costs more than their arithmetic.
 *
 * Chunks run on torch's OpenMP threads, each writing only its own facts' rows and its own negatives'
 * gradient block, so no two threads write one place. Built without -ffast-math: a NaN input gives a NaN
 * loss and NaN gradients, as in torch, which the training step stops on.
 */
#include <stdint.h>
#include <stdlib.h>

#include "vecmath.h"

/* max(x, 0) + log(1 + exp(-|x|)), to about 1e-7 absolute (a term below that, x < -16, counts as 0, where
 * the loss sums a thousand terms of order one); NaN stays NaN and -inf gives 0, as in torch. */
static inline float softplus(float x) {
    return (x > 0.0f ? x : (x != x ? x : 0.0f)) + log_approx(1.0f + exp_approx(-fabsf(x)));
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

static inline float dot(const float *restrict a, const float *restrict b, int64_t d) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t k = 0; k < d; k++) total += a[k] * b[k];
    return total;
}

/* out[j] = q . rows[j] + b for j < n (rows [n, d]): four rows at a time share each load of q. */
static inline void dots(const float *restrict q, const float *restrict rows, int64_t n, int64_t d, float b,
                        float *restrict out) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *r0 = rows + j * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
        float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
#pragma omp simd reduction(+ : t0, t1, t2, t3)
        for (int64_t k = 0; k < d; k++) {
            t0 += q[k] * r0[k];
            t1 += q[k] * r1[k];
            t2 += q[k] * r2[k];
            t3 += q[k] * r3[k];
        }
        out[j] = t0 + b;
        out[j + 1] = t1 + b;
        out[j + 2] = t2 + b;
        out[j + 3] = t3 + b;
    }
    for (; j < n; j++) out[j] = dot(q, rows + j * d, d) + b;
}

static inline void axpy(float alpha, const float *restrict x, float *restrict y, int64_t d) {
#pragma omp simd
    for (int64_t k = 0; k < d; k++) y[k] += alpha * x[k];
}

/* For j < n: acc += g[j] * rows[j] and grads[j] += g[j] * q (rows, grads [n, d]): the gradient of
 * q . rows[j] pushed both ways, four rows at a time so that acc and q are loaded once per four. */
static inline void push(const float *restrict g, const float *restrict rows, const float *restrict q, int64_t n,
                        int64_t d, float *restrict acc, float *restrict grads) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float g0 = g[j], g1 = g[j + 1], g2 = g[j + 2], g3 = g[j + 3];
        const float *r0 = rows + j * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
        float *h0 = grads + j * d, *h1 = h0 + d, *h2 = h1 + d, *h3 = h2 + d;
#pragma omp simd
        for (int64_t k = 0; k < d; k++) {
            acc[k] += g0 * r0[k] + g1 * r1[k] + g2 * r2[k] + g3 * r3[k];
            h0[k] += g0 * q[k];
            h1[k] += g1 * q[k];
            h2[k] += g2 * q[k];
            h3[k] += g3 * q[k];
        }
    }
    for (; j < n; j++) {
        axpy(g[j], rows + j * d, acc, d);
        axpy(g[j], q, grads + j * d, d);
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

/* Forward. s, r, o [B, D]; neg [C, K, D] with C = ceil(B / chunk); bias [B] or NULL. Writes each fact's
 * scores [B, 1 + K] (pos, then the K negatives' as laid out in neg) and each chunk's NLL [C] (in double).
 * Returns 0, or -1 when a work buffer cannot be had. */
int bernoulli_forward(const float *s, const float *r, const float *o, const float *neg, const float *bias, int64_t B,
                      int64_t chunk, int64_t K, int64_t D, int64_t complex_valued, float weight, float *scores,
                      double *chunk_nll) {
    const int64_t C = (B + chunk - 1) / chunk, half = K / 2;
    int failed = 0;
#pragma omp parallel if (B * (K + 1) * D > PARALLEL_MIN) reduction(| : failed)
    {
        float *q = malloc(2 * (size_t)D * sizeof(float));
        failed = q == NULL;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c++) {
            if (q == NULL) continue;
            float *q_tail = q, *q_head = q + D;
            const float *negs = neg + c * K * D;
            double total = 0.0;
            const int64_t end = (c + 1) * chunk < B ? (c + 1) * chunk : B;
            for (int64_t i = c * chunk; i < end; i++) {
                queries(s + i * D, r + i * D, o + i * D, D, (int)complex_valued, q_tail, q_head);
                const float b = bias ? bias[i] : 0.0f;
                float *row = scores + i * (K + 1);
                row[0] = dot(q_tail, o + i * D, D) + b;
                dots(q_head, negs, half, D, b, row + 1);
                dots(q_tail, negs + half * D, K - half, D, b, row + 1 + half);
                float negatives = 0.0f;
#pragma omp simd reduction(+ : negatives)
                for (int64_t j = 1; j <= K; j++) negatives += softplus(row[j]);
                total += (double)softplus(-row[0]) + (double)weight * negatives;
            }
            chunk_nll[c] = total;
        }
        free(q);
    }
    return failed ? -1 : 0;
}

/* Backward, given the forward's scores and the gradient `grad` of the summed NLL: gs, gr, go [B, D],
 * gneg [C, K, D] and, when not NULL, gbias [B] (the derivative of every score of fact i in its bias).
 * Returns 0, or -1 when a work buffer cannot be had. */
int bernoulli_backward(const float *s, const float *r, const float *o, const float *neg, const float *scores,
                       int64_t B, int64_t chunk, int64_t K, int64_t D, int64_t complex_valued, float weight,
                       float grad, float *gs, float *gr, float *go, float *gneg, float *gbias) {
    const int64_t C = (B + chunk - 1) / chunk, half = K / 2;
    const float negative_grad = weight * grad;
    int failed = 0;
#pragma omp parallel if (B * (K + 1) * D > PARALLEL_MIN) reduction(| : failed)
    {
        float *q = malloc((4 * (size_t)D + (size_t)K) * sizeof(float));
        failed = q == NULL;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c++) {
            if (q == NULL) continue;
            float *q_tail = q, *q_head = q + D, *g_tail = q + 2 * D, *g_head = q + 3 * D, *g_score = q + 4 * D;
            const float *negs = neg + c * K * D;
            float *g_negs = gneg + c * K * D;
            memset(g_negs, 0, (size_t)(K * D) * sizeof(float));
            const int64_t end = (c + 1) * chunk < B ? (c + 1) * chunk : B;
            for (int64_t i = c * chunk; i < end; i++) {
                const float *si = s + i * D, *ri = r + i * D, *oi = o + i * D, *row = scores + i * (K + 1);
                queries(si, ri, oi, D, (int)complex_valued, q_tail, q_head);
                /* d softplus(-x)/dx = -sigmoid(-x); d softplus(x)/dx = sigmoid(x). */
                const float g_pos = -sigmoid(-row[0]) * grad;
                float g_bias = g_pos;
#pragma omp simd reduction(+ : g_bias)
                for (int64_t j = 0; j < K; j++) {
                    g_score[j] = sigmoid(row[1 + j]) * negative_grad;
                    g_bias += g_score[j];
                }
                memset(g_head, 0, (size_t)D * sizeof(float));
#pragma omp simd
                for (int64_t k = 0; k < D; k++) g_tail[k] = g_pos * oi[k];
                push(g_score, negs, q_head, half, D, g_head, g_negs);
                push(g_score + half, negs + half * D, q_tail, K - half, D, g_tail, g_negs + half * D);
                float *goi = go + i * D;
#pragma omp simd
                for (int64_t k = 0; k < D; k++) goi[k] = g_pos * q_tail[k];
                query_backward(si, ri, oi, g_tail, g_head, D, (int)complex_valued, gs + i * D, gr + i * D, goi);
                if (gbias) gbias[i] = g_bias;
            }
        }
        free(q);
    }
    return failed ? -1 : 0;
}
