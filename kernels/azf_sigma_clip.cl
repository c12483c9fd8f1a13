/*
 * sigma_clip: iterative azimuthal sigma-clipping, every iteration inside one kernel launch.
 *
 * One work-group per radial bin. Work-item `lid` owns the entries start+lid, start+lid+WG, ...
 * of its row in every pass, so the per-entry "kept" flags (global uchar, one per CSR entry)
 * and the gathered raw values are only ever read back by the work-item that wrote them: no
 * synchronisation is needed on them, only on the local-memory reductions that broadcast the
 * bin's sums.
 *
 * The first pass copies the bin's raw values into `gathered`, in table order; every later
 * pass (the scatter, each iteration, the statistics) reads them from there. A bin's pixels
 * lie on a ring, a few pixels per image row, so reading them from the frame wastes most of
 * each memory transaction; the copy is read whole (H200, Eiger 4M, 1000 bins: the kernel
 * made ~9 such passes per frame).
 *
 * Per bin (docs/internals.md, sigma_clip):
 *   sums over the valid entries; V = azimuthal scatter (azimuthal, hybrid) or propagated
 *   repeat at most max_iter times:
 *     stop if N == 0
 *     mean = S/W, std = sqrt(V/W2), k = max(thres, sqrt(2 ln(max(3, N)/sqrt(2 pi))))
 *     drop every kept entry with |x - mean| > k*std (strict, simultaneous); stop if none
 *     recompute the sums over the kept entries
 *   hybrid reports the propagated (Poisson) variance of the kept entries.
 * Then the bin's outlier statistics (azf_stats.cl) into counts/reals: counted by the pass that
 * dropped nothing when there is one (not for hybrid), else in a pass of their own.
 *
 * model: 0 = propagated variance (poisson, variance), 1 = azimuthal, 2 = hybrid.
 */
#define CLIP_PROPAGATED 0
#define CLIP_AZIMUTHAL 1
#define CLIP_HYBRID 2

/* Two-pass scatter of the kept entries of one row around `mean` (work-group sum). */
inline acc_t kept_scatter(global const int *indices, global const float *coefs,
                          global const uchar *kept, const int start, const int end,
                          FRAME_PARAMS, global const RAW_T *gathered, const mean_t mean,
                          local acc_t *scratch)
{
    acc_t scatter = acc_zero();
    for (int e = start + get_local_id(0); e < end; e += WG) {
        if (kept[e]) {
            real_t signal = 0, var = 0, norm = 1;
            load_gathered(FRAME_ARGS, gathered, indices, e, &signal, &var, &norm);
            scatter = accumulate_scatter(scatter, entry_coef(coefs, unit_coefs, e), signal,
                                         norm, mean);
        }
    }
    return wg_reduce_one(scatter, scratch);
}

kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void sigma_clip(global const int *indptr, global const int *indices, global const float *coefs,
                FRAME_PARAMS, const real_t thres, const int max_iter, const int model,
                const int npt, global uchar *kept, global RAW_T *gathered,
                global acc_t *out, const real_t pick, global int *counts,
                global acc_t *reals)
{
    local acc_t scratch[NSUMS * WG];
    local int int_scratch[WG];
    local real_t max_scratch[WG];
    const int bin = get_group_id(0);
    const int lid = get_local_id(0);
    const int start = indptr[bin];
    const int end = indptr[bin + 1];
    const int clip_azimuthal = model != CLIP_PROPAGATED;
    /* sqrt(2*pi), as in the Chauvenet criterion */
    const real_t sqrt_2pi = (real_t)2.5066282746310002;

    acc_t sums[NSUMS];
    for (int k = 0; k < NSUMS; k++)
        sums[k] = acc_zero();
    for (int e = start + lid; e < end; e += WG) {
        real_t signal, var, norm;
        int valid = 0;
        if (entry_norm[e] != 0.0f) {
            const int j = indices[e];
            const RAW_T value = raw[j];
            gathered[e] = value;
            valid = entry_values(FRAME_ARGS, e, j, (real_t)value, &signal, &var, &norm);
        }
        kept[e] = (uchar)valid;
        if (valid) {
            real_t c = entry_coef(coefs, unit_coefs, e);
            accumulate_entry(sums, c, signal, var, norm, c);
        }
    }
    wg_reduce_sums(sums, scratch);
    acc_t clip_variance = sums[SUM_VARIANCE];
    if (clip_azimuthal)
        clip_variance = kept_scatter(indices, coefs, kept, start, end, FRAME_ARGS, gathered,
                                     acc_ratio(sums[SUM_SIGNAL], sums[SUM_NORM]), scratch);
    /* A pass that drops nothing works with the final mean and the final spread: its own std,
     * since the spread reported is the variance clipped with, except for hybrid (which
     * reports the propagated variance). That pass counts the outlier statistics as it goes,
     * saving the pass of their own (bin_outlier_stats) that the other cases make. */
    const int fuse_stats = model != CLIP_HYBRID;
    int stats_counted = 0;

    for (int iteration = 0; iteration < max_iter; iteration++) {
        const real_t count = acc_value(sums[SUM_COUNT]);
        if (!(count > (real_t)0))
            break;
        const mean_t mean = acc_ratio(sums[SUM_SIGNAL], sums[SUM_NORM]);
        const real_t std = sqrt(acc_value(clip_variance) / acc_value(sums[SUM_NORM2]));
        const real_t chauvenet = sqrt((real_t)2 * log(fmax((real_t)3, count) / sqrt_2pi));
        const real_t cutoff = fmax(thres, chauvenet) * std;

        acc_t kept_sums[NSUMS];
        for (int k = 0; k < NSUMS; k++)
            kept_sums[k] = acc_zero();
        int dropped = 0;
        outlier_part_t part = outlier_part_zero();
        for (int e = start + lid; e < end; e += WG) {
            const int was_kept = kept[e];
            if (!was_kept && !fuse_stats)
                continue;
            real_t signal = 0, var = 0, norm = 1;
            if (!load_gathered(FRAME_ARGS, gathered, indices, e, &signal, &var, &norm))
                continue;   /* never valid (was_kept is 0) */
            const real_t c = entry_coef(coefs, unit_coefs, e);
            const real_t deviation = deviation_from(signal, norm, mean);
            int is_kept = was_kept;
            if (was_kept) {
                if (fabs(deviation) > cutoff) {
                    kept[e] = 0;
                    is_kept = 0;
                    dropped++;
                } else {
                    accumulate_entry(kept_sums, c, signal, var, norm, c);
                }
            }
            if (fuse_stats)
                outlier_part_add(&part, deviation, std, pick, is_kept, c, signal);
        }
        dropped = wg_reduce_int(dropped, int_scratch);
        if (dropped == 0) {
            /* the kept set did not change: its sums are the current ones, and this pass
             * counted the outlier statistics with the final mean and spread */
            if (fuse_stats) {
                store_outlier_stats(part, npt, bin, counts, reals, scratch, int_scratch,
                                    max_scratch);
                stats_counted = 1;
            }
            break;
        }
        wg_reduce_sums(kept_sums, scratch);
        for (int k = 0; k < NSUMS; k++)
            sums[k] = kept_sums[k];
        clip_variance = sums[SUM_VARIANCE];
        if (clip_azimuthal)
            clip_variance = kept_scatter(indices, coefs, kept, start, end, FRAME_ARGS,
                                         gathered, acc_ratio(sums[SUM_SIGNAL], sums[SUM_NORM]),
                                         scratch);
    }
    /* azimuthal reports the scatter it clipped with; hybrid and the propagated models the
     * propagated variance of the kept entries (already in sums). */
    if (model == CLIP_AZIMUTHAL)
        sums[SUM_VARIANCE] = clip_variance;
    if (lid == 0)
        store_sums(out, npt, bin, sums);
    /* the outlier statistics (azf_stats.cl) from the final sums every work-item holds,
     * as outlier_stats computes them from `out` (one launch less per frame), unless the
     * last pass counted them already */
    if (!stats_counted)
        bin_outlier_stats(indices, coefs, FRAME_ARGS, 1, gathered, kept, start, end,
                          acc_ratio(sums[SUM_SIGNAL], sums[SUM_NORM]),
                          sqrt(acc_value(sums[SUM_VARIANCE]) / acc_value(sums[SUM_NORM2])),
                          pick, npt, bin, counts, reals, scratch, int_scratch, max_scratch);
}
