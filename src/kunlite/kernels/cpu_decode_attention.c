/* The CPU decode path's attention (AVX2 + FMA, OpenMP): one query token per sequence over the
 * paged KV pool, read in place. */
#include "cpu_decode.h"

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
