/*
 * azfilter: bitshuffle-LZ4 (HDF5 filter 32008) decoding on the host, one chunk per call.
 *
 * The chunk format and the error codes are those of the OpenCL decoder (azf_bslz4.cl, whose
 * header describes the format); the caller has walked the chain of block sizes already
 * (bslz4_walk in _chunks.pyx) and passes each block's byte range.
 *
 * Why our own code rather than a library (README, "Decoder choice"): imagecodecs decodes the
 * LZ4 blocks of a whole piece into memory, then bit-unshuffles it with SSE2 code in a second
 * pass, 9-10 ms per Eiger 4M uint32 frame on one core; the bitshuffle package decodes block by
 * block (the block stays in the L1 cache) with AVX2 in 4.5 ms, but with LZ4_decompress_fast,
 * which trusts the data and crashed the process on every corrupt chunk tried. Here each block
 * is decoded with every read and write bounds-checked into a per-call scratch block (cache
 * resident), then bit-unshuffled from there into the frame: with AVX2 where the CPU has it
 * (chosen at run time; each 8x8 bit transpose one GF2P8AFFINEQB where it also has GFNI, the
 * 32-byte code in azf_bslz4_avx2.inc), else with 16-byte vectors (SSE2, NEON), and the last
 * columns of a block with 64-bit words.
 *
 * Bit-unshuffle. A block of n elements (n a multiple of 8) is a (8 * E) x (n / 8) byte matrix:
 * row 8*b + k holds bit k of byte b of the elements, bit i of its byte g belonging to element
 * 8*g + i. For one column g and one byte b, the 8 bytes of rows 8b..8b+7 form an 8x8 bit
 * matrix (byte k = row k) whose transpose has byte i = byte b of element 8*g + i.
 */
#ifndef AZF_BSLZ4_HOST_H
#define AZF_BSLZ4_HOST_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AZF_BSLZ4_X86 1
#include <immintrin.h>
#else
#define AZF_BSLZ4_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define AZF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define AZF_ALWAYS_INLINE inline
#endif

/* error codes: the same as azf_bslz4.cl's */
#define AZF_BSLZ4_OK 0
#define AZF_BSLZ4_LITERALS_PAST_INPUT 1
#define AZF_BSLZ4_OUTPUT_OVERFLOW 2
#define AZF_BSLZ4_BAD_OFFSET 3
#define AZF_BSLZ4_OFFSET_PAST_INPUT 4
#define AZF_BSLZ4_SHORT_OUTPUT 5
#define AZF_BSLZ4_BAD_RANGE 6
#define AZF_BSLZ4_NO_MEMORY 7

/* bytes after the scratch block that a copy may write past its end (16-byte steps) */
#define AZF_BSLZ4_SLACK 16

/* Length extension bytes (255, 255, ..., < 255); 0 when the input ends before the last. */
static inline int azf_lz4_length(const uint8_t **ip, const uint8_t *end, size_t *length)
{
    unsigned byte;
    do {
        if (*ip >= end)
            return 0;
        byte = *(*ip)++;
        *length += byte;
    } while (byte == 255);
    return 1;
}

/* One LZ4 block [src, src_end) into exactly dst_bytes at dst, which has AZF_BSLZ4_SLACK
 * writable bytes after it. Reads of the chunk stay within [src, src_end) except the 16-byte
 * steps of short literal runs, which stay within [src, chunk_end). Returns an error code. */
static int azf_lz4_block(const uint8_t *src, const uint8_t *src_end, const uint8_t *chunk_end,
                         uint8_t *dst, size_t dst_bytes)
{
    const uint8_t *ip = src;
    uint8_t *op = dst;
    uint8_t *const dst_end = dst + dst_bytes;
    while (ip < src_end) {   /* a block ends after a literal-only sequence */
        const unsigned token = *ip++;
        size_t literals = token >> 4;
        if (literals == 15 && !azf_lz4_length(&ip, src_end, &literals))
            return AZF_BSLZ4_LITERALS_PAST_INPUT;
        if (literals > (size_t)(src_end - ip))
            return AZF_BSLZ4_LITERALS_PAST_INPUT;
        if (literals > (size_t)(dst_end - op))
            return AZF_BSLZ4_OUTPUT_OVERFLOW;
        if (literals <= 16 && chunk_end - ip >= 16) {
            memcpy(op, ip, 16);   /* one step; the slack takes what passes the block */
        } else {
            memcpy(op, ip, literals);
        }
        ip += literals;
        op += literals;
        if (ip >= src_end)
            break;
        if (src_end - ip < 2)
            return AZF_BSLZ4_OFFSET_PAST_INPUT;
        const size_t offset = (size_t)ip[0] | ((size_t)ip[1] << 8);
        ip += 2;
        size_t length = token & 15;
        if (length == 15 && !azf_lz4_length(&ip, src_end, &length))
            return AZF_BSLZ4_OFFSET_PAST_INPUT;
        length += 4;
        if (offset == 0 || offset > (size_t)(op - dst))
            return AZF_BSLZ4_BAD_OFFSET;
        if (length > (size_t)(dst_end - op))
            return AZF_BSLZ4_OUTPUT_OVERFLOW;
        const uint8_t *match = op - offset;
        if (offset >= 16 && length <= 16) {
            memcpy(op, match, 16);   /* one step; the slack takes what passes the block */
        } else if (offset >= length) {
            memcpy(op, match, length);
        } else if (offset == 1) {
            memset(op, *match, length);   /* runs of one byte: bit planes of zeros */
        } else if (offset == 2 || offset == 4 || offset == 8) {
            /* the most common overlapping matches (offset 2: ~36000 of ~118000 sequences of
             * an Eiger 4M frame): the 16-byte pattern made from the offset's bytes, without
             * the byte loop below (LZ4 of a frame 2.06 -> 1.70 ms on the Xeon) */
            uint64_t word;
            if (offset == 8) {
                memcpy(&word, match, 8);
            } else if (offset == 4) {
                uint32_t unit;
                memcpy(&unit, match, 4);
                word = unit * 0x0000000100000001ULL;
            } else {
                uint16_t unit;
                memcpy(&unit, match, 2);
                word = unit * 0x0001000100010001ULL;
            }
            uint8_t pattern[16];
            memcpy(pattern, &word, 8);
            memcpy(pattern + 8, &word, 8);
            for (size_t t = 0; t < length; t += 16)
                memcpy(op + t, pattern, 16);
        } else {
            /* Overlapping, at an offset that does not divide 16 (those that do are above):
             * the match repeats its `offset` bytes, so any multiple of `offset` is a period
             * too. 16-byte steps that read only bytes written at least one step before; a
             * period under 16 bytes is widened, its first bytes copied one by one. */
            size_t period = offset, t = 0;
            if (offset < 16) {
                period = offset * ((15 + offset) / offset);
                for (; t < period && t < length; t++)
                    op[t] = match[t];
            }
            for (; t < length; t += 16)
                memcpy(op + t, op + t - period, 16);
        }
        op += length;
    }
    return op == dst_end ? AZF_BSLZ4_OK : AZF_BSLZ4_SHORT_OUTPUT;
}

/* Transpose of the 8x8 bit matrix in each 64-bit word of x (byte k = row k, bit i = column
 * i): three exchanges of the off-diagonal blocks (1x1, 2x2, 4x4 bits), on a uint64_t or a
 * vector of them (t: scratch of the same type). */
#define AZF_TRANSPOSE8(x, t) do {                         \
        t = ((x) ^ ((x) >> 7)) & 0x00AA00AA00AA00AAULL;   \
        x = (x) ^ (t) ^ ((t) << 7);                       \
        t = ((x) ^ ((x) >> 14)) & 0x0000CCCC0000CCCCULL;  \
        x = (x) ^ (t) ^ ((t) << 14);                      \
        t = ((x) ^ ((x) >> 28)) & 0x00000000F0F0F0F0ULL;  \
        x = (x) ^ (t) ^ ((t) << 28);                      \
    } while (0)

static inline uint64_t azf_transpose8(uint64_t x)
{
    uint64_t t;
    AZF_TRANSPOSE8(x, t);
    return x;
}

/* Bit-unshuffle of columns [first, columns) of a block with 64-bit words (any element size;
 * the path where AVX2 is missing). */
static AZF_ALWAYS_INLINE void
azf_unshuffle_words_of(const uint8_t *in, uint8_t *out, size_t columns, size_t first,
                       const size_t elem_size)
{
    for (size_t g = first; g < columns; g++) {
        uint64_t transposed[8];   /* byte b of elements 8g .. 8g + 7 */
        for (size_t b = 0; b < elem_size; b++) {
            const uint8_t *rows = in + 8 * b * columns + g;
            uint64_t x = 0;
            for (int k = 0; k < 8; k++)
                x |= (uint64_t)rows[k * columns] << (8 * k);
            transposed[b] = azf_transpose8(x);
        }
        uint8_t *elements = out + 8 * g * elem_size;
        for (int i = 0; i < 8; i++) {
            uint64_t value = 0;
            for (size_t b = 0; b < elem_size; b++)
                value |= ((transposed[b] >> (8 * i)) & 0xFF) << (8 * b);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            memcpy(elements + i * elem_size, &value, elem_size);
#else
            for (size_t b = 0; b < elem_size; b++)
                elements[i * elem_size + b] = (uint8_t)(value >> (8 * b));
#endif
        }
    }
}

/* azf_unshuffle_words_of compiled for each element size (a constant size lets the compiler
 * keep the words in registers and store each element with one instruction) */
static void azf_unshuffle_words(const uint8_t *in, uint8_t *out, size_t columns,
                                size_t first, size_t elem_size)
{
    switch (elem_size) {
    case 1: azf_unshuffle_words_of(in, out, columns, first, 1); break;
    case 2: azf_unshuffle_words_of(in, out, columns, first, 2); break;
    case 4: azf_unshuffle_words_of(in, out, columns, first, 4); break;
    default: azf_unshuffle_words_of(in, out, columns, first, 8); break;
    }
}

/* The same algorithm as the AVX2 code below, on 16-byte vectors of the compiler's vector
 * extensions (SSE2 on any x86-64, NEON on ARM): the path of CPUs without AVX2. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && (defined(__GNUC__) || defined(__clang__))
#define AZF_BSLZ4_VECTORS 1
#endif
#endif
#ifndef AZF_BSLZ4_VECTORS
#define AZF_BSLZ4_VECTORS 0
#endif

#if AZF_BSLZ4_VECTORS
typedef uint8_t azf_v16 __attribute__((vector_size(16), aligned(1)));
typedef uint16_t azf_v8 __attribute__((vector_size(16)));
typedef uint32_t azf_v4 __attribute__((vector_size(16)));
typedef uint64_t azf_v2 __attribute__((vector_size(16)));

/* interleave the low (lo) or high (hi) halves of a and b, by 1-, 2- and 4-byte units */
#define AZF_LO8(a, b) __builtin_shufflevector((azf_v16)(a), (azf_v16)(b), 0, 16, 1, 17, 2, 18, \
                                              3, 19, 4, 20, 5, 21, 6, 22, 7, 23)
#define AZF_HI8(a, b) __builtin_shufflevector((azf_v16)(a), (azf_v16)(b), 8, 24, 9, 25, 10, 26, \
                                              11, 27, 12, 28, 13, 29, 14, 30, 15, 31)
#define AZF_LO16(a, b) __builtin_shufflevector((azf_v8)(a), (azf_v8)(b), 0, 8, 1, 9, 2, 10, 3, 11)
#define AZF_HI16(a, b) __builtin_shufflevector((azf_v8)(a), (azf_v8)(b), 4, 12, 5, 13, 6, 14, \
                                               7, 15)
#define AZF_LO32(a, b) __builtin_shufflevector((azf_v4)(a), (azf_v4)(b), 0, 4, 1, 5)
#define AZF_HI32(a, b) __builtin_shufflevector((azf_v4)(a), (azf_v4)(b), 2, 6, 3, 7)

static inline azf_v2 azf_transpose8_v2(azf_v2 x)
{
    azf_v2 t;
    AZF_TRANSPOSE8(x, t);
    return x;
}

static inline void azf_store16(uint8_t *to, azf_v16 v) { memcpy(to, &v, 16); }

/* Columns c..c+15 of one byte of the elements: eight vectors of two columns' transposed
 * words each; vector 4h + 2s + u holds columns 8h + 4s + 2u and the next. */
static inline void azf_columns_v16(const uint8_t *rows, size_t columns, size_t c,
                                   azf_v2 words[8])
{
    azf_v16 r[8], p[8];
    azf_v4 q[8];
    for (int k = 0; k < 8; k++)
        memcpy(&r[k], rows + k * columns + c, 16);
    for (int k = 0; k < 4; k++) {
        p[2 * k] = AZF_LO8(r[2 * k], r[2 * k + 1]);       /* columns 0-7 */
        p[2 * k + 1] = AZF_HI8(r[2 * k], r[2 * k + 1]);   /* columns 8-15 */
    }
    for (int h = 0; h < 2; h++) {
        q[4 * h + 0] = (azf_v4)AZF_LO16(p[0 + h], p[2 + h]);   /* rows 0-3 */
        q[4 * h + 1] = (azf_v4)AZF_HI16(p[0 + h], p[2 + h]);
        q[4 * h + 2] = (azf_v4)AZF_LO16(p[4 + h], p[6 + h]);   /* rows 4-7 */
        q[4 * h + 3] = (azf_v4)AZF_HI16(p[4 + h], p[6 + h]);
    }
    for (int h = 0; h < 2; h++) {
        for (int s = 0; s < 2; s++) {
            words[4 * h + 2 * s] = azf_transpose8_v2(
                (azf_v2)AZF_LO32(q[4 * h + s], q[4 * h + 2 + s]));
            words[4 * h + 2 * s + 1] = azf_transpose8_v2(
                (azf_v2)AZF_HI32(q[4 * h + s], q[4 * h + 2 + s]));
        }
    }
}

static AZF_ALWAYS_INLINE size_t azf_unshuffle_v16_of(const uint8_t *in, uint8_t *out,
                                                      size_t columns, size_t first,
                                                      const size_t elem_size)
{
    size_t c = first;
    for (; c + 16 <= columns; c += 16) {
        azf_v2 w[8][8];   /* [byte of the element][vector] */
        for (size_t b = 0; b < elem_size; b++)
            azf_columns_v16(in + 8 * b * columns, columns, c, w[b]);
        for (int j = 0; j < 8; j++) {
            const size_t col = c + 8 * (j >> 2) + 4 * ((j >> 1) & 1) + 2 * (j & 1);
            if (elem_size == 1) {
                azf_store16(out + 8 * col, (azf_v16)w[0][j]);
                continue;
            }
            azf_v16 pairs[2][4];   /* [column col / col + 1][pair of bytes] */
            for (size_t m = 0; 2 * m < elem_size; m++) {
                pairs[0][m] = AZF_LO8(w[2 * m][j], w[2 * m + 1][j]);
                pairs[1][m] = AZF_HI8(w[2 * m][j], w[2 * m + 1][j]);
            }
            for (int u = 0; u < 2; u++) {
                uint8_t *o = out + 8 * elem_size * (col + u);
                if (elem_size == 2) {
                    azf_store16(o, pairs[u][0]);
                    continue;
                }
                const azf_v16 q0lo = (azf_v16)AZF_LO16(pairs[u][0], pairs[u][1]);
                const azf_v16 q0hi = (azf_v16)AZF_HI16(pairs[u][0], pairs[u][1]);
                if (elem_size == 4) {
                    azf_store16(o, q0lo);
                    azf_store16(o + 16, q0hi);
                    continue;
                }
                const azf_v16 q1lo = (azf_v16)AZF_LO16(pairs[u][2], pairs[u][3]);
                const azf_v16 q1hi = (azf_v16)AZF_HI16(pairs[u][2], pairs[u][3]);
                azf_store16(o, (azf_v16)AZF_LO32(q0lo, q1lo));
                azf_store16(o + 16, (azf_v16)AZF_HI32(q0lo, q1lo));
                azf_store16(o + 32, (azf_v16)AZF_LO32(q0hi, q1hi));
                azf_store16(o + 48, (azf_v16)AZF_HI32(q0hi, q1hi));
            }
        }
    }
    return c;
}

/* azf_unshuffle_v16_of for each element size, from column `first`; returns the first column
 * not done */
static size_t azf_unshuffle_v16(const uint8_t *in, uint8_t *out, size_t columns, size_t first,
                                size_t elem_size)
{
    switch (elem_size) {
    case 1: return azf_unshuffle_v16_of(in, out, columns, first, 1);
    case 2: return azf_unshuffle_v16_of(in, out, columns, first, 2);
    case 4: return azf_unshuffle_v16_of(in, out, columns, first, 4);
    default: return azf_unshuffle_v16_of(in, out, columns, first, 8);
    }
}
#endif

#if AZF_BSLZ4_X86
/* The transpose of azf_transpose8 in each 64-bit lane (unsigned lanes: logical shifts). */
typedef uint64_t azf_v4x64 __attribute__((vector_size(32)));

__attribute__((target("avx2")))
static inline __m256i azf_transpose8_avx2(__m256i in)
{
    azf_v4x64 x = (azf_v4x64)in, t;
    AZF_TRANSPOSE8(x, t);
    return (__m256i)x;
}

/* The first column (of the 32) in the low 128-bit lane of words[j]; the lane holds columns
 * base and base + 1, the high lane base + 16 and base + 17. */
static inline int azf_column_of_word(int j)
{
    /* j = 4h + 2s + u: the unpacks took h (8), s (4) and u (2) */
    return 8 * (j >> 2) + 4 * ((j >> 1) & 1) + 2 * (j & 1);
}

/* GF2P8AFFINEQB computes byte i of each 64-bit lane as the parity of (byte 7 - j of the
 * matrix operand & byte i of the data) for each bit j: with data bytes 1 << i, bit j of byte
 * i is bit i of matrix byte 7 - j. The rows of a word loaded in reverse (AZF_AVX2_ROW) put
 * row j in matrix byte 7 - j: byte i of the result is then the transpose's byte i. */
__attribute__((target("avx2,gfni")))
static inline __m256i azf_transpose8_gfni(__m256i reversed_rows)
{
    return _mm256_gf2p8affine_epi64_epi8(_mm256_set1_epi64x(0x8040201008040201LL),
                                         reversed_rows, 0);
}

#define AZF_AVX2_TARGET "avx2"
#define AZF_AVX2_NAME(name) name##_avx2
#define AZF_AVX2_ROW(k) (k)
#define AZF_AVX2_TRANSPOSE azf_transpose8_avx2
#include "azf_bslz4_avx2.inc"
#undef AZF_AVX2_TARGET
#undef AZF_AVX2_NAME
#undef AZF_AVX2_ROW
#undef AZF_AVX2_TRANSPOSE

#define AZF_AVX2_TARGET "avx2,gfni"
#define AZF_AVX2_NAME(name) name##_gfni
#define AZF_AVX2_ROW(k) (7 - (k))
#define AZF_AVX2_TRANSPOSE azf_transpose8_gfni
#include "azf_bslz4_avx2.inc"
#undef AZF_AVX2_TARGET
#undef AZF_AVX2_NAME
#undef AZF_AVX2_ROW
#undef AZF_AVX2_TRANSPOSE

#endif

/* 1 when the bit-unshuffle runs with AVX2 (an x86-64 CPU that has it) */
static int azf_has_avx2(void)
{
#if AZF_BSLZ4_X86
    static int known = -1;
    if (known < 0)
        known = __builtin_cpu_supports("avx2") ? 1 : 0;
    return known;
#else
    return 0;
#endif
}

/* 1 when the bit-unshuffle can run with AVX2 and GFNI (Intel since Ice Lake, AMD since Zen 4) */
static int azf_has_gfni(void)
{
#if AZF_BSLZ4_X86
    static int known = -1;
    if (known < 0)
        known = azf_has_avx2() && __builtin_cpu_supports("gfni") ? 1 : 0;
    return known;
#else
    return 0;
#endif
}

/* Bit-unshuffle of one block of `columns` * 8 elements of elem_size bytes. simd: 3 the
 * widest the CPU has (AVX2 with GFNI, else AVX2, else 16-byte vectors), 2 AVX2 without GFNI
 * (else 16-byte vectors), 1 16-byte vectors, 0 64-bit words only (the tests compare them);
 * the columns a vector step leaves go to the words. */
static void azf_unshuffle_block(const uint8_t *in, uint8_t *out, size_t columns,
                                size_t elem_size, int simd)
{
    size_t first = 0;
#if AZF_BSLZ4_X86
    if (simd >= 3 && azf_has_gfni())
        first = azf_unshuffle_gfni(in, out, columns, elem_size);
    else if (simd >= 2 && azf_has_avx2())
        first = azf_unshuffle_avx2(in, out, columns, elem_size);
#endif
#if AZF_BSLZ4_VECTORS
    if (simd >= 1)
        first = azf_unshuffle_v16(in, out, columns, first, elem_size);
#endif
    (void)simd;
    if (first < columns)
        azf_unshuffle_words(in, out, columns, first, elem_size);
}

/* Decode the blocks of a bitshuffle-LZ4 chunk into out (blocked_elems * elem_size bytes; the
 * uncompressed tail is the caller's). ranges: n_blocks (start, end) byte pairs of each block's
 * LZ4 data in the chunk. Returns an error code; *failed_block is the block that failed. */
static int azf_bslz4_decode(const uint8_t *chunk, size_t chunk_bytes, const uint32_t *ranges,
                            size_t n_blocks, size_t block_elems, size_t blocked_elems,
                            size_t elem_size, uint8_t *out, int simd, long *failed_block)
{
    /* the largest block: a full one, or all the elements when they fill less (a damaged
     * header may announce blocks of gigabytes) */
    const size_t largest = block_elems < blocked_elems ? block_elems : blocked_elems;
    uint8_t *scratch = (uint8_t *)malloc(largest * elem_size + AZF_BSLZ4_SLACK);
    int status = AZF_BSLZ4_OK;
    *failed_block = -1;
    if (scratch == NULL)
        return AZF_BSLZ4_NO_MEMORY;
    for (size_t block = 0; block < n_blocks; block++) {
        const size_t first = block * block_elems;
        const size_t elems = block_elems < blocked_elems - first ? block_elems
                                                                 : blocked_elems - first;
        const size_t start = ranges[2 * block], end = ranges[2 * block + 1];
        if (first >= blocked_elems || start > end || end > chunk_bytes) {
            status = AZF_BSLZ4_BAD_RANGE;
        } else {
            status = azf_lz4_block(chunk + start, chunk + end, chunk + chunk_bytes, scratch,
                                   elems * elem_size);
        }
        if (status != AZF_BSLZ4_OK) {
            *failed_block = (long)block;
            break;
        }
        azf_unshuffle_block(scratch, out + first * elem_size, elems / 8, elem_size, simd);
    }
    free(scratch);
    return status;
}

#endif
