/* The N-Triples converter's fast path (storage/sources.py, NTriplesSource._parse) in one pass over a
 * block of whole lines, in place of pyarrow's CSV split and the per-column checks that followed it.
 *
 * It decides exactly what those did: a line is split on every delimiter (the block's: tab or space);
 * four fields, the last exactly ".", the subject and predicate plain IRIs (<...> holding no byte of
 * <>"{}|^`\ and none up to 0x20), and an object that is a plain IRI (a triple) or starts with '"' (a
 * literal, whose grammar the caller checks with its regex). Empty lines are skipped, as the CSV reader
 * did; every other line goes back to the caller, which matches it whole against the grammar. A "\r"
 * before the "\n" is not part of the line (the caller sends blocks with a lone "\r" elsewhere).
 */
#include <stdint.h>
#include <string.h>

/* Bit c set for the bytes a plain IRI may hold between its brackets: every byte above 0x20 but
 * <>"{}|^`\ (storage/sources.py: _IRI_ALLOWED; tests/storage/test_convert.py checks the two agree). */
static const uint64_t IRI_BYTES[4] = {0xaffffffa00000000ULL, 0xc7fffffeafffffffULL, ~0ULL, ~0ULL};

static inline int iri_byte(uint8_t c) { return (IRI_BYTES[c >> 6] >> (c & 63)) & 1; }

static int plain_iri(const uint8_t *p, int64_t n) {
    if (n < 2 || p[0] != '<' || p[n - 1] != '>')
        return 0;
    for (int64_t i = 1; i < n - 1; i++)
        if (!iri_byte(p[i]))
            return 0;
    return 1;
}

/* 1 when s[0, n) is valid UTF-8 (no overlong forms, surrogates or code points past U+10FFFF). */
static int valid_utf8(const uint8_t *s, int64_t n) {
    int64_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t word;
            memcpy(&word, s + i, 8);
            if (!(word & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int extra;
        uint32_t lo = 0x80, hi = 0xBF; /* the allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF)
            extra = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            extra = 2;
            if (c == 0xE0)
                lo = 0xA0;
            if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            extra = 3;
            if (c == 0xF0)
                lo = 0x90;
            if (c == 0xF4)
                hi = 0x8F;
        } else
            return 0;
        if (i + extra >= n)
            return 0;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return 0;
        for (int k = 2; k <= extra; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
        i += extra + 1;
    }
    return 1;
}

static void append(const uint8_t *term, int64_t n, int32_t *offsets, uint8_t *values, int64_t row) {
    memcpy(values + offsets[row], term, (size_t)n);
    offsets[row + 1] = offsets[row] + (int32_t)n;
}

/* Scan block[0, n). Triples' terms, without their brackets, are appended to the string columns
 * (offsets[rows + 1], values) heads, relations and tails; literal objects, with their quotes, to
 * literals, and each one's line span (start, end) to literal_lines; the lines for the caller's grammar
 * go to other as (start, end, reason): 0 not four fields, 1 an IRI object but a term or the end wrong,
 * 2 a literal object but the subject, predicate or end wrong. counts: triples, literals, other lines.
 * Each output holds one entry per line at most; each values buffer n bytes. Returns 0, or -1 when the
 * block is not valid UTF-8 (nothing is written then). */
int nt_scan(const uint8_t *block, int64_t n, uint8_t delimiter, int32_t *head_offsets, uint8_t *head_values,
            int32_t *relation_offsets, uint8_t *relation_values, int32_t *tail_offsets, uint8_t *tail_values,
            int32_t *literal_offsets, uint8_t *literal_values, int64_t *literal_lines, int64_t *other,
            int64_t *counts) {
    if (!valid_utf8(block, n))
        return -1;
    int64_t triples = 0, literals = 0, others = 0;
    head_offsets[0] = relation_offsets[0] = tail_offsets[0] = literal_offsets[0] = 0;
    for (int64_t start = 0; start < n;) {
        const uint8_t *line = block + start;
        const uint8_t *newline = memchr(line, '\n', (size_t)(n - start));
        int64_t length = newline ? newline - line : n - start;
        int64_t next = start + length + 1;
        if (length && line[length - 1] == '\r')
            length--;
        if (length == 0) {
            start = next;
            continue;
        }
        /* Fields start at field[k] and end one byte before field[k + 1] (the last one at the line's end). */
        int64_t field[4] = {0, 0, 0, 0}, position = 0;
        int count = 1;
        while (count <= 4) {
            const uint8_t *hit = memchr(line + position, delimiter, (size_t)(length - position));
            if (!hit)
                break;
            position = hit - line + 1;
            if (count < 4)
                field[count] = position;
            count++;
        }
        if (count != 4) {
            other[3 * others] = start, other[3 * others + 1] = start + length, other[3 * others + 2] = 0;
            others++;
            start = next;
            continue;
        }
        const uint8_t *subject = line, *predicate = line + field[1], *object = line + field[2];
        int64_t subject_n = field[1] - 1, predicate_n = field[2] - field[1] - 1, object_n = field[3] - field[2] - 1;
        int ends = length - field[3] == 1 && line[field[3]] == '.';
        int literal = object_n > 0 && object[0] == '"';
        int terms = plain_iri(subject, subject_n) && plain_iri(predicate, predicate_n);
        if (ends && terms && literal) {
            append(object, object_n, literal_offsets, literal_values, literals);
            literal_lines[2 * literals] = start, literal_lines[2 * literals + 1] = start + length;
            literals++;
        } else if (ends && terms && !literal && plain_iri(object, object_n)) {
            append(subject + 1, subject_n - 2, head_offsets, head_values, triples);
            append(predicate + 1, predicate_n - 2, relation_offsets, relation_values, triples);
            append(object + 1, object_n - 2, tail_offsets, tail_values, triples);
            triples++;
        } else {
            other[3 * others] = start, other[3 * others + 1] = start + length, other[3 * others + 2] = literal ? 2 : 1;
            others++;
        }
        start = next;
    }
    counts[0] = triples, counts[1] = literals, counts[2] = others;
    return 0;
}
