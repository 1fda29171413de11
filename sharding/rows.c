/* Row kernel for the CPU: lazy Adam applied in place to the rows a step touched.
 *
 * Built on first use by sharding/native.py and called through ctypes with the tensors' data pointers;
 * torch ops do the same work where these are not available (another device, no C compiler).
 * In place, each row is read and written once, where gather -> update -> scatter makes three passes
 * over three tables. Inner loops vectorise; target_clones adds an AVX2 build, picked at load time where
 * the CPU has AVX2 ("arch=haswell" would be picked on Intel Haswell-class CPUs only, not on AMD).
 * Returns 0, or 1 when an id is outside [0, rows) (nothing is written then). Row-wise Adagrad has no
 * kernel: its torch update touches one float per row part besides the rows, and a C loop measured no faster.
 */
#include <math.h>
#include <stdint.h>

#define CLONES __attribute__((target_clones("avx2", "default")))

static int ids_in_range(const int64_t *ids, int64_t n, int64_t rows) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows) return 0;
    return 1;
}

/* Lazy Adam (torch.optim.Adam's update) on rows ids[0..n) of param, exp_avg, exp_avg_sq [rows, width],
 * with grad [n, width]; step_size = lr / (1 - beta1^t), inv_sqrt_bias2 = 1 / sqrt(1 - beta2^t), and
 * w1 = 1 - beta1, w2 = 1 - beta2 come from the caller in double precision: 1 - 0.999f in float is off
 * by 1.3e-5, which the bias correction would then not cancel. */
CLONES int row_adam(float *param, float *exp_avg, float *exp_avg_sq, const int64_t *ids, const float *grad,
                    int64_t n, int64_t rows, int64_t width, float step_size, float inv_sqrt_bias2, float w1,
                    float beta2, float w2, float eps) {
    if (!ids_in_range(ids, n, rows)) return 1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t offset = ids[i] * width;
        float *restrict p = param + offset, *restrict m = exp_avg + offset, *restrict v = exp_avg_sq + offset;
        const float *restrict g = grad + i * width;
        for (int64_t j = 0; j < width; j++) {
            const float mj = m[j] + w1 * (g[j] - m[j]); /* lerp, as torch */
            const float vj = beta2 * v[j] + w2 * g[j] * g[j];
            m[j] = mj;
            v[j] = vj;
            p[j] -= step_size * mj / (sqrtf(vj) * inv_sqrt_bias2 + eps);
        }
    }
    return 0;
}
