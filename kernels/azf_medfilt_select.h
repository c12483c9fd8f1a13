/* azf_medfilt_select.h: medfilt's selection of the fragments between two weighted quantiles.

   Part of the Cython backend (kernels/_engine.pyx includes it). Plain C++ over arrays, no
   Python objects: the caller holds no GIL. A bin's fragments are (sortable key, slot) items;
   a radix partition on the keys finds the fragments whose cumulative weight span meets
   [quant_min·T, quant_max·T] without sorting the whole row (see docs/internals.md, medfilt).
*/
#ifndef AZF_MEDFILT_SELECT_H
#define AZF_MEDFILT_SELECT_H

#include <cstdint>
#include <cstring>
#include <cmath>

/* One fragment of a bin in medfilt: its corrected value mapped to an unsigned integer with
   the same order, and its position in the row. Rows list their pixels in increasing index,
   so keeping the row order among equal keys (a stable order) breaks ties by pixel index,
   as the contract asks. */
struct azf_item {
    uint64_t key;
    int64_t slot;
};

static inline uint64_t azf_sortable_key(double x) {
    x += 0.0;  /* -0.0 -> +0.0: the two compare equal and must tie */
    uint64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return (bits >> 63) ? ~bits : (bits | 0x8000000000000000ULL);
}

/* Index of the highest set bit of a non-zero value. */
static inline int azf_top_bit(uint64_t value) {
#if defined(__GNUC__) || defined(__clang__)
    return 63 - __builtin_clzll(value);
#else
    int bit = 0;
    while (value >>= 1) ++bit;
    return bit;
#endif
}

static inline void azf_insertion_sort(azf_item* items, Py_ssize_t n) {
    for (Py_ssize_t i = 1; i < n; ++i) {
        azf_item cur = items[i];
        Py_ssize_t j = i;
        while (j > 0 && items[j - 1].key > cur.key) { items[j] = items[j - 1]; --j; }
        items[j] = cur;
    }
}

/* Stable sort of items[0:n) by key (tmp[0:n) is scratch); returns items or tmp, whichever
   holds the result. LSD radix sort on bytes, skipping the bytes all keys share. */
static inline azf_item* azf_sort_items(azf_item* items, azf_item* tmp, Py_ssize_t n) {
    if (n < 48) { azf_insertion_sort(items, n); return items; }
    Py_ssize_t counts[8][256];
    std::memset(counts, 0, sizeof counts);
    for (Py_ssize_t i = 0; i < n; ++i) {
        uint64_t k = items[i].key;
        for (int d = 0; d < 8; ++d) counts[d][(k >> (8 * d)) & 255u]++;
    }
    azf_item* src = items;
    azf_item* dst = tmp;
    for (int d = 0; d < 8; ++d) {
        Py_ssize_t* c = counts[d];
        if (c[(src[0].key >> (8 * d)) & 255u] == n) continue;  /* all share this byte */
        Py_ssize_t offsets[256];
        Py_ssize_t total = 0;
        for (int b = 0; b < 256; ++b) { offsets[b] = total; total += c[b]; }
        for (Py_ssize_t i = 0; i < n; ++i)
            dst[offsets[(src[i].key >> (8 * d)) & 255u]++] = src[i];
        azf_item* swap = src; src = dst; dst = swap;
    }
    return src;
}

/* The quantile rule of medfilt, for one fragment of weight w spanning [lower, upper] of the
   cumulative weight: inside [lo, hi], or covering all of it. */
static inline bool azf_selected(double w, double lower, double upper, double lo, double hi) {
    return w != 0.0 && ((lo <= lower && upper <= hi) || (lo >= lower && upper >= hi));
}

/* Selection state of one bin. The fast path cumulates weights in another order than the
   reference (sorted order, one by one), so its cumulative weights may differ from the
   reference's by rounding, up to `tol`; any comparison closer than that to deciding the
   other way sets `uncertain`, and the bin is then redone exactly (azf_select_exact).
   Comparisons with lo or hi equal to 0 are exact in any order (weights are >= 0). */
struct azf_selection {
    const double* weight;  /* by slot */
    double lo, hi;
    double tol;
    bool uncertain;
    int64_t* out;          /* selected slots */
    Py_ssize_t n_out;
};

static inline bool azf_near(double value, double bound, double tol) {
    return bound != 0.0 && std::fabs(value - bound) <= tol;
}

/* Walk items already in key order (ties in row order), cumulating from `base`. */
static inline void azf_walk(azf_selection* sel, const azf_item* items, Py_ssize_t n,
                            double base) {
    double upper = base;
    for (Py_ssize_t i = 0; i < n; ++i) {
        double w = sel->weight[items[i].slot];
        double lower = upper;
        upper = upper + w;
        if (w == 0.0) continue;
        if (azf_near(lower, sel->lo, sel->tol) || azf_near(upper, sel->hi, sel->tol))
            sel->uncertain = true;
        if (azf_selected(w, lower, upper, sel->lo, sel->hi))
            sel->out[sel->n_out++] = items[i].slot;
    }
}

enum { AZF_NONE = 0, AZF_ALL = 1, AZF_REFINE = 2 };

/* Decide a run of fragments without ordering it: none can be selected when the run ends
   below lo or starts above hi, all (but those of weight 0) when it lies inside [lo, hi]. */
static inline int azf_classify(azf_selection* sel, double base, double total) {
    double end = base + total;
    double lo = sel->lo, hi = sel->hi, tol = sel->tol;
    if (azf_near(base, lo, tol) || azf_near(end, lo, tol) || azf_near(base, hi, tol) ||
            azf_near(end, hi, tol))
        sel->uncertain = true;
    if (end < lo || base > hi) return AZF_NONE;
    if (lo <= base && end <= hi) return AZF_ALL;
    return AZF_REFINE;
}

/* The reference computation: stable sort of all fragments by key, cumulative weights one
   by one in that order, T = the last one. items is rebuilt by the caller. */
static inline void azf_select_exact(azf_selection* sel, azf_item* items, azf_item* scratch,
                                    Py_ssize_t n, double quant_min, double quant_max) {
    azf_item* sorted = azf_sort_items(items, scratch, n);
    double total = 0.0;
    for (Py_ssize_t i = 0; i < n; ++i) total = total + sel->weight[sorted[i].slot];
    sel->lo = quant_min * total;
    sel->hi = quant_max * total;
    sel->tol = -1.0;
    sel->n_out = 0;
    azf_walk(sel, sorted, n, 0.0);
}

/* Weighted quantile selection by recursive radix partitioning (a radix "select": only the
   runs that straddle lo or hi are ever ordered). items[0:n) are the fragments of a run of
   consecutive key ranks, in row order, with keys in [kmin, kmax] and cumulative weight
   `base` before them; scratch has room for n + 1 items and sel->out for one more slot than
   it will hold. Appends the selected slots to sel->out. */
static void azf_select_run(azf_selection* sel, azf_item* items, azf_item* scratch,
                           Py_ssize_t n, double base, uint64_t kmin, uint64_t kmax) {
    if (n <= 32) {
        azf_insertion_sort(items, n);
        azf_walk(sel, items, n, base);
        return;
    }
    if (kmin == kmax) {  /* all tied: the row order is the order */
        azf_walk(sel, items, n, base);
        return;
    }
    const double* weight_of = sel->weight;
    int top = azf_top_bit(kmax - kmin);
    int shift = top > 7 ? top - 7 : 0;
    /* histogram of counts and weights; two interleaved copies so that runs of one bucket
       do not serialise on a single memory location */
    Py_ssize_t count[2][256];
    double weight[2][256];
    std::memset(count, 0, sizeof count);
    std::memset(weight, 0, sizeof weight);
    Py_ssize_t i = 0;
    for (; i + 1 < n; i += 2) {
        unsigned b0 = (unsigned) ((items[i].key - kmin) >> shift);
        unsigned b1 = (unsigned) ((items[i + 1].key - kmin) >> shift);
        count[0][b0]++;
        weight[0][b0] += weight_of[items[i].slot];
        count[1][b1]++;
        weight[1][b1] += weight_of[items[i + 1].slot];
    }
    if (i < n) {
        unsigned b0 = (unsigned) ((items[i].key - kmin) >> shift);
        count[0][b0]++;
        weight[0][b0] += weight_of[items[i].slot];
    }
    if (count[0][(unsigned) ((items[0].key - kmin) >> shift)] +
            count[1][(unsigned) ((items[0].key - kmin) >> shift)] == n) {
        /* one bucket holds everything: narrow to the true key range and start again */
        uint64_t low = items[0].key, high = items[0].key;
        for (i = 1; i < n; ++i) {
            low = items[i].key < low ? items[i].key : low;
            high = items[i].key > high ? items[i].key : high;
        }
        if (low == high) { azf_walk(sel, items, n, base); return; }
        if (low != kmin || high != kmax) {
            azf_select_run(sel, items, scratch, n, base, low, high);
            return;
        }
    }
    /* classify each bucket from its cumulative weight; only straddling buckets get room in
       scratch, the others write to the sink slot n */
    Py_ssize_t offset[256];
    Py_ssize_t step[256];
    unsigned char take[256];
    Py_ssize_t start[256];
    double bucket_base[256];
    double cum = base;
    Py_ssize_t pos = 0;
    int n_refine = 0;
    int refine[256];
    for (int b = 0; b < 256; ++b) {
        Py_ssize_t c = count[0][b] + count[1][b];
        double wb = weight[0][b] + weight[1][b];
        int kind = c ? azf_classify(sel, cum, wb) : AZF_NONE;
        take[b] = kind == AZF_ALL;
        if (kind == AZF_REFINE) {
            offset[b] = pos;
            start[b] = pos;
            step[b] = 1;
            bucket_base[b] = cum;
            count[0][b] = c;
            refine[n_refine++] = b;
            pos += c;
        } else {
            offset[b] = n;
            step[b] = 0;
        }
        cum += wb;
    }
    int64_t* out = sel->out;
    Py_ssize_t n_out = sel->n_out;
    for (i = 0; i < n; ++i) {
        azf_item item = items[i];
        unsigned b = (unsigned) ((item.key - kmin) >> shift);
        scratch[offset[b]] = item;
        offset[b] += step[b];
        out[n_out] = item.slot;
        n_out += take[b] & (weight_of[item.slot] != 0.0);
    }
    sel->n_out = n_out;
    /* recurse on the straddling buckets, in key order: their fragments are in scratch, the
       matching part of items is their scratch */
    for (int r = 0; r < n_refine; ++r) {
        int b = refine[r];
        uint64_t low = kmin + ((uint64_t) b << shift);
        uint64_t high = low + (((uint64_t) 1 << shift) - 1);
        if (high > kmax || high < low) high = kmax;
        azf_select_run(sel, scratch + start[b], items + start[b], count[0][b],
                       bucket_base[b], low, high);
    }
}

#endif /* AZF_MEDFILT_SELECT_H */
