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
        /* a short last block repeats row n0 so the loop stays branch-free; extra sums are dropped */
        const float *w0 = W + n0 * K, *w1 = w0 + (nn > 1 ? K : 0), *w2 = w0 + (nn > 2 ? 2 * K : 0),
                    *w3 = w0 + (nn > 3 ? 3 * K : 0);
        for (long m = 0; m < M; m++) {
            const float *x = X + m * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            long k = 0;
            for (; k + 8 <= K; k += 8) {
                __m256 xv = _mm256_loadu_ps(x + k);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
            }
            float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
            for (; k < K; k++) {
                s[0] += w0[k] * x[k];
                s[1] += w1[k] * x[k];
                s[2] += w2[k] * x[k];
                s[3] += w3[k] * x[k];
            }
            for (long i = 0; i < nn; i++) {
                float v = s[i];
                if (bias) v += bias[n0 + i];
                if (R) v += R[m * ldr + n0 + i];
                Y[m * ldy + n0 + i] = v;
            }
        }
    }
    free(A);
    return 0;
}
