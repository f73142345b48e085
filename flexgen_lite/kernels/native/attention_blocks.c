/* Decode attention over a position-major cache (l, b, kv_head, d: the layout a cache crossing a link keeps):
   a block of kv heads and all their query heads at once, each position's rows of the block one contiguous run,
   in 16-bit kinds with AVX-512. Called by attention.c. */

#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds here: no bit-identity to keep, unlike int4.c */
#include "attention_rows.h"

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4  /* positions ahead whose rows a position-major walk prefetches */
#endif

#ifdef __AVX512F__
#define TILE 32  /* positions whose rows (a few KB each) the values pass uses up while they are in L2 */

/* a[j] (lanes to be summed) = q_j . key for the `group` query heads j of one kv head, dim 16 * nv; q in fp32
   (qf, rows ds apart) and as given (qb, rows qs apart): a bf16 key by the bf16 dot instruction, an fp16 one
   (`kind`, a constant) converted. */
static inline __attribute__((always_inline)) void key_dots(__m512 *a, const uint16_t *key, const float *qf,
                                                           int64_t ds, const uint16_t *qb, int64_t qs,
                                                           int64_t group, const int nv, const int kind) {
#ifdef __AVX512BF16__
    if (kind == KIND_BF16) {
    const int np = (nv + 1) / 2;  /* bf16 pairs of 32 values; an odd tail of 16 zero-extended */
    __m512bh kp[4];
    for (int i = 0; i < np; i++)
        kp[i] = (__m512bh)(2 * i + 1 < nv ? _mm512_loadu_si512(key + 32 * i)
                                          : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(key + 32 * i))));
    for (int64_t g = 0; g < group; g++) {
        const uint16_t *qj = qb + g * qs;
        __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int i = 0; i < np; i++) {
            __m512i qp = 2 * i + 1 < nv ? _mm512_loadu_si512(qj + 32 * i)
                                        : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(qj + 32 * i)));
            s[i % 2] = _mm512_dpbf16_ps(s[i % 2], kp[i], (__m512bh)qp);
        }
        a[g] = _mm512_add_ps(s[0], s[1]);
    }
    return;
    }
#endif
    (void)qb, (void)qs;
    __m512 kv[8];
    for (int i = 0; i < nv; i++) kv[i] = half16(key + 16 * i, kind);
    for (int64_t g = 0; g < group; g++) {
        const float *qj = qf + g * ds;
        __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int i = 0; i < nv; i++) s[i % 2] = _mm512_fmadd_ps(kv[i], _mm512_loadu_ps(qj + 16 * i), s[i % 2]);
        a[g] = _mm512_add_ps(s[0], s[1]);
    }
}

/* acc (head j's row at acc + j * ds, zeroed) += p[l][j] * v[j / group][l] over unmasked l for heads [0, nq), p
   (length, 16): TILE positions at a time, and within them chunks of heads whose sums stay in registers. (The
   weights in fp32: the bf16 dot instruction on pairs of positions was no faster here.) */
static inline __attribute__((always_inline)) void weighted_values(float *acc, int64_t ds, const float *p, int64_t nq,
                                                                  int64_t nkv, int64_t group, const rows_t *c,
                                                                  int64_t vh_s, int64_t vl_s, const uint8_t *m,
                                                                  int64_t length, const int nv, const int kind) {
    const int hc = nv <= 2 ? 8 : nv <= 4 ? 4 : 2;  /* heads a chunk: at most 16 sums; hc divides 16 */
    for (int64_t t0 = 0; t0 < length; t0 += TILE) {
        int64_t t1 = t0 + TILE < length ? t0 + TILE : length;
        for (int64_t c0 = 0; c0 < nq; c0 += hc) {  /* a last chunk's extra heads (< 16) are computed, not kept */
            __m512 sum[16], vv[8];
            for (int j = 0; j < hc; j++)
                for (int i = 0; i < nv; i++) sum[j * nv + i] = _mm512_loadu_ps(acc + (c0 + j) * ds + 16 * i);
            for (int64_t l = t0; l < t1; l++) {
                if (!m[l]) continue;
                for (int j = 0; j < hc; j++) {
                    int64_t kh = (c0 + j) / group;
                    kh = kh < nkv ? kh : nkv - 1;
                    if (j == 0 || kh != (c0 + j - 1) / group) {
                        const char *row = value_at(c, l, vl_s) + kh * vh_s;
                        for (int at = 0; at < 32 * nv; at += 64) __builtin_prefetch(row + TILE * vl_s + at, 0, 1);
                        for (int i = 0; i < nv; i++) vv[i] = half16((const uint16_t *)row + 16 * i, kind);
                    }
                    __m512 pv = _mm512_set1_ps(p[16 * l + c0 + j]);
                    for (int i = 0; i < nv; i++) sum[j * nv + i] = _mm512_fmadd_ps(pv, vv[i], sum[j * nv + i]);
                }
            }
            for (int j = 0; j < hc; j++)
                for (int i = 0; i < nv; i++) _mm512_storeu_ps(acc + (c0 + j) * ds + 16 * i, sum[j * nv + i]);
        }
    }
}

/* A block of kv heads [0, nkv) and their query heads (group each; nq = nkv * group <= 16, head j on kv head
   j / group) of a position-major 16-bit cache, dim 16 * nv, in two passes. Keys: each position's scores for all
   the block's heads come out as one vector, lane j for head j (lane_sums16), so that the softmax's maximum,
   exponentials and sums run 16 heads at a time and `s` holds (length, 16). Values: TILE positions at a time
   (weighted_values). Key (kh, l) at key_at(c, l, l_s) + kh * kh_s, values alike. Outputs to acc, rows ds
   apart (room for 16).

   Rows are prefetched into L2, not L1: a position-major walk jumps to a new page at every position, where the
   hardware's prefetchers stop, and L1's few outstanding misses held it at 20 GB/s (2 cores) against 31-35 for
   the same bytes read in order. */
static inline __attribute__((always_inline)) void block_two_pass_nv(
        const float *qf, int64_t ds, const uint16_t *qb, int64_t qs, int64_t nkv, int64_t group, const rows_t *c,
        int64_t kh_s, int64_t l_s, int64_t vh_s, int64_t vl_s, const uint8_t *m, int64_t length, float scale,
        const float *sinks, float *s, float *acc, const int nv, const int kind) {
    int64_t nq = nkv * group;
    __m512 top = _mm512_set1_ps(-INFINITY), a[16];
    for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();  /* lanes of heads past nq: scores 0 */
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) continue;
        for (int64_t kh = 0; kh < nkv; kh++) {
            const uint16_t *key = (const uint16_t *)(key_at(c, l, l_s) + kh * kh_s);
            for (int64_t at = 0; at < 32 * nv; at += 64)  /* a run of a few KB a position: latency bounds it */
                __builtin_prefetch((const char *)key + PREFETCH_AHEAD * l_s + at, 0, 1);
            key_dots(a + kh * group, key, qf + kh * group * ds, ds, qb + kh * group * qs, qs, group, nv, kind);
        }
        __m512 sc = _mm512_mul_ps(lane_sums16(a), _mm512_set1_ps(scale));
        _mm512_storeu_ps(s + 16 * l, sc);
        top = _mm512_max_ps(top, sc);
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) continue;
        __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * l), top));
        _mm512_storeu_ps(s + 16 * l, p);
        total = _mm512_add_ps(total, p);
    }
    float totals[16], tops[16];
    _mm512_storeu_ps(totals, total), _mm512_storeu_ps(tops, top);
    for (int64_t j = 0; j < nq; j++)
        if (tops[j] != -INFINITY) totals[j] += sink_term(sinks, j, tops[j]);
    memset(acc, 0, 16 * ds * sizeof(float));
    weighted_values(acc, ds, s, nq, nkv, group, c, vh_s, vl_s, m, length, nv, kind);
    for (int64_t j = 0; j < nq; j++) {
        float inv = totals[j] > 0 ? 1.0f / totals[j] : 0.0f;  /* every position masked: zeros */
        for (int64_t d = 0; d < 16 * nv; d++) acc[j * ds + d] *= inv;
    }
}

void block_two_pass_half(const float *qf, int64_t ds, const uint16_t *qb, int64_t qs, int64_t nkv,
                                int64_t group, const rows_t *c, int64_t kh_s, int64_t l_s, int64_t vh_s, int64_t vl_s,
                                const uint8_t *m, int64_t length, float scale, const float *sinks, float *s,
                                float *acc, int64_t nv, int kind) {
    /* the head dim and the kind constants in each: the sums' indices known, so that they stay in registers */
    switch (nv * 4 + kind) {
#define CASE(n, k) \
    case n * 4 + k: \
        block_two_pass_nv(qf, ds, qb, qs, nkv, group, c, kh_s, l_s, vh_s, vl_s, m, length, scale, sinks, s, acc, n, \
                          k); \
        break;
        CASE(1, KIND_BF16) CASE(2, KIND_BF16) CASE(3, KIND_BF16) CASE(4, KIND_BF16)
        CASE(5, KIND_BF16) CASE(6, KIND_BF16) CASE(7, KIND_BF16) CASE(8, KIND_BF16)
        CASE(1, KIND_F16) CASE(2, KIND_F16) CASE(3, KIND_F16) CASE(4, KIND_F16)
        CASE(5, KIND_F16) CASE(6, KIND_F16) CASE(7, KIND_F16) CASE(8, KIND_F16)
#undef CASE
    }
}
#endif
