/*
 * outlier_stats: per-bin outlier statistics of sigma_clip and medfilt (azfilter's
 * OutlierSums), one work-group per bin: sigma_clip computes them at its end (one launch
 * less per frame), medfilt with the outlier_stats kernel after its own.
 *
 * Inputs: the bin's entries, from the frame or (sigma_clip, from_gathered) from the raw values
 * its first pass gathered; the per-entry flags the operation left (kept by sigma_clip,
 * selected by medfilt; only read for valid entries, which both kernels always write) and the
 * bin's final sums `sums` (the operation's output). For each valid entry e of the bin
 * (pixel j, coefficient c): z = (x - S/W) / sqrt(V/W2) with x = signal/norm, as the numpy
 * reference computes it.
 *
 * Outputs, per bin:
 *   counts[bin]         valid entries (available)
 *   counts[npt + bin]   valid entries with z > pick (picked; NaN z never counts)
 *   reals[bin]          sum of c*signal over the valid entries not kept (rejected_sum)
 *   reals[npt + bin]    largest z, NaN ignored (fmax); NaN when every z is (max_sigma)
 * reals are accumulators (double, or a double-float pair without cl_khr_fp64).
 */
/* One work-item's share of a bin's outlier statistics. */
typedef struct {
    int available;
    int picked;
    real_t best;
    acc_t rejected;
} outlier_part_t;

inline outlier_part_t outlier_part_zero(void)
{
    outlier_part_t part = {0, 0, NAN, acc_zero()};
    return part;
}

/* Count one valid entry (value signal/norm, coefficient c, its deviation from the final mean,
 * kept or not) into `part`, with the bin's final spread. */
inline void outlier_part_add(outlier_part_t *part, const real_t deviation,
                             const real_t spread, const real_t pick, const int is_kept,
                             const real_t c, const real_t signal)
{
    part->available++;
    const real_t z = deviation / spread;
    if (z > pick)
        part->picked++;
    part->best = fmax(part->best, z);
    if (!is_kept)
        part->rejected = acc_add_prod(part->rejected, c, signal);
}

/* The work-group's parts summed and written by work-item 0 (every work-item calls it). */
inline void store_outlier_stats(outlier_part_t part, const int npt, const int bin,
                                global int *counts, global acc_t *reals,
                                local acc_t *scratch, local int *int_scratch,
                                local real_t *max_scratch)
{
    const int lid = get_local_id(0);
    const int available = wg_reduce_int(part.available, int_scratch);
    const int picked = wg_reduce_int(part.picked, int_scratch);
    const acc_t rejected = wg_reduce_one(part.rejected, scratch);
    max_scratch[lid] = part.best;
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

/* The statistics of one bin (entries start..end) whose final mean and spread are known, in
 * a pass of their own: outlier_stats after medfilt, sigma_clip when its last pass could not
 * count them (azf_sigma_clip.cl). scratch, int_scratch, max_scratch: WG elements each of the
 * work-group's local memory. */
inline void bin_outlier_stats(global const int *indices, global const float *coefs,
                              FRAME_PARAMS, const int from_gathered,
                              global const RAW_T *gathered, global const uchar *kept,
                              const int start, const int end, const mean_t mean,
                              const real_t spread, const real_t pick, const int npt,
                              const int bin, global int *counts, global acc_t *reals,
                              local acc_t *scratch, local int *int_scratch,
                              local real_t *max_scratch)
{
    outlier_part_t part = outlier_part_zero();
    for (int e = start + get_local_id(0); e < end; e += WG) {
        real_t signal = 0, var = 0, norm = 1;
        const int valid = from_gathered
            ? load_gathered(FRAME_ARGS, gathered, indices, e, &signal, &var, &norm)
            : load_entry(FRAME_ARGS, e, indices[e], &signal, &var, &norm);
        if (valid)
            outlier_part_add(&part, deviation_from(signal, norm, mean), spread, pick,
                             kept[e], entry_coef(coefs, unit_coefs, e), signal);
    }
    store_outlier_stats(part, npt, bin, counts, reals, scratch, int_scratch, max_scratch);
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
    /* the frame's raw values as `gathered`: unused (from_gathered 0) */
    bin_outlier_stats(indices, coefs, FRAME_ARGS, 0, raw, kept, indptr[bin], indptr[bin + 1],
                      mean, spread, pick, npt, bin, counts, reals, scratch, int_scratch,
                      max_scratch);
}
