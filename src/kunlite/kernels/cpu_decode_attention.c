/* The CPU decode path's attention (AVX2 + FMA, OpenMP): one query token per sequence over the
 * paged KV pool, read in place. */
#include "cpu_decode.h"

/* Sums of 8 vectors, as one vector: lane t is the sum of a[t]'s lanes. */
static inline __m256 hsum8(const __m256 *a) {
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    /* s0 = [a0..a3 over lanes 0-3 | a0..a3 over lanes 4-7], s1 the same for a4..a7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* Attention of the Hq query rows qb (fp32, d = 8 * D8 apart) of sequence b over its pages
 * [pg0, pg1): online softmax (running max m, running sum l, accumulator acc rescaled when m grows)
 * over whole token rows, so every page is read front to back, once. Query j belongs to KV head
 * j / G. Leaves acc unnormalised; l == 0 when the range is empty.
 *
 * Per page and query head, scores come 8 tokens at a time (8 independent dot products, one
 * transposing reduction), and the value sum keeps up to 8 vectors of the accumulator in registers
 * across the page's tokens. Inlined with constant D8 and bf16 for the common head dims, so the
 * vector loops unroll; rows past a page's tail repeat its first row of the block (never read
 * past the page) and their scores are never used. */
static inline __attribute__((always_inline)) void attend(const float *qb, const void *kv, const int *pages,
                                                         long pg0, long pg1, long S, long Hq, long Hkv,
                                                         const long D8, long ps, float scale, const int bf16,
                                                         float *acc, float *m, float *l) {
    const long d = 8 * D8, esize = bf16 ? 2 : 4, G = Hq / Hkv, row = Hkv * d; /* row: values per token */
    const long ps8 = (ps + 7) / 8 * 8; /* score rows padded to whole vectors */
    float s[Hq * ps8];
    for (long i = 0; i < Hq * d; i++) acc[i] = 0.0f;
    for (long j = 0; j < Hq; j++) m[j] = -INFINITY, l[j] = 0.0f;
    for (long pg = pg0; pg < pg1; pg++) {
        const long p0 = pg * ps, n = S - p0 < ps ? S - p0 : ps;
        const char *K = (const char *)kv + (long)pages[pg] * 2 * ps * row * esize;
        const char *V = K + ps * row * esize;
        for (long t0 = 0; t0 < n; t0 += 8)
            for (long j = 0; j < Hq; j++) {
                const char *kr[8];
                for (long t = 0; t < 8; t++) kr[t] = K + ((t0 + (t0 + t < n ? t : 0)) * row + (j / G) * d) * esize;
                __m256 a[8];
                for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
                for (long c = 0; c < D8; c++) {
                    const __m256 qv = _mm256_loadu_ps(qb + j * d + 8 * c);
                    for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(load8(kr[t], 8 * c, bf16), qv, a[t]);
                }
                _mm256_storeu_ps(s + j * ps8 + t0, _mm256_mul_ps(hsum8(a), _mm256_set1_ps(scale)));
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
            const char *vh = V + (j / G) * d * esize;
            for (long c0 = 0; c0 < D8; c0 += 8) {
                const long cn = D8 - c0 < 8 ? D8 - c0 : 8;
                float *aj = acc + j * d + 8 * c0;
                __m256 o[8];
                for (long c = 0; c < cn; c++) o[c] = _mm256_loadu_ps(aj + 8 * c);
                for (long t = 0; t < n; t++) {
                    const __m256 p = _mm256_set1_ps(sj[t]);
                    const char *vr = vh + t * row * esize;
                    for (long c = 0; c < cn; c++) o[c] = _mm256_fmadd_ps(p, load8(vr, 8 * (c0 + c), bf16), o[c]);
                }
                for (long c = 0; c < cn; c++) _mm256_storeu_ps(aj + 8 * c, o[c]);
            }
        }
    }
}

static void attend_pages(const float *qb, const void *kv, const int *pages, long pg0, long pg1, long S, long Hq,
                         long Hkv, long d, long ps, float scale, int bf16, float *acc, float *m, float *l) {
#define KL_ATTEND(D8, BF16) attend(qb, kv, pages, pg0, pg1, S, Hq, Hkv, D8, ps, scale, BF16, acc, m, l)
    if (d == 64 && !bf16) KL_ATTEND(8, 0);
    else if (d == 64) KL_ATTEND(8, 1);
    else if (d == 128 && !bf16) KL_ATTEND(16, 0);
    else if (d == 128) KL_ATTEND(16, 1);
    else if (!bf16) KL_ATTEND(d / 8, 0);
    else KL_ATTEND(d / 8, 1);
#undef KL_ATTEND
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
