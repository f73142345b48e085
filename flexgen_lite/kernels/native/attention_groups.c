/* Decode attention's grouped query heads (grouped-query attention) over a head-major cache: each key and value
   row of a kv head read once for all the query heads sharing it, in 16-bit kinds with AVX-512 (the bf16 dot
   instruction where the CPU has it) and in fp32 with 8 lanes (any AVX2 CPU). Called by attention.c. */

#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds here: no bit-identity to keep, unlike int4.c */
#include "attention_rows.h"

#ifdef __AVX512F__
#ifdef __AVX512BF16__
/* acc[j] (128 floats, rows ds apart) = sum over unmasked l of p[j][l] * v[l] / total[j] for heads j < nj (at most
   2: 16 accumulators), bf16 value rows vs bytes apart. Two positions at a time: their rows interleaved into bf16
   pairs, times the pair of weights rounded to bf16 (as torch's bf16 attention rounds them), summed in fp32 by
   the dot instruction. The sums come out with each 128-bit lane's 8 dimensions as (0 1 2 3 | 4 5 6 7) of the
   two unpacks: put back in order at the end. */
static void weighted_pairs_bf16(float *acc, int64_t ds, const float *p, int64_t sl, const float *total, int64_t nj,
                                const uint8_t *m, const rows_t *c, int64_t length, int64_t vs) {
    __m512 sum[2][8];
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < 8; i++) sum[j][i] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t l = 0; l < length; l += 2) {
        int a = m[l], b = l + 1 < length && m[l + 1];
        if (!a && !b) continue;
        const uint16_t *v0 = (const uint16_t *)value_at(c, l, vs), *v1 = (const uint16_t *)value_at(c, l + 1, vs);
        __m512i lo[4], hi[4];
        for (int i = 0; i < 4; i++) {
            __m512i r0 = a ? _mm512_loadu_si512(v0 + 32 * i) : zero, r1 = b ? _mm512_loadu_si512(v1 + 32 * i) : zero;
            lo[i] = _mm512_unpacklo_epi16(r0, r1);
            hi[i] = _mm512_unpackhi_epi16(r0, r1);
        }
        for (int64_t j = 0; j < nj; j++) {
            const float *pj = p + j * sl + l;
            uint32_t pair = bf16_bits(a ? pj[0] : 0.0f) | (uint32_t)bf16_bits(b ? pj[1] : 0.0f) << 16;
            __m512bh pp = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int i = 0; i < 4; i++) {
                sum[j][2 * i] = _mm512_dpbf16_ps(sum[j][2 * i], (__m512bh)lo[i], pp);
                sum[j][2 * i + 1] = _mm512_dpbf16_ps(sum[j][2 * i + 1], (__m512bh)hi[i], pp);
            }
        }
    }
    for (int64_t j = 0; j < nj; j++) {
        if (total[j] <= 0) continue;  /* every position masked: zeros */
        float inv = 1.0f / total[j], lanes[2][16], *out = acc + j * ds;
        for (int i = 0; i < 4; i++) {
            _mm512_storeu_ps(lanes[0], sum[j][2 * i]);
            _mm512_storeu_ps(lanes[1], sum[j][2 * i + 1]);
            for (int d = 0; d < 32; d++) out[32 * i + d] = lanes[(d % 8) / 4][(d / 8) * 4 + d % 4] * inv;
        }
    }
}
#endif

/* acc[j] (rows ds apart) = sum over unmasked l of p[j][l] * v[l] / total[j] for heads j < nj, value rows of a 16-bit
   kind of 16 * nv, vs bytes apart: nv, nj and kind constants at each call, so that the nj * nv sums stay in
   registers. */
static inline __attribute__((always_inline)) void weighted_group(float *acc, int64_t ds, const float *p, int64_t sl,
                                                                 const float *total, const uint8_t *m, const rows_t *c,
                                                                 int64_t length, int64_t vs, const int nv,
                                                                 const int nj, const int kind) {
    __m512 sum[16];
    for (int i = 0; i < nj * nv; i++) sum[i] = _mm512_setzero_ps();
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) continue;
        const uint16_t *value = (const uint16_t *)value_at(c, l, vs);
        __m512 vv[8];
        for (int i = 0; i < nv; i++) vv[i] = half16(value + 16 * i, kind);
        for (int j = 0; j < nj; j++) {
            __m512 pj = _mm512_set1_ps(p[j * sl + l]);
            for (int i = 0; i < nv; i++) sum[j * nv + i] = _mm512_fmadd_ps(pj, vv[i], sum[j * nv + i]);
        }
    }
    for (int j = 0; j < nj; j++) {
        if (total[j] <= 0) continue;  /* every position masked: zeros */
        __m512 inv = _mm512_set1_ps(1.0f / total[j]);
        for (int i = 0; i < nv; i++) _mm512_storeu_ps(acc + j * ds + 16 * i, _mm512_mul_ps(sum[j * nv + i], inv));
    }
}

/* a[j * step] (lanes to be summed) = q_j . key for the g query heads of a kv head, dim 16 * nv: a bf16 key and query
   as they are (qb, rows qs apart) by the bf16 dot instruction, else from the query in fp32 (qf, rows ds apart) with
   the key (of `kind`, a constant) converted once for all of them. */
static inline __attribute__((always_inline)) void group_dots(__m512 *a, const int step, const uint16_t *key,
                                                             const float *qf, int64_t ds, const uint16_t *qb,
                                                             int64_t qs, int64_t g, const int nv, const int kind) {
#ifdef __AVX512BF16__
    if (kind == KIND_BF16) {
    __m512bh kp[4];
    for (int k = 0; k < nv / 2; k++) kp[k] = (__m512bh)_mm512_loadu_si512(key + 32 * k);
    for (int64_t j = 0; j < g; j++) {
        const uint16_t *qj = qb + j * qs;
        __m512 a0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), kp[0], (__m512bh)_mm512_loadu_si512(qj));
        __m512 a1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), kp[1], (__m512bh)_mm512_loadu_si512(qj + 32));
        if (nv == 8) {
            a0 = _mm512_dpbf16_ps(a0, kp[2], (__m512bh)_mm512_loadu_si512(qj + 64));
            a1 = _mm512_dpbf16_ps(a1, kp[3], (__m512bh)_mm512_loadu_si512(qj + 96));
        }
        a[j * step] = _mm512_add_ps(a0, a1);
    }
    return;
    }
#endif
    (void)qb, (void)qs;
    __m512 kv[8];
    for (int k = 0; k < nv; k++) kv[k] = half16(key + 16 * k, kind);
    for (int64_t j = 0; j < g; j++) {
        const float *qj = qf + j * ds;
        __m512 a0 = _mm512_mul_ps(kv[0], _mm512_loadu_ps(qj)), a1 = _mm512_mul_ps(kv[1], _mm512_loadu_ps(qj + 16));
        for (int k = 2; k < nv; k += 2) {
            a0 = _mm512_fmadd_ps(kv[k], _mm512_loadu_ps(qj + 16 * k), a0);
            a1 = _mm512_fmadd_ps(kv[k + 1], _mm512_loadu_ps(qj + 16 * k + 16), a1);
        }
        a[j * step] = _mm512_add_ps(a0, a1);
    }
}

/* Scores s[j * sl + l] (-inf where masked) and their maximum top[j] of the g heads, 16 positions at a time: each
   head's 16 dot products summed across lanes together (lane_sums16), not by a horizontal sum apiece. Measured
   (Zen 4): a third faster at head dim 64; at 128, where the reads bound the pass, 5% slower: not used there. */
static inline __attribute__((always_inline)) void group_scores_tiled(const float *qf, int64_t ds, const uint16_t *qb,
                                                                     int64_t qs, int64_t g, const rows_t *c,
                                                                     const uint8_t *m, int64_t length, int64_t ks,
                                                                     int64_t vs, float scale, float *s, int64_t sl,
                                                                     float *top, const int nv, const int kind) {
    __m512 lanes[MAX_GROUP][16], tops[MAX_GROUP];
    for (int64_t j = 0; j < g; j++) tops[j] = _mm512_set1_ps(-INFINITY);
    for (int64_t l0 = 0; l0 < length; l0 += 16) {
        int64_t n = length - l0 < 16 ? length - l0 : 16;
        __mmask16 seen = 0;
        for (int64_t i = 0; i < 16; i++) {
            if (i >= n || !m[l0 + i]) {
                for (int64_t j = 0; j < g; j++) lanes[j][i] = _mm512_setzero_ps();
                continue;
            }
            seen |= (__mmask16)(1u << i);
            const uint16_t *key = (const uint16_t *)key_at(c, l0 + i, ks);
            __builtin_prefetch((const char *)key + 4 * ks, 0, 1);
            __builtin_prefetch((const char *)key + 4 * ks + 64 * (nv / 2), 0, 1);
            prefetch_own(c, l0 + i, length, ks, vs, 32 * nv);
            group_dots(&lanes[0][i], 16, key, qf, ds, qb, qs, g, nv, kind);
        }
        for (int64_t j = 0; j < g; j++) {
            __m512 sc = _mm512_mask_blend_ps(seen, _mm512_set1_ps(-INFINITY),
                                             _mm512_mul_ps(lane_sums16(lanes[j]), _mm512_set1_ps(scale)));
            _mm512_storeu_ps(s + j * sl + l0, sc);  /* sl: a multiple of 16 */
            tops[j] = _mm512_max_ps(tops[j], sc);
        }
    }
    for (int64_t j = 0; j < g; j++) top[j] = _mm512_reduce_max_ps(tops[j]);
}

/* The query heads [0, g) sharing one kv head of a head-major 16-bit cache (grouped-query attention), dim 16 * nv
   (64 or 128): each key and value row is read and converted to fp32 once for all of them (one head at a time, a
   grouped shape ran at half the bytes per second of an ungrouped one: the conversions and each head's one chain
   of multiply-adds bound it). Scores of head j go to s + j * sl; its output to acc + j * ds. */
static inline __attribute__((always_inline)) void group_two_pass_nv(
        const float *qf, int64_t ds, const uint16_t *qb, int64_t qs, int64_t g, const rows_t *c, const uint8_t *m,
        int64_t length, int64_t ks, int64_t vs, float scale, const float *sinks, float *s, int64_t sl, float *acc,
        const int nv, const int kind) {
    float top[MAX_GROUP];
    if (nv == 4) {
        group_scores_tiled(qf, ds, qb, qs, g, c, m, length, ks, vs, scale, s, sl, top, nv, kind);
    } else {
        for (int64_t j = 0; j < g; j++) top[j] = -INFINITY;
        for (int64_t l = 0; l < length; l++) {
            if (!m[l]) {
                for (int64_t j = 0; j < g; j++) s[j * sl + l] = -INFINITY;
                continue;
            }
            const uint16_t *key = (const uint16_t *)key_at(c, l, ks);
            __builtin_prefetch((const char *)key + 4 * ks, 0, 1);
            __builtin_prefetch((const char *)key + 4 * ks + 64 * (nv / 2), 0, 1);
            __m512 a[MAX_GROUP];
            group_dots(a, 1, key, qf, ds, qb, qs, g, nv, kind);
            for (int64_t j = 0; j < g; j++) {
                float sc = _mm512_reduce_add_ps(a[j]) * scale;
                s[j * sl + l] = sc;
                top[j] = sc > top[j] ? sc : top[j];
            }
        }
    }
    float total[MAX_GROUP];
    for (int64_t j = 0; j < g; j++) {
        memset(acc + j * ds, 0, ds * sizeof(float));
        if (top[j] == -INFINITY)
            total[j] = 0;
        else
            total[j] = softmax_weights(s + j * sl, m, length, top[j]) + sink_term(sinks, j, top[j]);
    }
    const int chunk = nv == 4 ? 4 : 2;  /* heads whose sums stay in registers at once: 16 accumulators */
    for (int64_t j0 = 0; j0 < g; j0 += chunk) {
        int64_t nj = g - j0 < chunk ? g - j0 : chunk;
#ifdef __AVX512BF16__
        if (nv == 8 && kind == KIND_BF16) {  /* head dim 128: values by pairs of positions (15% faster; not at 64) */
            weighted_pairs_bf16(acc + j0 * ds, ds, s + j0 * sl, sl, total + j0, nj, m, c, length, vs);
            continue;
        }
#endif
        switch (nv * 8 + nj) {  /* both constants in each: the sums stay in registers */
#define CASE(v, h) \
    case v * 8 + h: \
        weighted_group(acc + j0 * ds, ds, s + j0 * sl, sl, total + j0, m, c, length, vs, v, h, kind); \
        break;
            CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4) CASE(8, 1) CASE(8, 2)
#undef CASE
        }
    }
}

/* group_two_pass_nv with the head dim and the kind (bf16, fp16) constants (the sums held in registers) */
void group_two_pass_half(const float *qf, int64_t ds, const uint16_t *qb, int64_t qs, int64_t g,
                                const rows_t *c, const uint8_t *m, int64_t length, int64_t ks, int64_t vs,
                                float scale, const float *sinks, float *s, int64_t sl, float *acc, int64_t nv,
                                int kind) {
    if (kind == KIND_F16 && nv == 4)
        group_two_pass_nv(qf, ds, qb, qs, g, c, m, length, ks, vs, scale, sinks, s, sl, acc, 4, KIND_F16);
    else if (kind == KIND_F16)
        group_two_pass_nv(qf, ds, qb, qs, g, c, m, length, ks, vs, scale, sinks, s, sl, acc, 8, KIND_F16);
    else if (nv == 4)
        group_two_pass_nv(qf, ds, qb, qs, g, c, m, length, ks, vs, scale, sinks, s, sl, acc, 4, KIND_BF16);
    else
        group_two_pass_nv(qf, ds, qb, qs, g, c, m, length, ks, vs, scale, sinks, s, sl, acc, 8, KIND_BF16);
}
#endif

#ifdef SIMD_LANES8
/* acc[j] (rows ds apart) += dims [d0, d0 + 16) (or 8, `two` 0) of sum over unmasked l of p[j][l] * v[l] / total[j]
   for NJ heads: each position's 16 values loaded once for all of them, 2 x NJ sums in registers. */
static inline __attribute__((always_inline)) void weighted_f32(float *acc, int64_t ds, const float *p, int64_t sl,
                                                               const float *total, const uint8_t *m, const rows_t *c,
                                                               int64_t length, int64_t vs, int64_t d0, int two,
                                                               const int NJ) {
    __m256 sum[6][2];
    for (int j = 0; j < NJ; j++) sum[j][0] = sum[j][1] = _mm256_setzero_ps();
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) continue;
        const float *value = (const float *)value_at(c, l, vs) + d0;
        __m256 v0 = _mm256_loadu_ps(value), v1 = two ? _mm256_loadu_ps(value + 8) : _mm256_setzero_ps();
        for (int j = 0; j < NJ; j++) {
            __m256 pj = _mm256_set1_ps(p[j * sl + l]);
            sum[j][0] = _mm256_fmadd_ps(pj, v0, sum[j][0]);
            sum[j][1] = _mm256_fmadd_ps(pj, v1, sum[j][1]);
        }
    }
    for (int j = 0; j < NJ; j++) {
        if (total[j] <= 0) continue;  /* every position masked: zeros */
        __m256 inv = _mm256_set1_ps(1.0f / total[j]);
        _mm256_storeu_ps(acc + j * ds + d0, _mm256_mul_ps(sum[j][0], inv));
        if (two) _mm256_storeu_ps(acc + j * ds + d0 + 8, _mm256_mul_ps(sum[j][1], inv));
    }
}

/* The g query heads sharing one kv head of a head-major fp32 cache (g 1 where none share), dim a multiple of 8,
   in 8 lanes: scores of each key row for every head (the row from L1 after the first), the softmax 8 positions
   at a time, then the values 16 dims a pass for up to 6 heads, each value row read once for them. Scores of head j
   go to s + j * sl; its output to acc + j * ds. */
void group_two_pass_f32(const float *qf, int64_t ds, int64_t g, const rows_t *c, const uint8_t *m,
                               int64_t length, int64_t ks, int64_t vs, float scale, const float *sinks, float *s,
                               int64_t sl, float *acc, int64_t dim) {
    float top[MAX_GROUP], total[MAX_GROUP];
    for (int64_t j = 0; j < g; j++) top[j] = -INFINITY;
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) {
            for (int64_t j = 0; j < g; j++) s[j * sl + l] = -INFINITY;
            continue;
        }
        const float *key = (const float *)key_at(c, l, ks);
        for (int64_t at = 0; at < dim * 4; at += 64) __builtin_prefetch((const char *)key + 4 * ks + at, 0, 1);
        for (int64_t j = 0; j < g; j++) {
            float sc = dot8(qf + j * ds, key, dim) * scale;
            s[j * sl + l] = sc;
            top[j] = sc > top[j] ? sc : top[j];
        }
    }
    for (int64_t j = 0; j < g; j++) {
        memset(acc + j * ds, 0, ds * sizeof(float));
        total[j] = top[j] == -INFINITY ? 0 : softmax_weights(s + j * sl, m, length, top[j]) + sink_term(sinks, j, top[j]);
    }
    for (int64_t j0 = 0; j0 < g; j0 += 6)
        for (int64_t d0 = 0; d0 < dim; d0 += 16) {
            float *a = acc + j0 * ds;
            const float *p = s + j0 * sl, *t = total + j0;
            int two = d0 + 16 <= dim;
            switch (g - j0 < 6 ? g - j0 : 6) {  /* each count of heads its own loop: the sums stay in registers */
                case 1: weighted_f32(a, ds, p, sl, t, m, c, length, vs, d0, two, 1); break;
                case 2: weighted_f32(a, ds, p, sl, t, m, c, length, vs, d0, two, 2); break;
                case 3: weighted_f32(a, ds, p, sl, t, m, c, length, vs, d0, two, 3); break;
                case 4: weighted_f32(a, ds, p, sl, t, m, c, length, vs, d0, two, 4); break;
                case 5: weighted_f32(a, ds, p, sl, t, m, c, length, vs, d0, two, 5); break;
                default: weighted_f32(a, ds, p, sl, t, m, c, length, vs, d0, two, 6); break;
            }
        }
}
#endif
