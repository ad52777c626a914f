/* Small-batch fp32 matrix products for the CPU decode path (AVX2 + FMA, OpenMP).
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
#include <stdlib.h>
#include <string.h>

enum { ACT_NONE = 0, ACT_RMS_NORM = 1, ACT_SILU_GLU = 2 };

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
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

/* Dot products of 4 W rows with `mr` x rows (the accumulators stay in registers: 4 * mr <= 12),
 * epilogue included. Inlined with a constant mr, so the loops unroll. */
static inline __attribute__((always_inline)) void tile(const float *const w[4], long nn, const float *X, long ldx,
                                                      long m0, int mr, long n0, long K, float *Y, long ldy,
                                                      const float *bias, const float *R, long ldr) {
    __m256 acc[4][3];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < mr; j++) acc[i][j] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[3];
        for (int j = 0; j < mr; j++) xv[j] = _mm256_loadu_ps(X + (m0 + j) * ldx + k);
        for (int i = 0; i < 4; i++) {
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
    long blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (long blk = 0; blk < blocks; blk++) {
        long n0 = blk * 4, nn = N - n0 < 4 ? N - n0 : 4;
        /* a short last block repeats row n0, so the tile stays branch-free; its extra sums are dropped */
        const float *w[4] = {W + n0 * K, W + n0 * K + (nn > 1 ? K : 0), W + n0 * K + (nn > 2 ? 2 * K : 0),
                             W + n0 * K + (nn > 3 ? 3 * K : 0)};
        /* The 4 rows are read from memory once and stay in L1 for every group of x rows. */
        long m = 0;
        for (; m + 3 <= M; m += 3) tile(w, nn, X, ldx, m, 3, n0, K, Y, ldy, bias, R, ldr);
        for (; m < M; m++) tile(w, nn, X, ldx, m, 1, n0, K, Y, ldy, bias, R, ldr);
    }
    free(A);
    return 0;
}
