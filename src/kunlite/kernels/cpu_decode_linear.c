/* The CPU decode path's matrix products (AVX2 + FMA, OpenMP), fp32 or bf16 throughout:
 *
 *   Y[m, :] = act(X[m, :]) @ W^T  (+ bias)  (+ R[m, :])        m < M, M small (decode rows)
 *
 * act is the identity, an RMS norm with weight g (the norm before a projection), or SiLU-GLU
 * (X rows hold [gate | up], 2K wide; act = silu(gate) * up, the input of the down projection).
 * Also a plain RMS norm of a few rows (kl_rms_norm, at the end).
 *
 * Why it exists: on this class of machine (AMD, AVX2) torch's fp32 matrix-vector product goes
 * through MKL, which streams weights at a third of the memory bandwidth. Decode at small batch is
 * nothing but streaming weights, so each W row is read from memory once, into L1, and used for
 * all M input rows there. Rows of W are split across threads (OpenMP, the same runtime as torch's
 * when torch is loaded first, so the thread count follows torch.set_num_threads).
 *
 * Invariants: rows of W, X, Y, R dense (row strides given); R may equal Y (each element is read
 * before it is written, by the same thread); nothing is read past K in a row.
 */
#include "cpu_decode.h"

enum { ACT_NONE = 0, ACT_RMS_NORM = 1, ACT_SILU_GLU = 2 };

/* act of one fp32 or bf16 row x (2K wide for SiLU-GLU) into K fp32 values: the one place the
 * norm and GLU arithmetic is written (the products' inputs and kl_rms_norm share it). 8 lanes at
 * a time, the tail one by one with the same operations; the sum of squares in double. */
static void activate_row(const void *x, const void *g, float eps, int act, long K, int bf16, float *out) {
    const long K8 = K / 8 * 8;
    if (act == ACT_RMS_NORM) {
        __m256d s0 = _mm256_setzero_pd(), s1 = s0;
        for (long k = 0; k < K8; k += 8) {
            const __m256 v = load8(x, k, bf16);
            const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            s0 = _mm256_fmadd_pd(lo, lo, s0);
            s1 = _mm256_fmadd_pd(hi, hi, s1);
        }
        double part[4], ss = 0.0;
        _mm256_storeu_pd(part, _mm256_add_pd(s0, s1));
        ss = (part[0] + part[1]) + (part[2] + part[3]);
        for (long k = K8; k < K; k++) ss += (double)ld1(x, k, bf16) * ld1(x, k, bf16);
        const float r = 1.0f / sqrtf((float)(ss / K) + eps);
        const __m256 rv = _mm256_set1_ps(r);
        for (long k = 0; k < K8; k += 8)
            _mm256_storeu_ps(out + k, _mm256_mul_ps(load8(g, k, bf16), _mm256_mul_ps(load8(x, k, bf16), rv)));
        for (long k = K8; k < K; k++) out[k] = ld1(g, k, bf16) * (ld1(x, k, bf16) * r);
    } else if (act == ACT_SILU_GLU) {
        /* silu(gate) = gate / (1 + e^-gate); e^-gate capped at e^88 (finite: silu -> -0) */
        const __m256 one = _mm256_set1_ps(1.0f), cap = _mm256_set1_ps(88.0f);
        for (long k = 0; k < K8; k += 8) {
            const __m256 gate = load8(x, k, bf16);
            const __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gate), cap));
            _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_div_ps(gate, _mm256_add_ps(one, e)), load8(x, K + k, bf16)));
        }
        for (long k = K8; k < K; k++) {
            const float gate = ld1(x, k, bf16);
            out[k] = gate / (1.0f + expf(fminf(-gate, 88.0f))) * ld1(x, K + k, bf16);
        }
    } else {
        for (long k = 0; k < K; k++) out[k] = ld1(x, k, bf16);
    }
}

/* act(X) into a dense (M, K) buffer. */
static void activate(const float *X, float *A, const float *g, float eps, int act, long M, long K, long ldx) {
    for (long m = 0; m < M; m++) activate_row(X + m * ldx, g, eps, act, K, 0, A + m * K);
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

/* Prefetch into L2 part g of `groups` equal parts of the `bytes` from p (nothing when p is NULL):
 * the next 8-row block of W, spread over the groups of x rows that use the current one, so its
 * memory traffic runs under their arithmetic. Prefetching into L1, or all at once, gained 2-5%.
 * Check the assembly (prefetcht1) after editing this: GCC 12 at -O3 deleted the whole loop when
 * the block's size was computed in here from N, n0 and K, and the products lost 12-15%. */
static inline void prefetch_part(const void *p, long bytes, long g, long groups) {
    if (!p) return;
    const long lines = (bytes + 63) / 64, per = (lines + groups - 1) / groups;
    const long l1 = (g + 1) * per < lines ? (g + 1) * per : lines;
    for (long l = g * per; l < l1; l++) _mm_prefetch((const char *)p + 64 * l, _MM_HINT_T1);
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
        /* The 8 rows are read from memory once (into L2 while the block before them computes:
         * without that, 16 rows with weights from memory ran at 60-65 GF/s here, with it 83-99,
         * as fast as from cache) and stay in L1 for every group of x rows: in threes against
         * each half (12 accumulators), then one at a time against all 8. */
        const char *next = blk + 1 < blocks ? (const char *)(W + (n0 + 8) * K) : NULL;
        const long nnext = N - n0 - 8 < 8 ? N - n0 - 8 : 8;
        long m = 0;
        for (; m + 3 <= M; m += 3) {
            prefetch_part(next, nnext * K * 4, m / 3, M / 3);
            tile(w, 4, lo, X, ldx, m, 3, n0, K, Y, ldy, bias, R, ldr);
            if (hi > 0) tile(w + 4, 4, hi, X, ldx, m, 3, n0 + 4, K, Y, ldy, bias, R, ldr);
        }
        for (; m < M; m++) tile(w, 8, nn, X, ldx, m, 1, n0, K, Y, ldy, bias, R, ldr);
    }
    free(A);
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
        activate_row(X + m * ldx, g, eps, act, K, 1, row);
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
        const char *next = blk + 1 < blocks ? (const char *)(W + (n0 + 8) * K) : NULL;
        const long nnext = N - n0 - 8 < 8 ? N - n0 - 8 : 8;
        long m = 0;
        for (; m + 2 <= M; m += 2) {
            prefetch_part(next, nnext * K * 2, m / 2, M / 2);
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
    float row[K];
    for (long m = 0; m < M; m++) {
        activate_row((const char *)X + m * ldx * (bf16 ? 2 : 4), g, eps, ACT_RMS_NORM, K, bf16, row);
        for (long k = 0; k < K; k++) {
            if (bf16)
                ((uint16_t *)Y)[m * K + k] = f2bf(row[k]);
            else
                ((float *)Y)[m * K + k] = row[k];
        }
    }
}
