/* LR-QAT's fused quantizer on the CPU: the element-wise passes of methods/fused.py and the backward's clip
 * correction as plain C loops, built once per machine by methods/fused_native.py and called through ctypes.
 *
 * Exactness (the project's rule: the codes training uses are the codes the fuse writes): every weight goes
 * through the same IEEE float32 operations as the eager layer, in the same order,
 *     u = upcast(Φ0);  r = rint(u + ls·ab);  c = min(max(r, qmin), qmax);  w = (c − z)·s
 * with round half to even (rintf under the default rounding mode), and the file is compiled with
 * -ffp-contract=off and without -ffast-math, so no multiply-add is contracted into an FMA and nothing is
 * reordered. tests/test_fused.py compares the results with the eager layer bit for bit.
 *
 * Φ0's storage ("kind"): 0 float32, 1 bfloat16 (raw 16 bits), 2 int8 fixed point (value / 2^frac, exact).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define CHUNK 64
#define TBLOCK 16

#if defined(__AVX__)
#include <immintrin.h>
/* d[c·ldd + k] = s[k·lds + c] for an 8 × 8 block: eight rows loaded, transposed in registers, eight rows stored */
static inline void tr8x8(const float *s, int64_t lds, float *d, int64_t ldd) {
    __m256 r[8], t[8], u[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(s + k * lds);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(d + k * ldd, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
        _mm256_storeu_ps(d + (k + 4) * ldd, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
    }
}
#endif

/* dst (cols × rows, row stride ldd) = srcᵀ, src (rows × cols, row stride lds): 8 × 8 blocks in registers where the
 * CPU has AVX, element by element at the edges and elsewhere. A copy: the values are moved, never changed. */
static void transpose(const float *src, int64_t rows, int64_t cols, int64_t lds, float *dst, int64_t ldd) {
    int64_t r0 = 0, c0 = 0;
#if defined(__AVX__)
    for (; r0 + 8 <= rows; r0 += 8)
        for (c0 = 0; c0 + 8 <= cols; c0 += 8) tr8x8(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
    for (int64_t rr = 0; rr < r0; rr++)  /* the columns past the last block of eight, for the blocked rows */
        for (int64_t c = c0; c < cols; c++) dst[c * ldd + rr] = src[rr * lds + c];
#endif
    for (int64_t rr = r0; rr < rows; rr++)  /* the rows past the last block of eight (all of them without AVX) */
        for (int64_t c = 0; c < cols; c++) dst[c * ldd + rr] = src[rr * lds + c];
}

/* The same split over the calling team's threads (inside a parallel region): each takes a range of src's columns,
 * in multiples of eight. */
static void transpose_team(const float *src, int64_t rows, int64_t cols, int64_t lds, float *dst, int64_t ldd) {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t blocks = (cols + 7) / 8;
    const int64_t b0 = blocks * tid / nt, b1 = blocks * (tid + 1) / nt;
    const int64_t c0 = 8 * b0, c1 = 8 * b1 < cols ? 8 * b1 : cols;
    if (c1 > c0) transpose(src + c0, rows, c1 - c0, lds, dst + c0 * ldd, ldd);
}

static inline float up_f32(const void *p, int64_t k) { return ((const float *)p)[k]; }
/* clip to [lo, hi] with comparisons (fminf / fmaxf's IEEE signed-zero rules keep GCC from vectorising them); the
 * same value as torch's clamp for every non-NaN input, up to the sign of a zero code (±0 are the same code) */
static inline float clip(float r, float lo, float hi) {
    float c = r < lo ? lo : r;
    return c > hi ? hi : c;
}
static inline float up_i8(const void *p, int64_t k) { return (float)((const int8_t *)p)[k]; }
static inline float up_bf16(const void *p, int64_t k) {
    uint32_t bits = (uint32_t)((const uint16_t *)p)[k] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

typedef struct {
    int64_t n, cap;
    int64_t *pos;
    float *w;
    int64_t nclip;
    int64_t *clip; /* flat positions of the clipped ones */
    int overflow;  /* 1: past the limit, 2: out of memory */
} evbuf;

static void ev_push(evbuf *b, int64_t pos, float w, int clipped, int64_t limit) {
    if (b->overflow) return;
    if (b->n >= limit) { b->overflow = 1; return; }
    if (b->n == b->cap) {
        int64_t cap = b->cap ? 2 * b->cap : 1024;
        int64_t *p = realloc(b->pos, (size_t)cap * sizeof(int64_t));
        if (p) b->pos = p;
        float *w2 = p ? realloc(b->w, (size_t)cap * sizeof(float)) : NULL;
        if (w2) b->w = w2;
        int64_t *c = w2 ? realloc(b->clip, (size_t)cap * sizeof(int64_t)) : NULL;
        if (c) b->clip = c;
        if (!c) { b->overflow = 2; return; }
        b->cap = cap;
    }
    b->pos[b->n] = pos;
    b->w[b->n++] = w;
    if (clipped) b->clip[b->nclip++] = pos;
}

/* One group's run of `len` weights from flat position k: Ŵ, and (events) the entries whose code left RTN's
 * c0 = clip(rint(u)) (flag 1) or clipped (flag 2), pushed in order. A chunk without events costs one test; the
 * flags of one with events are read back two at a time as 64-bit words. UP is the upcast, a compile-time choice
 * per storage so that the loop vectorises. */
#define GROUP_PASS(UP, EXTRA)                                                                                   \
    for (int64_t j0 = 0; j0 < len; j0 += CHUNK) {                                                               \
        const int n = (int)(len - j0 < CHUNK ? len - j0 : CHUNK);                                               \
        int32_t e[CHUNK];                                                                                       \
        int32_t any = 0;                                                                                            \
        const int64_t kk = k + j0;                                                                              \
        _Pragma("GCC ivdep") for (int t = 0; t < n; t++) {                                                      \
            const float u = UP(phi0, kk + t) EXTRA;                                                             \
            const float r = rintf(u + ls * ab[kk + t]);                                                         \
            const float c = clip(r, qmin, qmax);                                                                \
            w[kk + t] = (c - zz) * sc;                                                                          \
            const int32_t ev = (r != c) * 2 | (c != clip(rintf(u), qmin, qmax));                                \
            e[t] = ev;                                                                                          \
            any |= ev;                                                                                          \
        }                                                                                                       \
        if (any) {                                                                                              \
            for (int t = n; t < CHUNK; t++) e[t] = 0;                                                           \
            for (int wd = 0; wd < n; wd += 2) {                                                                 \
                uint64_t v;                                                                                     \
                memcpy(&v, e + wd, 8);                                                                          \
                if (v) {                                                                                        \
                    if (e[wd]) ev_push(b, kk + wd, w[kk + wd], e[wd] == 2, limit);                              \
                    if (e[wd + 1]) ev_push(b, kk + wd + 1, w[kk + wd + 1], e[wd + 1] == 2, limit);              \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }

#define GROUP_PASS_W(UP, EXTRA)                                                                                 \
    _Pragma("GCC ivdep") for (int64_t t = 0; t < len; t++)                                                      \
        w[k + t] = (clip(rintf(UP(phi0, k + t) EXTRA + ls * ab[k + t]), qmin, qmax) - zz) * sc;

typedef struct {
    int nthreads;
    evbuf *bufs;
} evset;

/* Ŵ (out, in) float32 = (clip(rint(upcast(Φ0) + ls·ab), qmin, qmax) − z)·s, with s and z per (row, group of gs
 * weights). w may be ab itself (in place: each element is read before it is written, and no other is touched, so
 * the loops vectorise without alias checks — `ivdep`); it must not overlap ab otherwise. z may be NULL (symmetric:
 * the eager layer subtracts nothing; c − 0 is c). Returns NULL without events.
 * With events, a handle to them: counts = {their number, how many clipped, status (0 kept, 1 past `limit`, 2 out of
 * memory)}; `lrq_take` copies them out and frees the handle. Rows are split into one contiguous range per thread and
 * the ranges are concatenated in order, so the events come out row-major, ascending. */
void *lrq_forward(const void *phi0, int kind, float frac_div, const float *ab, float ls, const float *s,
                  const float *z, int64_t out, int64_t in, int64_t gs, float qmin, float qmax, float *w, int events,
                  int64_t limit, int64_t *counts, int nthreads) {
    const int64_t G = in / gs;
    if (nthreads < 1) nthreads = 1;
    evset *h = NULL;
    if (events) {
        h = calloc(1, sizeof(evset));
        if (h) h->bufs = calloc((size_t)nthreads, sizeof(evbuf));
        if (!h || !h->bufs) {
            free(h);
            counts[0] = counts[1] = 0;
            counts[2] = 2;
            return NULL;
        }
        h->nthreads = nthreads;
    }
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        evbuf *b = h ? &h->bufs[tid] : NULL;
        const int64_t r0 = out * tid / nt, r1 = out * (tid + 1) / nt;
        for (int64_t i = r0; i < r1; i++) {
            for (int64_t gi = 0; gi < G; gi++) {
                const float sc = s[i * G + gi];
                const float zz = z ? z[i * G + gi] : 0.0f;
                const int64_t k = i * in + gi * gs, len = gs;
                if (!events) {
                    if (kind == 0) { GROUP_PASS_W(up_f32, ) }
                    else if (kind == 1) { GROUP_PASS_W(up_bf16, ) }
                    else { GROUP_PASS_W(up_i8, / frac_div) }
                } else if (kind == 0) {
                    GROUP_PASS(up_f32, )
                } else if (kind == 1) {
                    GROUP_PASS(up_bf16, )
                } else {
                    GROUP_PASS(up_i8, / frac_div)
                }
            }
        }
    }
    if (!h) return NULL;
    int64_t n = 0, nclip = 0;
    int status = 0;
    for (int t = 0; t < nthreads; t++) {
        n += h->bufs[t].n;
        nclip += h->bufs[t].nclip;
        if (h->bufs[t].overflow > status) status = h->bufs[t].overflow;
    }
    if (!status && n > limit) status = 1;
    counts[0] = n;
    counts[1] = nclip;
    counts[2] = status;
    return h;
}

/* Copies the events of handle `h` out (positions as int32 or int64, Ŵ there, the clipped ones as (row, column)
 * int64 pairs) and frees it; with pos_out NULL only frees it. */
void lrq_take(void *handle, void *pos_out, int pos64, float *w_out, int64_t *clip_out, int64_t in) {
    evset *h = handle;
    if (!h) return;
    int64_t at = 0, atc = 0;
    for (int t = 0; t < h->nthreads; t++) {
        evbuf *b = &h->bufs[t];
        if (pos_out) {
            if (pos64) memcpy((int64_t *)pos_out + at, b->pos, (size_t)b->n * sizeof(int64_t));
            else
                for (int64_t m = 0; m < b->n; m++) ((int32_t *)pos_out)[at + m] = (int32_t)b->pos[m];
            memcpy(w_out + at, b->w, (size_t)b->n * sizeof(float));
            for (int64_t m = 0; m < b->nclip; m++) {
                clip_out[2 * (atc + m)] = b->clip[m] / in;
                clip_out[2 * (atc + m) + 1] = b->clip[m] % in;
            }
        }
        at += b->n;
        atc += b->nclip;
        free(b->pos);
        free(b->w);
        free(b->clip);
    }
    free(h->bufs);
    free(h);
}

/* RTN's Ŵ = (clip(rint(upcast(Φ0)), qmin, qmax) − z)·s, then the forward's own values put back at its events
 * (`pos`, `vals`: K entries): the forward's Ŵ bit for bit, without A·B. */
void lrq_rebuild(const void *phi0, int kind, float frac_div, const float *s, const float *z, int64_t out, int64_t in,
                 int64_t gs, float qmin, float qmax, float *w, const void *pos, int pos64, const float *vals,
                 int64_t K, int nthreads) {
    const int64_t G = in / gs;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < out; i++) {
        for (int64_t gi = 0; gi < G; gi++) {
            const float sc = s[i * G + gi];
            const float zz = z ? z[i * G + gi] : 0.0f;
            const int64_t k = i * in + gi * gs;
            if (kind == 0) {
                for (int64_t t = 0; t < gs; t++)
                    w[k + t] = (clip(rintf(up_f32(phi0, k + t)), qmin, qmax) - zz) * sc;
            } else if (kind == 1) {
                for (int64_t t = 0; t < gs; t++)
                    w[k + t] = (clip(rintf(up_bf16(phi0, k + t)), qmin, qmax) - zz) * sc;
            } else {
                const int8_t *q = (const int8_t *)phi0;
                for (int64_t t = 0; t < gs; t++)
                    w[k + t] = (clip(rintf((float)q[k + t] / frac_div), qmin, qmax) - zz) * sc;
            }
        }
    }
    for (int64_t m = 0; m < K; m++) {
        int64_t p = pos64 ? ((const int64_t *)pos)[m] : (int64_t)((const int32_t *)pos)[m];
        w[p] = vals[m];
    }
}

/* A positive float rounded to float16 and back, round half to even: what torch's .half().float() gives. For x in
 * [2^-24, 65504] (the scales' clamp): 10 mantissa bits kept at or above 2^-14, fp16's subnormal quantum 2^-24 below
 * (x·2^24 and its rounding are exact in float32). NaN stays NaN. */
static inline float round_fp16(float x) {
    if (x != x) return x;
    if (x < 0x1p-14f) return rintf(x * 0x1p24f) * 0x1p-24f;
    uint32_t bits;
    memcpy(&bits, &x, 4);
    bits += 0xFFFu + ((bits >> 13) & 1u);
    bits &= ~0x1FFFu;
    memcpy(&x, &bits, 4);
    return x;
}

/* The forward's per-row values from the n float32 scales: s16 = fp16(clamp(scale, tiny, max)) as float32 (common
 * .fp16_scales) and keep = 1 where the clamp was the identity (fused.ds_mask: where fp16_ste passes the gradient). */
void lrq_scales(const float *scale, int64_t n, float tiny, float hi, float *s16, float *keep) {
    for (int64_t k = 0; k < n; k++) {
        const float v = scale[k];
        s16[k] = round_fp16(clip(v, tiny, hi));
        keep[k] = (v >= tiny) & (v <= hi) ? 1.0f : 0.0f;
    }
}

/* The backward's products of dy (T, out), in one pass: gs_t = (dy·diag(s·ls))ᵀ (out, T), the scaled gradient the
 * low-rank products and the clip correction take, stored token-minor (the correction reads its rows), and
 * dsum[i] = Σ_t dy[t, i]·(y[t, i] − bias[i]), the scale's gradient times s (y: the forward's output; bias may be
 * NULL). Threads take blocks of TBLOCK columns; within one, eight tokens at a time are scaled into a small buffer
 * (rows of dy and y read a line at a time) and transposed into gs_t; each dsum is one sum over t in order. */
void lrq_dy_pass(const float *dy, const float *y, const float *bias, const float *s, float ls, int64_t T,
                 int64_t out, float *gs_t, float *dsum, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i0 = 0; i0 < out; i0 += TBLOCK) {
        const int64_t ni = out - i0 < TBLOCK ? out - i0 : TBLOCK;
        float sl[TBLOCK], acc[TBLOCK], b0[TBLOCK], buf[8 * TBLOCK];
        for (int64_t ii = 0; ii < ni; ii++) {
            sl[ii] = s[i0 + ii] * ls;
            acc[ii] = 0.0f;
            b0[ii] = bias ? bias[i0 + ii] : 0.0f;
        }
        for (int64_t t0 = 0; t0 < T; t0 += 8) {
            const int64_t nt8 = T - t0 < 8 ? T - t0 : 8;
            for (int64_t k = 0; k < nt8; k++) {
                const float *g = dy + (t0 + k) * out + i0, *yt = y + (t0 + k) * out + i0;
                float *o = buf + k * TBLOCK;
                if (bias)
                    for (int64_t ii = 0; ii < ni; ii++) {
                        o[ii] = g[ii] * sl[ii];
                        acc[ii] += g[ii] * (yt[ii] - b0[ii]);
                    }
                else
                    for (int64_t ii = 0; ii < ni; ii++) {
                        o[ii] = g[ii] * sl[ii];
                        acc[ii] += g[ii] * yt[ii];
                    }
            }
            transpose(buf, nt8, ni, TBLOCK, gs_t + i0 * T + t0, T);
        }
        for (int64_t ii = 0; ii < ni; ii++) dsum[i0 + ii] = acc[ii];
    }
}

/* The clipped entries' part of dA and dB (the clamp stops their gradient): for each (i, j) of `rc` (K × 2),
 *     g = neg · Σ_t gs_t[i, t]·x[t, j];   da[i, :] += g·b[:, j];   db[:, j] += g·a[i, :]
 * gs_t (out, T) (lrq_dy_pass: (dy·diag(s·α/r))ᵀ), x (T, in), a (out, r), b (r, in), da (out, r), db (r, in), all
 * row-major float32. x, B and dB are transposed first, so that the K sampled dot products, in parallel, read two
 * contiguous rows of T, and the scatter, a few flops an entry, on one thread, touches two contiguous rows of r (not
 * 2r cache lines a column of B and dB apart). Each element of da and db takes the same additions in the same order
 * as with B and dB as they are. */
int lrq_clip_correction(const float *gs_t, const float *x, int64_t T, int64_t in, const float *a, const float *b,
                        int64_t r, const int64_t *rc, int64_t K, float neg, float *da, float *db, int nthreads) {
    if (K == 0) return 0;
    float *xt = malloc((size_t)(T * in) * sizeof(float));
    float *g = malloc((size_t)K * sizeof(float));
    float *bt = malloc((size_t)(2 * r * in) * sizeof(float));
    if (!xt || !g || !bt) { free(xt); free(g); free(bt); return -2; }
    float *dbt = bt + r * in;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        transpose_team(x, T, in, in, xt, T);
        transpose_team(b, r, in, in, bt, r);
        transpose_team(db, r, in, in, dbt, r);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t m = 0; m < K; m++) {
            const float *p = gs_t + rc[2 * m] * T, *q = xt + rc[2 * m + 1] * T;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  /* eight lanes: the loop vectorises without reordering */
            int64_t t = 0;
            for (; t + 8 <= T; t += 8)
                for (int l = 0; l < 8; l++) acc[l] += p[t + l] * q[t + l];
            float sum = 0.0f;
            for (; t < T; t++) sum += p[t] * q[t];
            for (int l = 0; l < 8; l++) sum += acc[l];
            g[m] = neg * sum;
        }
    }
    for (int64_t m = 0; m < K; m++) {
        const int64_t i = rc[2 * m], j = rc[2 * m + 1];
        const float gv = g[m];
        float *restrict dai = da + i * r, *restrict dbj = dbt + j * r;
        const float *restrict ai = a + i * r, *restrict bj = bt + j * r;
        for (int64_t q = 0; q < r; q++) {
            dai[q] += gv * bj[q];
            dbj[q] += gv * ai[q];
        }
    }
#pragma omp parallel num_threads(nthreads)
    transpose_team(dbt, in, r, r, db, in);
    free(xt);
    free(g);
    free(bt);
    return 0;
}
