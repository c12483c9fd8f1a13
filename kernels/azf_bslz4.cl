/*
 * azfilter OpenCL kernel: bitshuffle-LZ4 decoder (HDF5 filter 32008, as Dectris Eiger writes).
 *
 * A chunk is
 *   8 bytes  big-endian: uncompressed size in bytes
 *   4 bytes  big-endian: block size in bytes (a multiple of 8 elements)
 *   per block: 4 bytes big-endian compressed size, then one LZ4 block
 *   the last (n_elements % 8) elements, stored as they are.
 * Full blocks hold block_elems elements; a last, shorter block holds the remaining multiple
 * of 8 elements. Each block decompresses to its elements' bytes in bit-shuffled order: a
 * (8 * ELEM_SIZE) x (elements / 8) byte matrix whose row (8*b + k) holds bit k of byte b of
 * the elements, bit i of its byte g belonging to element 8*g + i.
 *
 * The host walks the chain of block sizes (cheap) and hands the kernel each block's
 * compressed byte range. One work-group decodes one block, in two phases:
 *
 *  1. LZ4. Work-item 0 parses the sequence headers (token, lengths, offset) of up to NSEQ
 *     sequences into local memory; the whole group then copies every literal run of that
 *     batch (independent copies), and then every match, in order. A match reads only output
 *     that precedes it, so it may run without a barrier unless it reads bytes that a match
 *     since the last barrier wrote: work-item 0 tracks that interval while parsing and marks
 *     the matches that need a barrier before them (the flag is in local memory, so every
 *     work-item takes the same path). An overlapping match (offset < length) repeats its
 *     `offset` source bytes: byte t is out[start - offset + t % offset], all of which precede
 *     the match, so its bytes are copied in parallel too.
 *  2. Bit-unshuffle. Work-item per 8 elements: for each byte b of the element, the 8 bytes of
 *     rows 8b..8b+7 at column g form an 8x8 bit matrix whose transpose gives byte b of
 *     elements 8g..8g+7; the elements are stored with one typed store each.
 *
 * The block is decompressed into local memory (BLOCK_IN_LOCAL, LBLOCK bytes) when it fits,
 * otherwise into a global scratch buffer of one block per work-group.
 *
 * Every read of the chunk and every write of the block is bounds-checked: a corrupt chunk
 * sets error[0] to a code (first error wins) and error[1] to the block, never a crash.
 *
 * Options: -D ELEM_SIZE=<1|2|4|8> -D WG=<work-group size> -D NSEQ=<sequences per batch>
 *          -D BLOCK_IN_LOCAL=<0|1> -D LBLOCK=<local block capacity, bytes>
 */

#ifndef ELEM_SIZE
#define ELEM_SIZE 4
#endif
#ifndef WG
#define WG 64
#endif
#ifndef NSEQ
#define NSEQ 128
#endif
#ifndef BLOCK_IN_LOCAL
#define BLOCK_IN_LOCAL 1
#endif
#ifndef LBLOCK
#define LBLOCK 8192
#endif

#if ELEM_SIZE == 1
typedef uchar elem_t;
#elif ELEM_SIZE == 2
typedef ushort elem_t;
#elif ELEM_SIZE == 4
typedef uint elem_t;
#elif ELEM_SIZE == 8
typedef ulong elem_t;
#else
#error "ELEM_SIZE must be 1, 2, 4 or 8"
#endif

#if BLOCK_IN_LOCAL
#define BUF_SPACE local
#define BUF_FENCE CLK_LOCAL_MEM_FENCE
#else
#define BUF_SPACE global
#define BUF_FENCE (CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE)
#endif

/* Error codes (error[0]); the host turns them into messages. */
#define BSLZ4_OK 0
#define BSLZ4_LITERALS_PAST_INPUT 1     /* a literal run or its length runs past the block */
#define BSLZ4_OUTPUT_OVERFLOW 2         /* a sequence writes past the block's size */
#define BSLZ4_BAD_OFFSET 3              /* a match offset of 0 or before the block's start */
#define BSLZ4_OFFSET_PAST_INPUT 4       /* the block ends inside a match offset or length */
#define BSLZ4_SHORT_OUTPUT 5            /* the block decodes to fewer bytes than it holds */
#define BSLZ4_BAD_RANGE 6               /* the block's compressed range is outside the chunk */

/* Literal runs at least this long are copied by the whole work-group, shorter ones by one
 * work-item each. */
#define LONG_LITERALS (2 * WG)

inline void report_error(global int *error, const int code, const int block)
{
    if (atomic_cmpxchg(error, 0, code) == 0)
        error[1] = block;
}

/* Length extension bytes (255, 255, ..., < 255) starting at *ip; returns 0 when the block's
 * input ends before the last one. */
inline int read_length(global const uchar *chunk, uint *ip, const uint end, uint *length)
{
    uint byte;
    do {
        if (*ip >= end)
            return 0;
        byte = chunk[(*ip)++];
        *length += byte;
    } while (byte == 255);
    return 1;
}

kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void bslz4_decode(global const uchar *chunk, const uint chunk_bytes,
                  global const uint2 *block_ranges, const uint n_blocks,
                  const uint block_elems, const uint blocked_elems,
                  const uint tail_offset, const uint tail_elems,
                  global elem_t *out, global uchar *scratch, global int *error)
{
    const int lid = get_local_id(0);
    const int block = get_group_id(0);

    /* the last (n % 8) elements are stored as they are, after the blocks */
    if (block == 0) {
        const uint tail_bytes = tail_elems * ELEM_SIZE;
        if (tail_offset + tail_bytes <= chunk_bytes) {
            global uchar *tail = (global uchar *)(out + blocked_elems);
            for (uint t = lid; t < tail_bytes; t += WG)
                tail[t] = chunk[tail_offset + t];
        } else if (lid == 0) {
            report_error(error, BSLZ4_BAD_RANGE, -1);
        }
    }
    if (block >= (int)n_blocks)
        return;   /* uniform in the work-group: a launch of one group for a tail alone */

    const uint first_elem = (uint)block * block_elems;
    const uint elems = min(block_elems, blocked_elems - first_elem);
    const uint block_bytes = elems * ELEM_SIZE;
    uint2 range = block_ranges[block];
    if (range.x > range.y || range.y > chunk_bytes)
        range = (uint2)(0, 0);   /* reported below by work-item 0, decodes as an empty block */

#if BLOCK_IN_LOCAL
    local uchar buf[LBLOCK];
#else
    global uchar *buf = scratch + (size_t)block * (size_t)block_elems * ELEM_SIZE;
#endif
    /* one batch of parsed sequences */
    local uint lit_src[NSEQ], lit_len[NSEQ], dst[NSEQ], match_off[NSEQ], match_len[NSEQ];
    local uchar sync_before[NSEQ];
    local int batch_count, batch_status;   /* status: 0 more to come, 1 done, 2 error */

    /* work-item 0's parser state, kept across batches */
    uint ip = range.x;
    uint op = 0;
    int failed = range.x == 0 && range.y == 0;
    if (lid == 0 && failed)
        report_error(error, BSLZ4_BAD_RANGE, block);

    for (;;) {
        if (lid == 0) {
            int count = 0;
            int status = failed ? 2 : 0;
            /* destinations of the matches copied since the last barrier */
            uint dirty_lo = 0, dirty_hi = 0;
            while (status == 0 && count < NSEQ) {
                if (ip >= range.y) {   /* an LZ4 block ends with a literal-only sequence */
                    status = 1;
                    break;
                }
                const uint token = chunk[ip++];
                uint literals = token >> 4;
                if (literals == 15 && !read_length(chunk, &ip, range.y, &literals)) {
                    report_error(error, BSLZ4_LITERALS_PAST_INPUT, block);
                    status = 2;
                    break;
                }
                if (literals > range.y - ip) {
                    report_error(error, BSLZ4_LITERALS_PAST_INPUT, block);
                    status = 2;
                    break;
                }
                if (literals > block_bytes - op) {
                    report_error(error, BSLZ4_OUTPUT_OVERFLOW, block);
                    status = 2;
                    break;
                }
                lit_src[count] = ip;
                lit_len[count] = literals;
                ip += literals;
                op += literals;
                uint offset = 0, length = 0;
                if (ip < range.y) {   /* not the last sequence: a match follows */
                    if (range.y - ip < 2) {
                        report_error(error, BSLZ4_OFFSET_PAST_INPUT, block);
                        status = 2;
                        break;
                    }
                    offset = (uint)chunk[ip] | ((uint)chunk[ip + 1] << 8);
                    ip += 2;
                    length = token & 15;
                    if (length == 15 && !read_length(chunk, &ip, range.y, &length)) {
                        report_error(error, BSLZ4_OFFSET_PAST_INPUT, block);
                        status = 2;
                        break;
                    }
                    length += 4;
                    if (offset == 0 || offset > op) {
                        report_error(error, BSLZ4_BAD_OFFSET, block);
                        status = 2;
                        break;
                    }
                    if (length > block_bytes - op) {
                        report_error(error, BSLZ4_OUTPUT_OVERFLOW, block);
                        status = 2;
                        break;
                    }
                }
                dst[count] = op - literals;
                match_off[count] = offset;
                match_len[count] = length;
                /* the bytes the match reads: [op - offset, op - offset + min(length, offset)) */
                const uint read_lo = op - offset;
                const uint read_hi = read_lo + min(length, offset);
                const int hazard = length > 0 && read_lo < dirty_hi && dirty_lo < read_hi;
                sync_before[count] = (uchar)hazard;
                if (length > 0) {
                    if (hazard || dirty_lo == dirty_hi) {
                        dirty_lo = op;
                        dirty_hi = op + length;
                    } else {
                        dirty_hi = op + length;   /* matches come in increasing order */
                    }
                }
                op += length;
                count++;
            }
            if (status == 1 && op != block_bytes) {
                report_error(error, BSLZ4_SHORT_OUTPUT, block);
                status = 2;
            }
            failed = status == 2;
            batch_count = count;
            batch_status = status;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        const int count = batch_count;
        const int status = batch_status;
        if (status == 2)
            break;   /* uniform: every work-item read the same status */

        /* literal runs: disjoint destinations, sources in the chunk */
        for (int s = lid; s < count; s += WG) {
            const uint len = lit_len[s];
            if (len < LONG_LITERALS) {
                for (uint t = 0; t < len; t++)
                    buf[dst[s] + t] = chunk[lit_src[s] + t];
            }
        }
        for (int s = 0; s < count; s++) {
            const uint len = lit_len[s];
            if (len >= LONG_LITERALS) {
                for (uint t = lid; t < len; t += WG)
                    buf[dst[s] + t] = chunk[lit_src[s] + t];
            }
        }
        barrier(BUF_FENCE);

        /* matches, in order; a barrier before those that read what an earlier one wrote */
        for (int s = 0; s < count; s++) {
            if (sync_before[s])
                barrier(BUF_FENCE);
            const uint len = match_len[s];
            const uint offset = match_off[s];
            const uint start = dst[s] + lit_len[s];
            for (uint t = lid; t < len; t += WG)
                buf[start + t] = buf[start - offset + t % offset];
        }
        barrier(BUF_FENCE);
        if (status == 1)
            break;
    }
    if (batch_status == 2)
        return;   /* uniform; error already reported */

    /* bit-unshuffle: work-item per 8 elements */
    const uint row_bytes = elems / 8;
    for (uint g = lid; g < row_bytes; g += WG) {
        ulong values[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int b = 0; b < ELEM_SIZE; b++) {
            /* x: byte k holds bit k of byte b of elements 8g..8g+7 (bit i: element 8g+i) */
            ulong x = 0;
            for (int k = 0; k < 8; k++)
                x |= ((ulong)buf[(8 * b + k) * row_bytes + g]) << (8 * k);
            /* 8x8 bit-matrix transpose (bit i of byte k <-> bit k of byte i), in three
             * exchanges of 1x1, 2x2 and 4x4 sub-blocks */
            ulong t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAUL;
            x ^= t ^ (t << 7);
            t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCUL;
            x ^= t ^ (t << 14);
            t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0UL;
            x ^= t ^ (t << 28);
            for (int i = 0; i < 8; i++)
                values[i] |= ((x >> (8 * i)) & 0xFFUL) << (8 * b);
        }
        global elem_t *target = out + first_elem + 8 * g;
        for (int i = 0; i < 8; i++)
            target[i] = (elem_t)values[i];
    }
}
