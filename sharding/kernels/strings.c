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
        if (left) memcpy(&word, p, (size_t)left); /* all strings empty: Arrow may give no data buffer (NULL) */
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

/* The first occurrence of each distinct string of an Arrow string array (offsets, data) whose hashes
 * (hash_strings) are given: their indices into out, in the order they first occur; returns how many.
 * An open-addressing table of 2^bits slots (caller's scratch, 2^bits >= 2n) holds the index of each
 * string kept; an equal hash is confirmed by comparing the bytes, so the result is exact. */
int64_t distinct_strings(const int32_t *offsets, const uint8_t *data, const uint64_t *hashes, int64_t n,
                         int32_t *table, int64_t bits, int32_t *out) {
    uint64_t mask = ((uint64_t)1 << bits) - 1;
    memset(table, 0xff, sizeof(int32_t) << bits);
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t h = hashes[i];
        int32_t length = offsets[i + 1] - offsets[i];
        for (uint64_t s = h & mask;; s = (s + 1) & mask) {
            int32_t j = table[s];
            if (j < 0) {
                table[s] = (int32_t)i;
                out[count++] = (int32_t)i;
                break;
            }
            if (hashes[j] == h && offsets[j + 1] - offsets[j] == length &&
                !memcmp(data + offsets[j], data + offsets[i], (size_t)length))
                break;
        }
    }
    return count;
}
