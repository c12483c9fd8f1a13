/*
 * medfilt: average of the fragments between two weighted quantiles of each radial bin.
 *
 * Fragments (CSR entries with a valid pixel) are sorted by key = (x, position in the row);
 * positions within a row are in increasing pixel index, so this breaks ties by pixel index.
 * A key is a ulong: the order-preserving bit pattern of x in the high bits and the position
 * i in the low `idx_bits` bits (the host picks idx_bits from the longest row). Invalid
 * fragments get all-ones high bits and sort after every valid one; padding is ULONG_MAX.
 *
 * Rows of at most LSORT entries are sorted by a bitonic network in local memory inside the
 * `medfilt` kernel. Longer rows are sorted beforehand in global memory: `medfilt_chunk_sort`
 * sorts chunks of LSORT keys in local memory, then `medfilt_merge` passes merge pairs of
 * sorted runs (width LSORT, 2*LSORT, ...) by rank (binary search in the partner run), so the
 * `medfilt` kernel reads those rows' keys already sorted.
 *
 * Then, per bin: T = total weight (a work-group scan of w = c*norm in sorted order), and a
 * second identical scan gives each fragment's cumulative span [L, U]; fragment m is selected
 * iff w != 0 and ((lo <= L and U <= hi) or (lo >= L and U >= hi)) with lo = quant_min*T,
 * hi = quant_max*T. Both scans run the same arithmetic, so T is exactly the last U.
 */
#define KEY_PADDING 0xFFFFFFFFFFFFFFFFUL

/* Order-preserving unsigned image of a real: a < b  <=>  order_bits(a) < order_bits(b). */
#ifdef USE_FP64
inline ulong order_bits(double x)
{
    ulong u = as_ulong(x);
    return (u & 0x8000000000000000UL) ? ~u : (u | 0x8000000000000000UL);
}
#else
inline ulong order_bits(float x)
{
    uint u = as_uint(x);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((ulong)u) << 32;
}
#endif

inline ulong valid_key(real_t x, const int position, const int idx_bits)
{
    /* x + 0 turns -0 into +0: both compare equal in the reference, so they must tie here */
    ulong high = order_bits(x + (real_t)0);
    return ((high >> idx_bits) << idx_bits) | (ulong)position;
}

inline ulong invalid_key(const int position, const int idx_bits)
{
    return (KEY_PADDING << idx_bits) | (ulong)position;
}

inline int key_is_valid(const ulong key, const int idx_bits)
{
    return (key >> idx_bits) != (KEY_PADDING >> idx_bits);
}

inline int key_position(const ulong key, const int idx_bits)
{
    return (int)(key & ((1UL << idx_bits) - 1UL));
}

/* Keys of row positions [offset, offset+len) into keys[0..npad), padded with KEY_PADDING.
 * Returns how many valid fragments this work-item loaded. Ends with a barrier. */
inline int load_keys(local ulong *keys, const int npad, global const int *indices,
                     const int row_start, const int offset, const int len, FRAME_PARAMS,
                     const int idx_bits)
{
    int valid_count = 0;
    for (int t = get_local_id(0); t < npad; t += WG) {
        ulong key = KEY_PADDING;
        if (t < len) {
            const int position = offset + t;
            real_t signal = 0, var = 0, norm = 1;
            if (load_entry(FRAME_ARGS, row_start + position, indices[row_start + position],
                           &signal, &var, &norm)) {
                key = valid_key(signal / norm, position, idx_bits);
                valid_count++;
            } else {
                key = invalid_key(position, idx_bits);
            }
        }
        keys[t] = key;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    return valid_count;
}

/* Ascending bitonic sort of keys[0..npad), npad a power of two (uniform in the group). */
inline void bitonic_sort_local(local ulong *keys, const int npad)
{
    const int lid = get_local_id(0);
    for (int size = 2; size <= npad; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = lid; t < npad / 2; t += WG) {
                const int i = 2 * t - (t & (stride - 1));
                const int partner = i + stride;
                const ulong a = keys[i];
                const ulong b = keys[partner];
                const int ascending = (i & size) == 0;
                if ((a > b) == ascending) {
                    keys[i] = b;
                    keys[partner] = a;
                }
            }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
    }
}

inline int next_pow2(const int n)
{
    int p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

/* One chunk (at most LSORT positions) of a long row, sorted in local memory and stored at
 * the chunk's place in `keys_out` (indexed like the CSR entries). */
kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void medfilt_chunk_sort(global const int *indptr, global const int *indices, FRAME_PARAMS,
                        global const int *chunk_row, global const int *chunk_offset,
                        const int idx_bits, global ulong *keys_out)
{
    local ulong keys[LSORT];
    const int chunk = get_group_id(0);
    const int row = chunk_row[chunk];
    const int offset = chunk_offset[chunk];
    const int start = indptr[row];
    const int len = min(LSORT, indptr[row + 1] - start - offset);
    const int npad = next_pow2(len);
    load_keys(keys, npad, indices, start, offset, len, FRAME_ARGS, idx_bits);
    bitonic_sort_local(keys, npad);
    for (int t = get_local_id(0); t < len; t += WG)
        keys_out[start + offset + t] = keys[t];
}

/* Merge of sorted runs of `width` keys, pairwise, within each long row: the key at row
 * position i goes to (start of the pair) + (its rank in its run) + (number of smaller keys
 * in the partner run). Keys are unique within a row (they contain the position). */
kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void medfilt_merge(global const int *indptr, global const int *block_row,
                   global const int *block_offset, const int width,
                   global const ulong *src, global ulong *dst)
{
    const int row = block_row[get_group_id(0)];
    const int start = indptr[row];
    const int n = indptr[row + 1] - start;
    const int i = block_offset[get_group_id(0)] + get_local_id(0);
    if (i >= n)
        return;
    const int run = i / width;
    const int run_start = run * width;
    const int pair_start = (run & ~1) * width;
    int partner_lo, partner_hi;
    if (run & 1) {
        partner_lo = pair_start;
        partner_hi = pair_start + width;
    } else {
        partner_lo = pair_start + width;
        partner_hi = max(partner_lo, min(pair_start + 2 * width, n));
    }
    const ulong key = src[start + i];
    int lo = partner_lo;
    int hi = partner_hi;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (src[start + mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    dst[start + pair_start + (i - run_start) + (lo - partner_lo)] = key;
}

/* Inclusive work-group scan of one accumulator per work-item (Hillis-Steele); afterwards
 * scan[l] holds the inclusive sum of items 0..l. Ends with a barrier. */
inline acc_t wg_inclusive_scan(acc_t value, local acc_t *scan)
{
    const int lid = get_local_id(0);
    scan[lid] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int offset = 1; offset < WG; offset <<= 1) {
        acc_t add = lid >= offset ? scan[lid - offset] : acc_zero();
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid >= offset)
            scan[lid] = acc_add(scan[lid], add);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return scan[lid];
}

kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void medfilt(global const int *indptr, global const int *indices, global const float *coefs,
             FRAME_PARAMS, const real_t quant_min, const real_t quant_max,
             const int azimuthal, const int idx_bits, global const ulong *sorted_keys,
             global uchar *selected, const int npt, global acc_t *out)
{
    local ulong local_keys[LSORT];
    local acc_t scratch[NSUMS * WG];
    local int int_scratch[WG];
    const int bin = get_group_id(0);
    const int lid = get_local_id(0);
    const int start = indptr[bin];
    const int n = indptr[bin + 1] - start;
    const int in_local = n <= LSORT;

    /* sorted keys of the row: in local memory, or already sorted in global memory */
    int valid_count = 0;
    if (in_local) {
        const int npad = next_pow2(n);
        valid_count = load_keys(local_keys, npad, indices, start, 0, n, FRAME_ARGS, idx_bits);
        bitonic_sort_local(local_keys, npad);
    } else {
        for (int m = lid; m < n; m += WG)
            valid_count += key_is_valid(sorted_keys[start + m], idx_bits);
    }
    const int nvalid = wg_reduce_int(valid_count, int_scratch);

    real_t lo = 0, hi = 0;
    acc_t sums[NSUMS];
    for (int k = 0; k < NSUMS; k++)
        sums[k] = acc_zero();
    /* pass 0: total weight T; pass 1: the same scan again, selecting and accumulating */
    for (int pass = 0; pass < 2; pass++) {
        acc_t carry = acc_zero();
        for (int tile = 0; tile < nvalid; tile += WG) {
            const int m = tile + lid;
            real_t c = 0, w = 0;
            int j = 0, e = 0;
            if (m < nvalid) {
                const ulong key = in_local ? local_keys[m] : sorted_keys[start + m];
                e = start + key_position(key, idx_bits);
                j = indices[e];
                c = entry_coef(coefs, unit_coefs, e);
                w = c * (real_t)entry_norm[e];
            }
            const acc_t inclusive = wg_inclusive_scan(acc_add_real(acc_zero(), w), scratch);
            const acc_t previous = lid > 0 ? scratch[lid - 1] : acc_zero();
            /* the inclusive sum at the tile's last fragment (not at WG - 1: the scan adds in
             * another order there), so that the final carry is exactly the last U */
            const acc_t tile_total = scratch[min(WG, nvalid - tile) - 1];
            barrier(CLK_LOCAL_MEM_FENCE);
            if (pass == 1 && m < nvalid) {
                const real_t lower = acc_value(acc_add(carry, previous));
                const real_t upper = acc_value(acc_add(carry, inclusive));
                const int chosen = w != (real_t)0
                    && ((lo <= lower && upper <= hi) || (lo >= lower && upper >= hi));
                selected[e] = (uchar)chosen;   /* by entry: outlier_stats reads it */
                if (chosen) {
                    real_t signal = 0, var = 0, norm = 1;
                    load_entry(FRAME_ARGS, e, j, &signal, &var, &norm);
                    accumulate_entry(sums, c, signal, var, norm, (real_t)1);
                }
            }
            carry = acc_add(carry, tile_total);
        }
        const real_t total = acc_value(carry);
        lo = quant_min * total;
        hi = quant_max * total;
    }
    wg_reduce_sums(sums, scratch);

    if (azimuthal) {
        const mean_t mean = acc_ratio(sums[SUM_SIGNAL], sums[SUM_NORM]);
        acc_t scatter = acc_zero();
        for (int m = lid; m < nvalid; m += WG) {
            const ulong key = in_local ? local_keys[m] : sorted_keys[start + m];
            const int e = start + key_position(key, idx_bits);
            if (!selected[e])
                continue;
            real_t signal = 0, var = 0, norm = 1;
            load_entry(FRAME_ARGS, e, indices[e], &signal, &var, &norm);
            scatter = accumulate_scatter(scatter, entry_coef(coefs, unit_coefs, e), signal,
                                         norm, mean);
        }
        sums[SUM_VARIANCE] = wg_reduce_one(scatter, scratch);
    }
    if (lid == 0)
        store_sums(out, npt, bin, sums);
}
