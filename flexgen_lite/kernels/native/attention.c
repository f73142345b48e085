/* Decode attention on the CPU: one new token's query per (sequence, head) over its cached keys and values.

   torch's scaled_dot_product_attention spends ~3 us per (sequence, head) here whatever the length, which at
   decode batches (tens of thousands of pairs, a few dozen positions each) reads the cache at a tenth of the
   memory's speed. This walks each pair's keys and values once, in fp32 (exact for bf16 and fp16 inputs),
   16 lanes at a time so that the compiler vectorizes it without reassociating. */

#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds here: no bit-identity to keep, unlike int4.c */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kinds.h"
#include "simd.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LANES 16
#define MAX_GROUP 64  /* query heads per kv head (the caller checks) */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4  /* positions ahead whose rows a position-major walk prefetches */
#endif

/* One sequence's cached keys and values: position l's rows at k + l * stride (v alike), except below `split`,
   where they are read from another sequence's rows, k0 + l * stride. That is a prompt prefix the block's rows
   share (engine/shared_prefix.py: computed once, stored alike in every row): its rows are then read once for
   the batch, from one row that stays in cache, not once per row from memory. */
typedef struct {
    const char *k, *v, *k0, *v0;
    int64_t split;
} rows_t;

static inline const char *key_at(const rows_t *r, int64_t l, int64_t stride) {
    return (l < r->split ? r->k0 : r->k) + l * stride;
}

static inline const char *value_at(const rows_t *r, int64_t l, int64_t stride) {
    return (l < r->split ? r->v0 : r->v) + l * stride;
}

/* r with each pointer `k_off`, `v_off` bytes on (a kv head's rows) */
static inline rows_t heads_of(rows_t r, int64_t k_off, int64_t v_off) {
    return (rows_t){r.k + k_off, r.v + v_off, r.k0 + k_off, r.v0 + v_off, r.split};
}

/* While a shared position l is read (from the source row, in cache), the row's own rows `split` positions on,
   `bytes` each, are fetched into L2: the own positions after a shared prefix are few, too short a walk for the
   hardware's prefetchers, and without this they were read at memory latency (measured at head dim 64: the
   shared step 1.2x faster with it; at 128, where the per-position loop runs, no gain showed). */
static inline void prefetch_own(const rows_t *r, int64_t l, int64_t length, int64_t ks, int64_t vs, int64_t bytes) {
    int64_t own = r->split + l;
    if (l >= r->split || own >= length) return;
    for (int64_t at = 0; at < bytes; at += 64) {
        __builtin_prefetch(r->k + own * ks + at, 0, 1);
        __builtin_prefetch(r->v + own * vs + at, 0, 1);
    }
}

#ifdef __AVX512F__
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 values of a 16-bit kind (bf16, fp16) as fp32: both exact */
static inline __m512 half16(const uint16_t *p, int kind) {
    return kind == KIND_F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : bf16x16(p);
}
#endif

/* n values of `kind` at `src` as fp32 into `dst`. */
static inline void load_row(const void *src, int kind, int64_t n, float *dst) {
    if (kind == KIND_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, half16((const uint16_t *)src + i, kind));
#endif
    for (; i < n; i++) dst[i] = kind_value(src, kind, i);
}

static inline void store_row(void *dst, int kind, int64_t n, const float *src) {
    if (kind == KIND_F32)
        memcpy(dst, src, n * sizeof(float));
    else
        for (int64_t i = 0; i < n; i++) kind_put(dst, kind, i, src[i]);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    for (; i < n; i++) acc[0] += a[i] * b[i];
    float s = 0;
    for (int j = 0; j < LANES; j++) s += acc[j];
    return s;
}

/* a . b for n values of a 16-bit kind (bf16, fp16) at b, converted as read */
static inline float dot_half(const float *a, const uint16_t *b, int64_t n, int kind) {
    int64_t i = 0;
    float s = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), half16(b + i, kind), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) s += a[i] * kind_value(b, kind, i);
    return s;
}

/* acc += p * b (n values of a 16-bit kind) */
static inline void axpy_half(float *acc, float p, const uint16_t *b, int64_t n, int kind) {
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, half16(b + i, kind), _mm512_loadu_ps(acc + i)));
#endif
    for (; i < n; i++) acc[i] += p * kind_value(b, kind, i);
}

/* A sink logit's term of head j's softmax denominator (gpt-oss: each head's learned logit, whose value is
   dropped), relative to the head's maximum score `top`; 0 without sinks. */
static inline float sink_term(const float *sinks, int64_t j, float top) {
    return sinks ? expf(sinks[j] - top) : 0.0f;
}

/* exp(s[l] - top) into s[l] for unmasked positions, 0 for masked ones; their sum. With AVX-512 16 at a time
   (exp16), else expf: a scalar expf per position was a third of a short-context decode step's attention. */
static inline float softmax_weights(float *s, const uint8_t *m, int64_t length, float top) {
    float total = 0;
    int64_t l = 0;
#ifdef __AVX512F__
    __m512 sum = _mm512_setzero_ps(), t = _mm512_set1_ps(top);
    for (; l + 16 <= length; l += 16) {
        __mmask16 keep = _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(m + l))),
                                                _mm512_set1_epi32(0xFF));
        __m512 p = _mm512_maskz_mov_ps(keep, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + l), t)));
        _mm512_storeu_ps(s + l, p);
        sum = _mm512_add_ps(sum, p);
    }
    total = _mm512_reduce_add_ps(sum);
#elif defined(SIMD_AVX2)
    __m256 sum = _mm256_setzero_ps(), t = _mm256_set1_ps(top);
    for (; l + 8 <= length; l += 8) {
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(m + l)));
        __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256()));
        __m256 p = _mm256_and_ps(keep, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + l), t)));
        _mm256_storeu_ps(s + l, p);
        sum = _mm256_add_ps(sum, p);
    }
    total = hsum8(sum);
#endif
    for (; l < length; l++) {
        s[l] = m[l] ? expf(s[l] - top) : 0.0f;
        total += s[l];
    }
    return total;
}

#ifdef __AVX512F__
/* acc (16 * nv floats) = sum over unmasked l of p[l] * v[l] for rows of a 16-bit kind `stride` bytes apart; nv a
   constant at each call (4 or 8), so that the sums stay in registers. */
static inline void weighted_rows_half(float *acc, const float *p, const uint8_t *m, const rows_t *c, int64_t length,
                                      int64_t stride, const int nv, int kind) {
    __m512 sum[8];
    for (int i = 0; i < nv; i++) sum[i] = _mm512_setzero_ps();
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) continue;
        const uint16_t *value = (const uint16_t *)value_at(c, l, stride);
        __m512 pv = _mm512_set1_ps(p[l]);
        for (int i = 0; i < nv; i++) sum[i] = _mm512_fmadd_ps(pv, half16(value + 16 * i, kind), sum[i]);
    }
    for (int i = 0; i < nv; i++) _mm512_storeu_ps(acc + 16 * i, sum[i]);
}
#endif

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
static void group_two_pass_half(const float *qf, int64_t ds, const uint16_t *qb, int64_t qs, int64_t g,
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

static void block_two_pass_half(const float *qf, int64_t ds, const uint16_t *qb, int64_t qs, int64_t nkv,
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
static void group_two_pass_f32(const float *qf, int64_t ds, int64_t g, const rows_t *c, const uint8_t *m,
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

/* One (sequence, query head) of a head-major cache: keys first (the values prefetched meanwhile, so that the
   second pass finds them in L2), then values. `s` holds `length` floats. */
static void pair_two_pass(const float *qf, const rows_t *c, const uint8_t *m, int kind, int64_t item,
                          int64_t length, int64_t dim, int64_t ks, int64_t vs, float scale, const float *sink,
                          float *s, float *row, float *acc) {
    float top = -INFINITY;
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) {
            s[l] = -INFINITY;
            continue;
        }
        const char *key = key_at(c, l, ks * item), *value = value_at(c, l, vs * item);
        for (int64_t at = 0; at < dim * item; at += 64) {  /* latency, not bandwidth, bounds a lone walk */
            __builtin_prefetch(key + 4 * ks * item + at, 0, 1);
            __builtin_prefetch(value + at, 0, 1);
        }
        if (kind != KIND_F32) {
            s[l] = dot_half(qf, (const uint16_t *)key, dim, kind) * scale;
        } else {
            load_row(key, kind, dim, row);
            s[l] = dot(qf, row, dim) * scale;
        }
        top = s[l] > top ? s[l] : top;
    }
    memset(acc, 0, dim * sizeof(float));
    if (top == -INFINITY) return;  /* every position masked: zeros */
    float total = softmax_weights(s, m, length, top) + sink_term(sink, 0, top);
#ifdef __AVX512F__
    if (kind != KIND_F32 && (dim == 64 || dim == 128)) {  /* the sums held in registers across positions */
        if (dim == 64)
            weighted_rows_half(acc, s, m, c, length, vs * item, 4, kind);
        else
            weighted_rows_half(acc, s, m, c, length, vs * item, 8, kind);
        for (int64_t d = 0; d < dim; d++) acc[d] /= total;
        return;
    }
#endif
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) continue;
        float p = s[l];
        const char *value = value_at(c, l, vs * item);
        if (kind != KIND_F32) {
            axpy_half(acc, p, (const uint16_t *)value, dim, kind);
        } else {
            load_row(value, kind, dim, row);
            for (int64_t d = 0; d < dim; d++) acc[d] += p * row[d];
        }
    }
    for (int64_t d = 0; d < dim; d++) acc[d] /= total;
}

/* out[b, h] = softmax(scale * q[b, h] . k[b, h / group, l] over unmasked l < length) . v[b, h / group, l].
   Strides in elements; each row of `dim` values is contiguous; mask (b, l) is one byte per position, 0 =
   masked. A row with every position masked gets zeros.

   Work items [begin, end) of batch * ceil(kv_heads / block): one sequence's `block` consecutive kv heads and
   all their query heads, each key and value row read once for the group. Each position's rows of the block
   are read together: in the position-major cache across a link (l, b, kv_head, d) they are one contiguous
   run, where one head at a time strides a page or more per position (the caller picks block 1 for
   head-major caches, whose heads are apart anyway). `decode_attention_team` runs the items on torch's OpenMP
   pool; where that pool is not shared, the caller hands out ranges itself (native/__init__.py).

   source (or NULL): per sequence b, the sequence whose rows hold b's positions below `shared`, at `shift[b]`
   positions earlier (rows_t). The result is the same bits: only where the rows are read from changes.

   row_map (or NULL): sequence b of q, mask and out is the cache's row row_map[b] (the rows of a batch still
   generating; source and shift are indexed by cache rows).

   sinks (or NULL): each query head's sink logit (fp32, gpt-oss), a term of its softmax's denominator alone. */
void decode_attention(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int kind,
                      int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,
                      const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                      int64_t mask_stride, const int64_t *out_strides, float scale, int64_t block,
                      const int64_t *source, const int64_t *shift, int64_t shared, const int64_t *row_map,
                      const float *sinks, int64_t begin, int64_t end) {
    int64_t item = kind == KIND_F32 ? 4 : 2, group = heads / kv_heads;
    int64_t blocks = (kv_heads + block - 1) / block, max_q = block * group;
    /* rows at 64-byte boundaries: AVX-512 loads and stores that split cache lines cost twice */
    int64_t ds = (dim + 15) / 16 * 16, mq = (max_q + 15) / 16 * 16;
    int64_t sl = (length + 15) / 16 * 16;  /* a head's scores (head-major: each of the group's heads its own) */
    int two_pass = kind != KIND_F32 && block > 1 && dim % 16 == 0 && dim <= 128 && max_q <= 16;
    int64_t floats = 2 * mq * ds + 2 * mq + ds + (block == 1 ? group : two_pass ? 16 : 0) * sl;  /* 64-byte mult. */
    float *qf = aligned_alloc(64, sizeof(float) * floats);
    if (!qf) return;
    float *acc = qf + mq * ds, *top = acc + mq * ds, *total = top + mq, *row = total + mq, *scores = row + ds;
    int direct = kind != KIND_F32 && group == 1;  /* 16-bit rows multiplied as read, not converted first */
    for (int64_t it = begin; it < end; it++) {
        int64_t b = it / blocks, kh0 = (it % blocks) * block, kh1 = kh0 + block < kv_heads ? kh0 + block : kv_heads;
        int64_t nq = (kh1 - kh0) * group, h0 = kh0 * group;
        for (int64_t j = 0; j < nq; j++) {
            load_row((const char *)q + (b * q_strides[0] + (h0 + j) * q_strides[1]) * item, kind, dim, qf + j * ds);
            top[j] = -INFINITY;
            total[j] = 0;
        }
        int64_t cb = row_map ? row_map[b] : b;  /* b's row of the cache */
        const char *kb = (const char *)k + cb * k_strides[0] * item, *vb = (const char *)v + cb * v_strides[0] * item;
        rows_t c = {kb, vb, kb, vb, 0};
        if (source && source[cb] != cb) {  /* positions below `shared`: the source row's, `shift` earlier there */
            c.k0 = (const char *)k + (source[cb] * k_strides[0] - shift[cb] * k_strides[2]) * item;
            c.v0 = (const char *)v + (source[cb] * v_strides[0] - shift[cb] * v_strides[2]) * item;
            c.split = shared;
        }
        rows_t ch = heads_of(c, kh0 * k_strides[1] * item, kh0 * v_strides[1] * item);
        const uint8_t *m = mask + b * mask_stride;
#ifdef __AVX512F__
        if (block == 1 && kind != KIND_F32 && group > 1 && (dim == 64 || dim == 128)) {
            const uint16_t *qb = (const uint16_t *)q + b * q_strides[0] + h0 * q_strides[1];
            group_two_pass_half(qf, ds, qb, q_strides[1], nq, &ch, m, length, k_strides[2] * item, v_strides[2] * item,
                                scale, sinks ? sinks + h0 : NULL, scores, sl, acc, dim / 16, kind);
            for (int64_t j = 0; j < nq; j++)
                store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim,
                          acc + j * ds);
            continue;
        }
#endif
#ifdef __AVX512F__
        if (two_pass) {
            const uint16_t *qb = (const uint16_t *)q + b * q_strides[0] + h0 * q_strides[1];
            block_two_pass_half(qf, ds, qb, q_strides[1], kh1 - kh0, group, &ch, k_strides[1] * item, k_strides[2] * item,
                                v_strides[1] * item, v_strides[2] * item, m, length, scale, sinks ? sinks + h0 : NULL,
                                scores, acc, dim / 16, kind);
            for (int64_t j = 0; j < nq; j++)
                store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim,
                          acc + j * ds);
            continue;
        }
#endif
#ifdef SIMD_LANES8  /* AVX-512 CPUs too: 2.2-2.6x their head-at-a-time walk (SmolLM2's 9 / 3 heads of 64) */
        if (block == 1 && kind == KIND_F32 && group > 1 && dim % 8 == 0) {
            group_two_pass_f32(qf, ds, nq, &ch, m, length, k_strides[2] * item, v_strides[2] * item, scale,
                               sinks ? sinks + h0 : NULL, scores, sl, acc, dim);
            for (int64_t j = 0; j < nq; j++)
                store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim,
                          acc + j * ds);
            continue;
        }
#endif
        if (block == 1) {
            for (int64_t j = 0; j < nq; j++) {
                pair_two_pass(qf + j * ds, &ch, m, kind, item, length, dim, k_strides[2], v_strides[2], scale,
                              sinks ? sinks + h0 + j : NULL, scores, row, acc);
                store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim, acc);
            }
            continue;
        }
        memset(acc, 0, nq * ds * sizeof(float));
        /* position-major: one pass, keys and values of a position together (online softmax: the running sums
           are rescaled when a larger score comes) */
        for (int64_t l = 0; l < length; l++) {
            if (!m[l]) continue;
            for (int64_t kh = kh0; kh < kh1; kh++) {
                const char *key = key_at(&c, l, k_strides[2] * item) + kh * k_strides[1] * item;
                const char *value = value_at(&c, l, v_strides[2] * item) + kh * v_strides[1] * item;
                for (int64_t at = 0; at < dim * item; at += 64) {  /* latency, not bandwidth, bounds a lone walk */
                    __builtin_prefetch(key + 4 * k_strides[2] * item + at, 0, 1);
                    __builtin_prefetch(value + 4 * v_strides[2] * item + at, 0, 1);
                }
                float sc[MAX_GROUP], *a0 = acc + (kh - kh0) * group * ds;
                int64_t j0 = (kh - kh0) * group;
                if (direct) {
                    sc[0] = dot_half(qf + j0 * ds, (const uint16_t *)key, dim, kind) * scale;
                } else {
                    load_row(key, kind, dim, row);
                    for (int64_t g = 0; g < group; g++) sc[g] = dot(qf + (j0 + g) * ds, row, dim) * scale;
                }
                for (int64_t g = 0; g < group; g++) {
                    int64_t j = j0 + g;
                    if (sc[g] > top[j]) {
                        float shrink = expf(top[j] - sc[g]);  /* 0 for the first position */
                        for (int64_t d = 0; d < dim; d++) a0[g * ds + d] *= shrink;
                        total[j] *= shrink;
                        top[j] = sc[g];
                    }
                    sc[g] = expf(sc[g] - top[j]);
                    total[j] += sc[g];
                }
                if (direct) {
                    axpy_half(a0, sc[0], (const uint16_t *)value, dim, kind);
                } else {
                    load_row(value, kind, dim, row);
                    for (int64_t g = 0; g < group; g++)
                        for (int64_t d = 0; d < dim; d++) a0[g * ds + d] += sc[g] * row[d];
                }
            }
        }
        for (int64_t j = 0; j < nq; j++) {
            if (total[j] > 0) total[j] += sink_term(sinks, h0 + j, top[j]);
            if (total[j] > 0)  /* else every position masked: zeros */
                for (int64_t d = 0; d < dim; d++) acc[j * ds + d] /= total[j];
            store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim, acc + j * ds);
        }
    }
    free(qf);
}

/* decode_attention over all `items`, in about 4 ranges a thread, on `threads` OpenMP threads (gemv.c's note). */
void decode_attention_team(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int kind,
                           int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,
                           const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                           int64_t mask_stride, const int64_t *out_strides, float scale, int64_t block,
                           const int64_t *source, const int64_t *shift, int64_t shared, const int64_t *row_map,
                           const float *sinks, int64_t items, int threads) {
    int64_t step = (items + 4 * threads - 1) / (4 * threads), ranges = (items + step - 1) / step;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && ranges > 1)
    for (int64_t r = 0; r < ranges; r++)
        decode_attention(q, k, v, mask, out, kind, batch, heads, kv_heads, length, dim, q_strides, k_strides,
                         v_strides, mask_stride, out_strides, scale, block, source, shift, shared, row_map, sinks,
                         r * step,
                         (r + 1) * step < items ? (r + 1) * step : items);
}
