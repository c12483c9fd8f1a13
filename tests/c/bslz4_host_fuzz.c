/*
 * The host bitshuffle-LZ4 decoder (kernels/azf_bslz4_host.h) under AddressSanitizer and
 * UndefinedBehaviorSanitizer: tests/test_bslz4.py compiles and runs this with the system C
 * compiler.
 *
 *   bslz4_host_fuzz CHUNK ITERATIONS SEED
 *
 * CHUNK: a bitshuffle-LZ4 chunk of uint32 elements in blocks of 2048 (HDF5 filter 32008, as
 * Eiger writes). Each iteration takes its first 1-40 blocks, damages 1-4 places inside them
 * (bits flipped, bytes or runs of bytes replaced; the chain of sizes may break too), copies it
 * into a buffer of exactly its size (a read past it is an error the sanitizer reports), walks
 * the chain as bslz4_walk does and, where it holds, decodes with each bit-unshuffle (64-bit
 * words, 16-byte vectors, AVX2 and AVX2 with GFNI where the CPU has them). Then random blocks
 * of every element size and 1-100 columns are bit-unshuffled by the four, which must agree.
 *
 * Prints "statuses S0 S1 ... S7" (decodes ending with each status) and "unshuffle mismatches
 * N"; exits 1 on a mismatch (a sanitizer error aborts it with its own report).
 */
#include "azf_bslz4_host.h"

#include <stdio.h>

static uint32_t read_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint8_t *read_file(const char *path, size_t *size)
{
    FILE *file = fopen(path, "rb");
    if (file == NULL)
        return NULL;
    fseek(file, 0, SEEK_END);
    *size = (size_t)ftell(file);
    rewind(file);
    uint8_t *data = (uint8_t *)malloc(*size);
    if (data == NULL || fread(data, 1, *size, file) != *size) {
        fclose(file);
        free(data);
        return NULL;
    }
    fclose(file);
    return data;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s CHUNK ITERATIONS SEED\n", argv[0]);
        return 2;
    }
    size_t size;
    uint8_t *original = read_file(argv[1], &size);
    if (original == NULL) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    const long iterations = atol(argv[2]);
    srand((unsigned)atoi(argv[3]));
    const size_t elem_size = 4, block_elems = 2048;
    long statuses[8] = {0};
    size_t available = 0, position = 12;   /* blocks in the chunk */
    while (position + 4 <= size && available < 40) {
        position += 4 + read_be32(original + position);
        available++;
    }
    for (long iteration = 0; iteration < iterations; iteration++) {
        const size_t n_blocks = 1 + (size_t)rand() % available;
        size_t length = 12;
        for (size_t block = 0; block < n_blocks; block++)
            length += 4 + read_be32(original + length);
        uint8_t *chunk = (uint8_t *)malloc(length);
        memcpy(chunk, original, length);
        for (int damage = 1 + rand() % 4; damage > 0; damage--) {
            const size_t at = 16 + (size_t)rand() % (length - 16);
            const int kind = rand() % 3;
            if (kind == 0) {
                chunk[at] ^= (uint8_t)(1u << (rand() % 8));
            } else if (kind == 1) {
                chunk[at] = (uint8_t)rand();
            } else {
                for (size_t k = 0, run = (size_t)rand() % 16; k < run && at + k < length; k++)
                    chunk[at + k] = (uint8_t)rand();
            }
        }
        uint32_t *ranges = (uint32_t *)malloc(n_blocks * 2 * sizeof(uint32_t));
        int chained = 1;
        position = 12;
        for (size_t block = 0; block < n_blocks; block++) {
            if (position + 4 > length) {
                chained = 0;
                break;
            }
            ranges[2 * block] = (uint32_t)(position + 4);
            position += 4 + (size_t)read_be32(chunk + position);
            if (position > length) {
                chained = 0;
                break;
            }
            ranges[2 * block + 1] = (uint32_t)position;
        }
        if (chained) {
            const size_t blocked = n_blocks * block_elems;
            for (int simd = 0; simd <= 3; simd++) {
                uint8_t *out = (uint8_t *)malloc(blocked * elem_size);
                long failed;
                const int status = azf_bslz4_decode(chunk, length, ranges, n_blocks,
                                                    block_elems, blocked, elem_size, out, simd,
                                                    &failed);
                statuses[status]++;
                free(out);
            }
        }
        free(ranges);
        free(chunk);
    }
    long mismatches = 0;
    for (int iteration = 0; iteration < 2000; iteration++) {
        const size_t item = (size_t)1 << (rand() % 4), columns = 1 + (size_t)rand() % 100;
        const size_t bytes = columns * 8 * item;
        uint8_t *in = (uint8_t *)malloc(bytes), *out[4];
        for (size_t k = 0; k < bytes; k++)
            in[k] = (uint8_t)rand();
        for (int simd = 0; simd <= 3; simd++) {
            out[simd] = (uint8_t *)malloc(bytes);
            azf_unshuffle_block(in, out[simd], columns, item, simd);
        }
        mismatches += memcmp(out[0], out[1], bytes) != 0 || memcmp(out[0], out[2], bytes) != 0
                      || memcmp(out[0], out[3], bytes) != 0;
        for (int simd = 0; simd <= 3; simd++)
            free(out[simd]);
        free(in);
    }
    printf("statuses");
    for (int status = 0; status < 8; status++)
        printf(" %ld", statuses[status]);
    printf("\nunshuffle mismatches %ld\n", mismatches);
    free(original);
    return mismatches != 0;
}
