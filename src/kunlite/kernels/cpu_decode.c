/* The CPU decode path's kernels (AVX2 + FMA, OpenMP): small-batch fp32 matrix products, and
 * paged decode attention (at the end of the file).
 *
 *   Y[m, :] = act(X[m, :]) @ W^T  (+ bias)  (+ R[m, :])        m < M, M small (decode rows)
 *
 * act is the identity, an RMS norm with weight g (the norm before a projection), or SiLU-GLU
 * (X rows hold [gate | up], 2K wide; act = silu(gate) * up, the input of the down projection).
 *
 * Why it exists: on this class of machine (AMD, AVX2) torch's fp32 matrix-vector product goes
 * through MKL, which streams weights at a third of the memory bandwidth. Decode at small batch is
 * nothing but streaming weights, so each W row is read from memory once, into L1, and used for
 * all M input rows there. Rows of W are split across threads (OpenMP, the same runtime as torch's
 * when torch is loaded first, so the thread count follows torch.set_num_threads).
 *
 * Invariants: W, X, Y, R are fp32, rows dense (row strides given); R may equal Y (each element
 * is read before it is written, by the same thread); nothing is read past K in a row.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

enum { ACT_NONE = 0, ACT_RMS_NORM = 1, ACT_SILU_GLU = 2 };

static inline float bf2f(uint16_t v) {
    union { uint32_t u; float f; } c = {(uint32_t)v << 16};
    return c.f;
}

static inline uint16_t f2bf(float f) {
    union { float f; uint32_t u; } c = {f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* 8 consecutive values of an fp32 or bf16 row, as fp32. */
static inline __m256 load8(const void *row, long i, int bf16) {
    if (bf16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i))), 16));
    return _mm256_loadu_ps((const float *)row + i);
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* exp over 8 lanes (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp). Inputs
 * below -87.3 are clamped there (the result is ~1e-38, not 0); softmax only feeds it x <= 0. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* act(X) into a dense (M, K) buffer. */
static void activate(const float *X, float *A, const float *g, float eps, int act, long M, long K, long ldx) {
    for (long m = 0; m < M; m++) {
        const float *x = X + m * ldx;
        float *a = A + m * K;
        if (act == ACT_RMS_NORM) {
            double ss = 0.0;
            for (long k = 0; k < K; k++) ss += (double)x[k] * x[k];
            float r = 1.0f / sqrtf((float)(ss / K) + eps);
            for (long k = 0; k < K; k++) a[k] = g[k] * (x[k] * r);
        } else if (act == ACT_SILU_GLU) {
            for (long k = 0; k < K; k++) {
                float gate = x[k];
                a[k] = gate / (1.0f + expf(-gate)) * x[K + k];
            }
        } else {
            memcpy(a, x, K * sizeof(float));
        }
    }
}

/* Dot products of nr W rows with mr x rows, epilogue included; nr * mr <= 12 accumulators stay
 * in registers. Inlined with constant nr and mr, so the loops unroll. Rows i >= nn of w repeat a
 * valid row and their sums are dropped. */
static inline __attribute__((always_inline)) void tile(const float *const *w, const int nr, long nn, const float *X,
                                                      long ldx, long m0, const int mr, long n0, long K, float *Y,
                                                      long ldy, const float *bias, const float *R, long ldr) {
    __m256 acc[8][3];
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < mr; j++) acc[i][j] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[3];
        for (int j = 0; j < mr; j++) xv[j] = _mm256_loadu_ps(X + (m0 + j) * ldx + k);
        for (int i = 0; i < nr; i++) {
            __m256 wv = _mm256_loadu_ps(w[i] + k);
            for (int j = 0; j < mr; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int j = 0; j < mr; j++) {
        const float *x = X + (m0 + j) * ldx;
        for (long i = 0; i < nn; i++) {
            float v = hsum(acc[i][j]);
            for (long kk = k; kk < K; kk++) v += w[i][kk] * x[kk];
            if (bias) v += bias[n0 + i];
            if (R) v += R[(m0 + j) * ldr + n0 + i];
            Y[(m0 + j) * ldy + n0 + i] = v;
        }
    }
}

/* Up to 4 x rows: one W row at a time, so each thread streams one contiguous range of W front to
 * back. Here that reads 33-44 GB/s; the tiles' 8 interleaved row streams per thread, ~25. From 6
 * rows on, the tiles' register reuse wins (measured at 2..16 rows). */
static void rows_f32(const float *W, const float *X, long ldx, float *Y, long ldy, const float *bias,
                     const float *R, long ldr, long M, long N, long K) {
#pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        const float *w = W + n * K;
        for (long m = 0; m < M; m++) { /* the row is in L1 for m > 0 */
            const float *x = X + m * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            long k = 0;
            for (; k + 32 <= K; k += 32) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
            }
            for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
            float v = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for (; k < K; k++) v += w[k] * x[k];
            if (bias) v += bias[n];
            if (R) v += R[m * ldr + n];
            Y[m * ldy + n] = v;
        }
    }
}

/* Returns 0, or -1 when the (M, K) activation buffer cannot be allocated. */
int kl_gemv_f32(const float *W, const float *X, float *Y, const float *bias, const float *R,
                const float *g, float eps, int act, long M, long N, long K, long ldx, long ldy, long ldr) {
    float *A = NULL;
    if (act != ACT_NONE) {
        A = aligned_alloc(32, ((M * K * sizeof(float)) + 31) / 32 * 32);
        if (!A) return -1;
        activate(X, A, g, eps, act, M, K, ldx);
        X = A;
        ldx = K;
    }
    if (M <= 4) {
        rows_f32(W, X, ldx, Y, ldy, bias, R, ldr, M, N, K);
        free(A);
        return 0;
    }
    const long blocks = (N + 7) / 8;
#pragma omp parallel for schedule(static)
    for (long blk = 0; blk < blocks; blk++) {
        const long n0 = blk * 8, nn = N - n0 < 8 ? N - n0 : 8;
        const float *w[8];
        for (long i = 0; i < 8; i++) w[i] = W + (n0 + (i < nn ? i : 0)) * K;
        const long lo = nn < 4 ? nn : 4, hi = nn - lo; /* rows in the two halves */
        /* The 8 rows are read from memory once and stay in L1 for every group of x rows: in
         * threes against each half (12 accumulators), then one at a time against all 8. */
        long m = 0;
        for (; m + 3 <= M; m += 3) {
            tile(w, 4, lo, X, ldx, m, 3, n0, K, Y, ldy, bias, R, ldr);
            if (hi > 0) tile(w + 4, 4, hi, X, ldx, m, 3, n0 + 4, K, Y, ldy, bias, R, ldr);
        }
        for (; m < M; m++) tile(w, 8, nn, X, ldx, m, 1, n0, K, Y, ldy, bias, R, ldr);
    }
    free(A);
    return 0;
}

/* Attention of the Hq query rows qb (fp32, d apart) of sequence b over its pages [pg0, pg1):
 * online softmax (running max m, running sum l, accumulator acc rescaled when m grows) over whole
 * token rows, so every page is read front to back, once. Query j belongs to KV head j / G.
 * Leaves acc unnormalised; l == 0 when the range is empty. */
static void attend_pages(const float *qb, const void *kv, const int *pages, long pg0, long pg1, long S, long Hq,
                         long Hkv, long d, long ps, float scale, int bf16, float *acc, float *m, float *l) {
    const long esize = bf16 ? 2 : 4, G = Hq / Hkv, row = Hkv * d; /* row: values per token of a page */
    const long ps8 = (ps + 7) / 8 * 8; /* score rows padded to whole vectors */
    float s[Hq * ps8];
    for (long i = 0; i < Hq * d; i++) acc[i] = 0.0f;
    for (long j = 0; j < Hq; j++) m[j] = -INFINITY, l[j] = 0.0f;
    for (long pg = pg0; pg < pg1; pg++) {
        const long p0 = pg * ps, n = S - p0 < ps ? S - p0 : ps;
        const char *K = (const char *)kv + (long)pages[pg] * 2 * ps * row * esize;
        const char *V = K + ps * row * esize;
        for (long t = 0; t < n; t++)
            for (long h = 0; h < Hkv; h++) {
                const char *kr = K + (t * row + h * d) * esize;
                for (long j = h * G; j < (h + 1) * G; j++) {
                    __m256 a = _mm256_setzero_ps();
                    for (long c = 0; c < d; c += 8)
                        a = _mm256_fmadd_ps(load8(kr, c, bf16), _mm256_loadu_ps(qb + j * d + c), a);
                    s[j * ps8 + t] = hsum(a) * scale;
                }
            }
        for (long j = 0; j < Hq; j++) {
            float *sj = s + j * ps8, mx = m[j];
            for (long t = 0; t < n; t++) mx = sj[t] > mx ? sj[t] : mx;
            if (mx > m[j]) { /* rescale what was accumulated under the old max (exp(-inf) = 0) */
                const float alpha = expf(m[j] - mx);
                l[j] *= alpha;
                for (long c = 0; c < d; c++) acc[j * d + c] *= alpha;
                m[j] = mx;
            }
            /* lanes past n are computed and never read */
            for (long t = 0; t < n; t += 8)
                _mm256_storeu_ps(sj + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(sj + t), _mm256_set1_ps(mx))));
            for (long t = 0; t < n; t++) l[j] += sj[t];
        }
        for (long t = 0; t < n; t++)
            for (long h = 0; h < Hkv; h++) {
                const char *vr = V + (t * row + h * d) * esize;
                for (long c = 0; c < d; c += 8) {
                    const __m256 vv = load8(vr, c, bf16);
                    for (long j = h * G; j < (h + 1) * G; j++) {
                        float *ac = acc + j * d + c;
                        _mm256_storeu_ps(ac, _mm256_fmadd_ps(_mm256_set1_ps(s[j * ps8 + t]), vv, _mm256_loadu_ps(ac)));
                    }
                }
            }
    }
}

/* Paged decode attention: one query token per sequence, over the pool in place, no gather.
 *
 *   q (B, Hq, d) dense, out (B, Hq, d) dense; q, pool and out all fp32 or all bf16 (sums in fp32)
 *   kv: the pool (P, 2, ps, Hkv, d) dense; page_table (B, ldpt) int32, this layer's page ids;
 *   seq_lens (B,) int32, each >= 1 and <= ldpt * ps.
 *
 * A task is one sequence, or with fewer sequences than twice the threads, a contiguous run of its
 * pages (split-KV: the runs' partial softmax states are merged at the end, exactly). Reading
 * whole pages front to back matters more than anything else here: weights stream through the
 * caches between layers, so the KV comes from memory every time. d is a multiple of 8. Returns 0,
 * or -1 when the split buffer cannot be allocated.
 */
int kl_paged_decode(const void *q, const void *kv, const int *page_table, long ldpt, const int *seq_lens,
                    void *out, long B, long Hq, long Hkv, long d, long ps, float scale, int bf16) {
    const long threads = omp_get_max_threads();
    const long splits = B >= 2 * threads ? 1 : (2 * threads + B - 1) / B;
    const long part = Hq * (d + 2); /* one task's state: acc (Hq * d), m (Hq), l (Hq) */
    float *state = malloc(B * splits * part * sizeof(float));
    if (!state) return -1;
#pragma omp parallel for schedule(dynamic, 1)
    for (long task = 0; task < B * splits; task++) {
        const long b = task / splits, sp = task % splits, S = seq_lens[b];
        const long np = (S + ps - 1) / ps, per = (np + splits - 1) / splits;
        const long pg0 = sp * per < np ? sp * per : np, pg1 = pg0 + per < np ? pg0 + per : np;
        float qb[Hq * d];
        for (long i = 0; i < Hq * d; i++)
            qb[i] = bf16 ? bf2f(((const uint16_t *)q)[b * Hq * d + i]) : ((const float *)q)[b * Hq * d + i];
        float *acc = state + task * part;
        attend_pages(qb, kv, page_table + b * ldpt, pg0, pg1, S, Hq, Hkv, d, ps, scale, bf16, acc, acc + Hq * d,
                     acc + Hq * d + Hq);
    }
    for (long b = 0; b < B; b++) /* merge: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M) */
        for (long j = 0; j < Hq; j++) {
            float M = -INFINITY, L = 0.0f, o[d];
            for (long sp = 0; sp < splits; sp++) {
                const float *st = state + (b * splits + sp) * part;
                if (st[Hq * d + Hq + j] > 0.0f && st[Hq * d + j] > M) M = st[Hq * d + j];
            }
            for (long c = 0; c < d; c++) o[c] = 0.0f;
            for (long sp = 0; sp < splits; sp++) {
                const float *st = state + (b * splits + sp) * part;
                const float lj = st[Hq * d + Hq + j];
                if (lj <= 0.0f) continue; /* an empty run of pages */
                const float w = expf(st[Hq * d + j] - M);
                L += lj * w;
                for (long c = 0; c < d; c++) o[c] += st[j * d + c] * w;
            }
            const long at = (b * Hq + j) * d;
            for (long c = 0; c < d; c++) {
                if (bf16)
                    ((uint16_t *)out)[at + c] = f2bf(o[c] / L);
                else
                    ((float *)out)[at + c] = o[c] / L;
            }
        }
    free(state);
    return 0;
}

/* ---- bf16 weights and activations (processors without bf16 units) ----------------------------
 *
 * Same product, with W, X, bias, norm weight, R and Y all bf16; arithmetic in fp32, Y rounded to
 * nearest even once. The inputs are widened into a dense fp32 buffer first, with each whole
 * block of 16 columns stored as [8 even | 8 odd]: a 32-bit lane of W holds an (even, odd) pair of
 * bf16, and `pair << 16` is the even one as fp32, `pair & 0xffff0000` the odd one, so a W row is
 * widened in registers with one shift and one and per 16 values, no shuffles. Columns past the
 * last whole block keep their order and are summed one by one.
 */
static void activate_bf16(const uint16_t *X, float *A, const uint16_t *g, float eps, int act, long M, long K,
                          long ldx) {
    float row[K];
    for (long m = 0; m < M; m++) {
        const uint16_t *x = X + m * ldx;
        if (act == ACT_RMS_NORM) {
            double ss = 0.0;
            for (long k = 0; k < K; k++) ss += (double)bf2f(x[k]) * bf2f(x[k]);
            float r = 1.0f / sqrtf((float)(ss / K) + eps);
            for (long k = 0; k < K; k++) row[k] = bf2f(g[k]) * (bf2f(x[k]) * r);
        } else if (act == ACT_SILU_GLU) {
            for (long k = 0; k < K; k++) {
                float gate = bf2f(x[k]);
                row[k] = gate / (1.0f + expf(-gate)) * bf2f(x[K + k]);
            }
        } else {
            for (long k = 0; k < K; k++) row[k] = bf2f(x[k]);
        }
        float *a = A + m * K;
        long k = 0;
        for (; k + 16 <= K; k += 16)
            for (long i = 0; i < 8; i++) a[k + i] = row[k + 2 * i], a[k + 8 + i] = row[k + 2 * i + 1];
        for (; k < K; k++) a[k] = row[k];
    }
}

static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *const *w, const int nr, long nn,
                                                           const float *A, long m0, const int mr, long n0, long K,
                                                           uint16_t *Y, long ldy, const uint16_t *bias,
                                                           const uint16_t *R, long ldr) {
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[8][2];
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < mr; j++) acc[i][j] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 xe[2], xo[2];
        for (int j = 0; j < mr; j++) {
            xe[j] = _mm256_loadu_ps(A + (m0 + j) * K + k);
            xo[j] = _mm256_loadu_ps(A + (m0 + j) * K + k + 8);
        }
        for (int i = 0; i < nr; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w[i] + k));
            const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
            for (int j = 0; j < mr; j++) acc[i][j] = _mm256_fmadd_ps(wo, xo[j], _mm256_fmadd_ps(we, xe[j], acc[i][j]));
        }
    }
    for (int j = 0; j < mr; j++) {
        const float *a = A + (m0 + j) * K;
        for (long i = 0; i < nn; i++) {
            float v = hsum(acc[i][j]);
            for (long kk = k; kk < K; kk++) v += bf2f(w[i][kk]) * a[kk];
            if (bias) v += bf2f(bias[n0 + i]);
            if (R) v += bf2f(R[(m0 + j) * ldr + n0 + i]);
            Y[(m0 + j) * ldy + n0 + i] = f2bf(v);
        }
    }
}

/* Up to 4 x rows, one W row at a time (see rows_f32). */
static void rows_bf16(const uint16_t *W, const float *A, uint16_t *Y, long ldy, const uint16_t *bias,
                      const uint16_t *R, long ldr, long M, long N, long K) {
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
#pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        const uint16_t *w = W + n * K;
        for (long m = 0; m < M; m++) {
            const float *a = A + m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            long k = 0;
            for (; k + 32 <= K; k += 32) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + k));
                const __m256i u = _mm256_loadu_si256((const __m256i *)(w + k + 16));
                a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(a + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), _mm256_loadu_ps(a + k + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), _mm256_loadu_ps(a + k + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(u, odd)), _mm256_loadu_ps(a + k + 24), a3);
            }
            for (; k + 16 <= K; k += 16) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + k));
                a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(a + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), _mm256_loadu_ps(a + k + 8), a1);
            }
            float v = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for (; k < K; k++) v += bf2f(w[k]) * a[k];
            if (bias) v += bf2f(bias[n]);
            if (R) v += bf2f(R[m * ldr + n]);
            Y[m * ldy + n] = f2bf(v);
        }
    }
}

/* Returns 0, or -1 when the (M, K) fp32 buffer cannot be allocated. */
int kl_gemv_bf16(const uint16_t *W, const uint16_t *X, uint16_t *Y, const uint16_t *bias, const uint16_t *R,
                 const uint16_t *g, float eps, int act, long M, long N, long K, long ldx, long ldy, long ldr) {
    float *A = aligned_alloc(32, ((M * K * sizeof(float)) + 31) / 32 * 32);
    if (!A) return -1;
    activate_bf16(X, A, g, eps, act, M, K, ldx);
    if (M <= 4) {
        rows_bf16(W, A, Y, ldy, bias, R, ldr, M, N, K);
        free(A);
        return 0;
    }
    const long blocks = (N + 7) / 8;
#pragma omp parallel for schedule(static)
    for (long blk = 0; blk < blocks; blk++) {
        const long n0 = blk * 8, nn = N - n0 < 8 ? N - n0 : 8;
        const uint16_t *w[8];
        for (long i = 0; i < 8; i++) w[i] = W + (n0 + (i < nn ? i : 0)) * K;
        const long lo = nn < 4 ? nn : 4, hi = nn - lo;
        long m = 0;
        for (; m + 2 <= M; m += 2) {
            tile_bf16(w, 4, lo, A, m, 2, n0, K, Y, ldy, bias, R, ldr);
            if (hi > 0) tile_bf16(w + 4, 4, hi, A, m, 2, n0 + 4, K, Y, ldy, bias, R, ldr);
        }
        for (; m < M; m++) tile_bf16(w, 8, nn, A, m, 1, n0, K, Y, ldy, bias, R, ldr);
    }
    free(A);
    return 0;
}

/* RMS norm of M rows, fp32 or bf16 throughout: y = g * (x / sqrt(mean(x^2) + eps)), the sum of
 * squares in double, one rounding. For a bf16 row, torch's rms_norm is ~10 ops of ~5 us each. */
void kl_rms_norm(const void *X, const void *g, void *Y, long M, long K, long ldx, float eps, int bf16) {
    for (long m = 0; m < M; m++) {
        double ss = 0.0;
        for (long k = 0; k < K; k++) {
            const float v = bf16 ? bf2f(((const uint16_t *)X)[m * ldx + k]) : ((const float *)X)[m * ldx + k];
            ss += (double)v * v;
        }
        const float r = 1.0f / sqrtf((float)(ss / K) + eps);
        for (long k = 0; k < K; k++) {
            if (bf16)
                ((uint16_t *)Y)[m * K + k] = f2bf(bf2f(((const uint16_t *)g)[k]) * (bf2f(((const uint16_t *)X)[m * ldx + k]) * r));
            else
                ((float *)Y)[m * K + k] = ((const float *)g)[k] * (((const float *)X)[m * ldx + k] * r);
        }
    }
}
