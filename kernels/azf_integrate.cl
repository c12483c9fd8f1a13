/*
 * integrate: weighted sums per radial bin, one work-group per bin (CSR row).
 *
 * Consecutive work-items read consecutive CSR entries (coalesced index/coefficient reads);
 * each accumulates a private partial sum, then a local-memory tree reduction gives the bin's
 * totals. For the azimuthal error model a second pass over the row computes the exact
 * two-pass scatter sum (c*norm)^2 (x - S/W)^2 with the mean broadcast to the work-group.
 *
 * out: NSUMS x npt accumulators (S, V, W, W2, N).
 */
kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void integrate(global const int *indptr, global const int *indices, global const float *coefs,
               FRAME_PARAMS, const int azimuthal, const int npt, global acc_t *out)
{
    local acc_t scratch[NSUMS * WG];
    const int bin = get_group_id(0);
    const int lid = get_local_id(0);
    const int start = indptr[bin];
    const int end = indptr[bin + 1];

    acc_t sums[NSUMS];
    for (int k = 0; k < NSUMS; k++)
        sums[k] = acc_zero();
    for (int e = start + lid; e < end; e += WG) {
        real_t signal, var, norm;
        if (load_entry(FRAME_ARGS, e, indices[e], &signal, &var, &norm)) {
            real_t c = entry_coef(coefs, unit_coefs, e);
            accumulate_entry(sums, c, signal, var, norm, c);
        }
    }
    wg_reduce_sums(sums, scratch);

    if (azimuthal) {
        const mean_t mean = acc_ratio(sums[SUM_SIGNAL], sums[SUM_NORM]);
        acc_t scatter = acc_zero();
        for (int e = start + lid; e < end; e += WG) {
            real_t signal, var, norm;
            if (load_entry(FRAME_ARGS, e, indices[e], &signal, &var, &norm))
                scatter = accumulate_scatter(scatter, entry_coef(coefs, unit_coefs, e),
                                             signal, norm, mean);
        }
        sums[SUM_VARIANCE] = wg_reduce_one(scatter, scratch);
    }
    if (lid == 0)
        store_sums(out, npt, bin, sums);
}
