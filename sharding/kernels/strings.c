/* A 64-bit hash of each string of an Arrow string array, for the converter's name -> id lookup
 * (storage/convert.py): hashing the vocabulary once and each chunk's names once makes the lookup
 * O(names) instead of a hash table of the whole vocabulary rebuilt per chunk.
 *
 * The string is read 8 bytes at a time, each word folded in with the splitmix64 finaliser (a bijective
 * mixer), seeded by the length so that strings differing only in trailing zero bytes differ. Not
 * cryptographic: the converter checks that the vocabulary's hashes are distinct before relying on them.
 */
#include <stdint.h>
#include <string.h>

static inline uint64_t mix64(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* out[i] = hash of data[offsets[i], offsets[i + 1]) for i in [0, n). */
void hash_strings(const int32_t *offsets, const uint8_t *data, int64_t n, uint64_t seed, uint64_t *out) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *p = data + offsets[i];
        int64_t left = (int64_t)offsets[i + 1] - offsets[i];
        uint64_t h = mix64(seed + 0x9E3779B97F4A7C15ULL * (uint64_t)(left + 1));
        for (; left >= 8; left -= 8, p += 8) {
            uint64_t word;
            memcpy(&word, p, 8);
            h = mix64(h ^ word) + 0x9E3779B97F4A7C15ULL;
        }
        uint64_t word = 0;
        memcpy(&word, p, (size_t)left);
        out[i] = mix64(h ^ word);
    }
}

/* out[i] = positions[s] for the slot s where hashes[s] == wanted[i], searched in wanted[i]'s bucket
 * [starts[b], starts[b + 1]), b = wanted[i] >> shift (storage/convert.py: NameIndex); -1 where it is not
 * there. Returns how many were not there. */
int64_t probe_hashes(const uint64_t *hashes, const int64_t *starts, const int32_t *positions, int64_t shift,
                     const uint64_t *wanted, int64_t n, int32_t *out) {
    int64_t missing = 0;
#pragma omp parallel for schedule(static) reduction(+ : missing) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        uint64_t w = wanted[i], b = w >> shift;
        int64_t s = starts[b], end = starts[b + 1];
        while (s < end && hashes[s] != w)
            s++;
        out[i] = s < end ? positions[s] : -1;
        missing += s >= end;
    }
    return missing;
}
