/* Standard normal noise for the reparameterised samples, on the CPU: a counter-based stream.
 *
 * Value e of the stream with seed s comes from pair e / 2, whose two normals are Box-Muller of the two
 * 24-bit halves of splitmix64's output for counter pair + 1. A value depends only on (s, e), so any
 * range of a stream can be drawn alone, and the noise of a row does not depend on which worker draws it.
 * Pairs are computed in whole aligned chunks, so the vector body, never a scalar remainder, computes
 * each value: the same bits whatever range asks for it (on one machine: SSE and AVX2 builds of libm's
 * vector functions may differ in the last bit). Built with -ffast-math so that logf, sinf and cosf
 * vectorise through glibc's libmvec; about 2x faster than torch's CPU normal_ (measured 0.78 ms
 * against 1.1-1.6 ms for 278,528 values).
 */
#include <math.h>
#include <stdint.h>

#define CHUNK 256

static inline uint64_t splitmix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

__attribute__((target_clones("avx2", "default"))) static void pairs(uint64_t seed, int64_t first_pair,
                                                                     float *restrict even, float *restrict odd) {
    float radius[CHUNK], angle[CHUNK];
    for (int i = 0; i < CHUNK; i++) {
        const uint64_t x = splitmix64(seed + (uint64_t)(first_pair + i + 1) * 0x9E3779B97F4A7C15ULL);
        radius[i] = (float)((int32_t)(x >> 40) + 1) * 0x1p-24f; /* (0, 1] */
        angle[i] = (float)(int32_t)(x & 0xFFFFFF) * (6.2831853071795864f * 0x1p-24f);
    }
    /* Separate loops: fused, gcc turns sinf and cosf into one sincosf, which does not vectorise. */
    for (int i = 0; i < CHUNK; i++) radius[i] = sqrtf(-2.0f * logf(radius[i]));
    for (int i = 0; i < CHUNK; i++) even[i] = radius[i] * cosf(angle[i]);
    for (int i = 0; i < CHUNK; i++) odd[i] = radius[i] * sinf(angle[i]);
}

/* Values [first, first + count) of stream `seed` into out[0, count). */
void normal_range(float *out, uint64_t seed, int64_t first, int64_t count) {
    float even[CHUNK], odd[CHUNK];
    const int64_t last = first + count;
    for (int64_t pair = first / 2 / CHUNK * CHUNK; 2 * pair < last; pair += CHUNK) {
        pairs(seed, pair, even, odd);
        const int64_t lo = 2 * pair > first ? 2 * pair : first;
        const int64_t hi = 2 * (pair + CHUNK) < last ? 2 * (pair + CHUNK) : last;
        for (int64_t e = lo; e < hi; e++) out[e - first] = (e & 1) ? odd[e / 2 - pair] : even[e / 2 - pair];
    }
}
