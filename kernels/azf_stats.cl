/*
 * outlier_stats: per-bin outlier statistics of sigma_clip and medfilt (azfilter's
 * OutlierSums), one work-group per bin: sigma_clip computes them at its end (one launch
 * less per frame), medfilt with the outlier_stats kernel after its own.
 *
 * Inputs: the per-entry flags the operation left (kept by sigma_clip, selected by medfilt;
 * only read for valid entries, which both kernels always write) and the bin's final sums
 * `sums` (the operation's output). For each valid entry e of the bin (pixel j, coefficient
 * c): z = (x - S/W) / sqrt(V/W2) with x = signal/norm, as the numpy reference computes it.
 *
 * Outputs, per bin:
 *   counts[bin]         valid entries (available)
 *   counts[npt + bin]   valid entries with z > pick (picked; NaN z never counts)
 *   reals[bin]          sum of c*signal over the valid entries not kept (rejected_sum)
 *   reals[npt + bin]    largest z, NaN ignored (fmax); NaN when every z is (max_sigma)
 * reals are accumulators (double, or a double-float pair without cl_khr_fp64).
 */
/* The statistics of one bin (entries start..end) whose final mean and spread are known,
 * written by work-item 0; sigma_clip calls it at its end, outlier_stats after medfilt.
 * scratch, int_scratch, max_scratch: WG elements each of the work-group's local memory. */
inline void bin_outlier_stats(global const int *indices, global const float *coefs,
                              FRAME_PARAMS, global const uchar *kept, const int start,
                              const int end, const mean_t mean, const real_t spread,
                              const real_t pick, const int npt, const int bin,
                              global int *counts, global acc_t *reals, local acc_t *scratch,
                              local int *int_scratch, local real_t *max_scratch)
{
    const int lid = get_local_id(0);
    int available = 0;
    int picked = 0;
    real_t best = NAN;
    acc_t rejected = acc_zero();
    for (int e = start + lid; e < end; e += WG) {
        real_t signal = 0, var = 0, norm = 1;
        if (!load_pixel(FRAME_ARGS, indices[e], &signal, &var, &norm))
            continue;
        available++;
        const real_t z = deviation_from(signal, norm, mean) / spread;
        if (z > pick)
            picked++;
        best = fmax(best, z);
        if (!kept[e])
            rejected = acc_add_prod(rejected, (real_t)coefs[e], signal);
    }
    available = wg_reduce_int(available, int_scratch);
    picked = wg_reduce_int(picked, int_scratch);
    rejected = wg_reduce_one(rejected, scratch);
    max_scratch[lid] = best;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WG / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            max_scratch[lid] = fmax(max_scratch[lid], max_scratch[lid + stride]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) {
        counts[bin] = available;
        counts[npt + bin] = picked;
        reals[bin] = rejected;
        reals[npt + bin] = acc_add_real(acc_zero(), max_scratch[0]);
    }
}

kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void outlier_stats(global const int *indptr, global const int *indices,
                   global const float *coefs, FRAME_PARAMS, global const uchar *kept,
                   global const acc_t *sums, const real_t pick, const int npt,
                   global int *counts, global acc_t *reals)
{
    local acc_t scratch[WG];
    local int int_scratch[WG];
    local real_t max_scratch[WG];
    const int bin = get_group_id(0);
    const mean_t mean = acc_ratio(sums[SUM_SIGNAL * npt + bin], sums[SUM_NORM * npt + bin]);
    const real_t spread = sqrt(acc_value(sums[SUM_VARIANCE * npt + bin])
                               / acc_value(sums[SUM_NORM2 * npt + bin]));
    bin_outlier_stats(indices, coefs, FRAME_ARGS, kept, indptr[bin], indptr[bin + 1], mean,
                      spread, pick, npt, bin, counts, reals, scratch, int_scratch,
                      max_scratch);
}
