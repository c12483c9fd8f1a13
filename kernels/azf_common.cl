/*
 * azfilter OpenCL kernels: shared definitions.
 *
 * The host concatenates azf_common.cl, azf_integrate.cl, azf_sigma_clip.cl and azf_medfilt.cl
 * into one program and builds it once per raw dtype with these options (never with
 * -cl-fast-relaxed-math: the results must agree with the numpy reference to 1e-5):
 *
 *   -D RAW_T=<type>   OpenCL type of the raw frame (ushort, uint, int, float, ...)
 *   -D WG=<n>         work-group size (power of two); every kernel is launched with it
 *   -D LSORT=<n>      capacity of the local-memory sort (power of two, >= 2*WG)
 *   -D USE_FP64       the device has cl_khr_fp64: per-pixel values and accumulators in double.
 *                     Without it, per-pixel values are float and accumulators are compensated
 *                     "double-float" pairs (float2: hi + lo).
 *
 * Semantics (docs/internals.md): for pixel j of the raw frame
 *   valid  = pixel_norm != 0 and isfinite(raw) and not (has_dummy and |raw - dummy| <= delta)
 *   signal = raw - dark,  var = max(raw, 1) (poisson/hybrid) or variance[j],  norm = pixel_norm
 * The kernels read pixel_norm and dark per CSR entry (entry_norm[e] = pixel_norm[indices[e]],
 * made once by the host): contiguous reads instead of gathers, which is what bounds them.
 *   x      = signal / norm
 * and per CSR entry (j, c): S += c*signal, W += c*norm, W2 += (c*norm)^2, N += c,
 * V += c^2*var, or the two-pass azimuthal V = sum (c*norm)^2 (x - S/W)^2.
 */

#ifdef USE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif
/* No fused multiply-add contraction: the same expression must round the same way everywhere. */
#pragma OPENCL FP_CONTRACT OFF

#ifndef WG
#define WG 256
#endif
#ifndef LSORT
#define LSORT 4096
#endif

/* Number of per-bin accumulators and their order in the output array (out[k*npt + bin]). */
#define NSUMS 5
#define SUM_SIGNAL 0
#define SUM_VARIANCE 1
#define SUM_NORM 2
#define SUM_NORM2 3
#define SUM_COUNT 4

/* How var_j is obtained (the azimuthal model also uses POISSON here: its V is recomputed). */
#define VAR_POISSON 0
#define VAR_ARRAY 1

/* ------------------------------------------------------------------------------------------
 * Arithmetic types.
 * real_t: per-pixel arithmetic; acc_t: accumulators (sums over a bin).
 * ------------------------------------------------------------------------------------------ */
#ifdef USE_FP64
typedef double real_t;
typedef double acc_t;

inline acc_t acc_zero(void) { return 0.0; }
inline acc_t acc_add(acc_t a, acc_t b) { return a + b; }
inline acc_t acc_add_real(acc_t a, real_t b) { return a + b; }
/* a + b*c, with b*c rounded once (no fused contraction: results must not depend on the
 * compiler's choice) */
inline acc_t acc_add_prod(acc_t a, real_t b, real_t c) { real_t p = b * c; return a + p; }
inline real_t acc_value(acc_t a) { return a; }

/* A bin mean S/W and the deviation x - mean of a pixel's corrected value x = signal/norm. */
typedef double mean_t;
inline mean_t acc_ratio(acc_t a, acc_t b) { return a / b; }
inline real_t deviation_from(real_t signal, real_t norm, mean_t mean)
{
    return signal / norm - mean;
}
#else
typedef float real_t;
typedef float2 acc_t;   /* (hi, lo): the value is hi + lo, |lo| <= ulp(hi)/2 */

/* Knuth's TwoSum: s + e == a + b exactly. */
inline float2 two_sum(float a, float b)
{
    float s = a + b;
    float bb = s - a;
    float e = (a - (s - bb)) + (b - bb);
    return (float2)(s, e);
}

/* Dekker's FastTwoSum, valid when |a| >= |b| (or a == 0). */
inline float2 fast_two_sum(float a, float b)
{
    float s = a + b;
    float e = b - (s - a);
    return (float2)(s, e);
}

inline acc_t acc_zero(void) { return (float2)(0.0f, 0.0f); }
/* Double-float addition (the "accurate" variant: relative error ~ 2^-44). */
inline acc_t acc_add(acc_t a, acc_t b)
{
    float2 s = two_sum(a.x, b.x);
    float2 t = two_sum(a.y, b.y);
    s.y += t.x;
    s = fast_two_sum(s.x, s.y);
    s.y += t.y;
    return fast_two_sum(s.x, s.y);
}
inline acc_t acc_add_real(acc_t a, real_t b) { return acc_add(a, (float2)(b, 0.0f)); }
/* a + b*c with the product kept exactly as a double-float (fma gives its rounding error). */
inline acc_t acc_add_prod(acc_t a, real_t b, real_t c)
{
    float p = b * c;
    float e = fma(b, c, -p);
    return acc_add(a, (float2)(p, e));
}
inline real_t acc_value(acc_t a) { return a.x + a.y; }

/* Without double precision the mean and x are double-float pairs too, so that x - mean keeps
 * its leading digits when x is close to the mean (the scatter and the clipping test). */
typedef float2 mean_t;
inline float2 two_prod(float a, float b)
{
    float p = a * b;
    return (float2)(p, fma(a, b, -p));
}
inline mean_t acc_ratio(acc_t a, acc_t b)
{
    float q = a.x / b.x;
    float2 qb = two_prod(q, b.x);
    float r = (((a.x - qb.x) - qb.y) + a.y) - q * b.y;
    return fast_two_sum(q, r / b.x);
}
inline real_t deviation_from(real_t signal, real_t norm, mean_t mean)
{
    float q = signal / norm;
    float q_low = fma(-q, norm, signal) / norm;
    return (q - mean.x) + (q_low - mean.y);
}
#endif

/* ------------------------------------------------------------------------------------------
 * Per-pixel preprocessing.
 * ------------------------------------------------------------------------------------------ */
/* Arguments every kernel takes to read one frame (in this order). raw and variance are
 * indexed by pixel j, entry_norm and entry_dark by CSR entry e (the pixel's pixel_norm and
 * dark, laid out like the table: a bin's values are contiguous). unit_coefs: every
 * coefficient of the table is 1 (no pixel splitting), so the kernels need not read them. */
#define FRAME_PARAMS                                                                        \
    global const RAW_T *raw, global const float *entry_norm, global const float *entry_dark, \
    global const float *variance, const int has_dark, const int var_mode,                  \
    const int has_dummy, const real_t dummy, const real_t delta_dummy, const int unit_coefs
#define FRAME_ARGS raw, entry_norm, entry_dark, variance, has_dark, var_mode, has_dummy,     \
    dummy, delta_dummy, unit_coefs

/* The coefficient of CSR entry e. */
inline real_t entry_coef(global const float *coefs, const int unit_coefs, const int e)
{
    return unit_coefs ? (real_t)1 : (real_t)coefs[e];
}

/* CSR entry e (pixel j) whose raw value is `value` and whose pixel_norm is not 0: returns 1
 * and fills signal/var/norm when it is valid, else 0. */
inline int entry_values(FRAME_PARAMS, const int e, const int j, const real_t value,
                        real_t *signal, real_t *var, real_t *norm)
{
    if (!isfinite(value))
        return 0;
    if (has_dummy && fabs(value - dummy) <= delta_dummy)
        return 0;
    *signal = has_dark ? value - (real_t)entry_dark[e] : value;
    *var = (var_mode == VAR_ARRAY) ? (real_t)variance[j] : fmax(value, (real_t)1.0);
    *norm = (real_t)entry_norm[e];
    return 1;
}

/* CSR entry e, pixel j of the frame: returns 1 and fills signal/var/norm when it is valid,
 * else 0 (a masked pixel's raw value is not read). */
inline int load_entry(FRAME_PARAMS, const int e, const int j, real_t *signal, real_t *var,
                      real_t *norm)
{
    if (entry_norm[e] == 0.0f)
        return 0;
    return entry_values(FRAME_ARGS, e, j, (real_t)raw[j], signal, var, norm);
}

/* The same from `gathered`, the raw values a kernel's first pass copied in table order
 * (gathered[e] = raw[indices[e]], written only where entry_norm[e] != 0): later passes over
 * a bin read contiguous memory instead of gathering from the frame again. */
inline int load_gathered(FRAME_PARAMS, global const RAW_T *gathered,
                         global const int *indices, const int e, real_t *signal,
                         real_t *var, real_t *norm)
{
    if (entry_norm[e] == 0.0f)
        return 0;
    return entry_values(FRAME_ARGS, e, var_mode == VAR_ARRAY ? indices[e] : 0,
                        (real_t)gathered[e], signal, var, norm);
}

/* Sum of WG-long vectors of NSUMS accumulators over the work-group; every work-item gets the
 * totals in sums[]. scratch holds NSUMS*WG accumulators. */
inline void wg_reduce_sums(acc_t sums[NSUMS], local acc_t *scratch)
{
    const int lid = get_local_id(0);
    for (int k = 0; k < NSUMS; k++)
        scratch[k * WG + lid] = sums[k];
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WG / 2; stride > 0; stride >>= 1) {
        if (lid < stride) {
            for (int k = 0; k < NSUMS; k++)
                scratch[k * WG + lid] = acc_add(scratch[k * WG + lid],
                                                scratch[k * WG + lid + stride]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int k = 0; k < NSUMS; k++)
        sums[k] = scratch[k * WG];
    barrier(CLK_LOCAL_MEM_FENCE);   /* scratch may be reused right after */
}

/* Work-group sum of one accumulator (scratch: WG accumulators). */
inline acc_t wg_reduce_one(acc_t value, local acc_t *scratch)
{
    const int lid = get_local_id(0);
    scratch[lid] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WG / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] = acc_add(scratch[lid], scratch[lid + stride]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    acc_t total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

/* Work-group sum of an int (scratch: WG ints). */
inline int wg_reduce_int(int value, local int *scratch)
{
    const int lid = get_local_id(0);
    scratch[lid] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WG / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] += scratch[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    int total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

/* Accumulate one valid entry into S, V(propagated), W, W2 and N (N += count: c for integrate
 * and sigma_clip, 1 for medfilt which counts fragments). */
inline void accumulate_entry(acc_t sums[NSUMS], real_t c, real_t signal, real_t var,
                             real_t norm, real_t count)
{
    real_t weight = c * norm;
    sums[SUM_SIGNAL] = acc_add_prod(sums[SUM_SIGNAL], c, signal);
    sums[SUM_VARIANCE] = acc_add_prod(sums[SUM_VARIANCE], c * c, var);
    sums[SUM_NORM] = acc_add_prod(sums[SUM_NORM], c, norm);   /* c*norm unrounded */
    sums[SUM_NORM2] = acc_add_prod(sums[SUM_NORM2], weight, weight);
    sums[SUM_COUNT] = acc_add_real(sums[SUM_COUNT], count);
}

/* Azimuthal scatter term w^2 (x - mean)^2 of one entry (x = signal/norm, w = c*norm). */
inline acc_t accumulate_scatter(acc_t v, real_t c, real_t signal, real_t norm,
                                mean_t mean)
{
    real_t weight = c * norm;
    real_t deviation = deviation_from(signal, norm, mean);
    return acc_add_prod(v, weight * weight, deviation * deviation);
}

inline void store_sums(global acc_t *out, const int npt, const int bin, acc_t sums[NSUMS])
{
    for (int k = 0; k < NSUMS; k++)
        out[k * npt + bin] = sums[k];
}
