/* Prefill attention on a CPU with AVX-512 (and for bf16 its dot instruction, AVX512-BF16): softmax(q k^T * scale) v
   for every query position of q, k, v, each query row seeing one interval of keys [lo, hi] (causal, left padding
   hidden, a padding row seeing itself: the engine's masks).

   torch's CPU flash attention ran at 60-120 GFLOP/s here where its matmuls run at 420: its key blocks (512)
   outgrow short prompts, so causal blocks are not skipped, and a head dim of 64 feeds its GEMMs thin slices.
   Here each (sequence, head) is walked 16 query rows at a time with the rows in the vector lanes:
   - scores of key j for the 16 rows: the rows' bf16 pairs (transposed once per block of rows) times key j's
     pair broadcast, so no horizontal sums; the softmax's maximum, exponentials and sums are lane-wise;
   - values: the rows' weights for keys (j, j + 1) rounded to bf16 pairs (as torch's bf16 attention rounds
     them) times values (j, j + 1) interleaved into pairs once per (sequence, head);
   - key blocks past every row's interval are never read (causal: half the work).
   Sums in fp32 (flash attention's online softmax over key blocks of 16), one rounding to bf16 at the end.
   fp32 q, k, v (a CPU without bf16 instructions computes in fp32) take the same walk with fused multiply-adds of
   broadcast key and value elements, needing AVX-512 only, or on AVX2 CPUs 8 rows in the lanes and keys 8 a block. */

#pragma GCC optimize("fp-contract=fast")
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kinds.h"
#include "simd.h"

#ifdef __AVX512F__
#define ROWS 16  /* query rows per block: the vector lanes */
#define KEYS 16  /* keys per block */
#else
#define ROWS 8  /* AVX2 (simd.h's SIMD_AVX2: fp32 only): 8 lanes, and 8 keys a block so that the scores and the */
#define KEYS 8  /* output sums stay in 16 registers */
#endif

/* Each row's 1 / (sum of its weights), from the block walk's maximum (tops) and total (weights relative to it);
   with a sink logit (gpt-oss: a head's extra term in the softmax's denominator, whose value is dropped), 1 /
   (total + exp(sink - top)). A row that saw no key: zeros. */
static inline void normalisers(float *inv, const float *tops, const float *sums, const float *sink) {
    for (int64_t i = 0; i < ROWS; i++) {
        float denominator = sums[i] + (sink ? expf(*sink - tops[i]) : 0.0f);  /* top -inf: inf, weights 0 */
        inv[i] = denominator > 0 ? 1.0f / denominator : 0.0f;
    }
}

/* Each row's first and last visible key over rows [i0, i0 + rows) (*first > *last: none), and the rows'
   intervals into lo_l, hi_l (rows past the block's: an empty interval). */
static inline void row_intervals(const int32_t *lo, const int32_t *hi, int64_t i0, int64_t rows, int32_t *first,
                                 int32_t *last, int32_t *lo_l, int32_t *hi_l) {
    *first = INT32_MAX, *last = -1;
    for (int64_t i = 0; i < ROWS; i++) {
        lo_l[i] = i < rows ? lo[i0 + i] : 1, hi_l[i] = i < rows ? hi[i0 + i] : 0;
        if (i < rows) {
            *first = lo_l[i] < *first ? lo_l[i] : *first;
            *last = hi_l[i] > *last ? hi_l[i] : *last;
        }
    }
}

#if defined(__AVX512F__)
/* A block of KEYS scores s[j] (16 rows each, unscaled) -> their softmax weights in place (0 where row i does not
   see key j0 + j, i.e. outside [lo_i, hi_i]), flash attention's online update: `top` (each row's maximum so
   far) and `total` (its sum of weights) carried over, scaled to the new maximum; returns that rescale, which
   the row's output sums take too. */
static inline __m512 block_weights(__m512 *s, __m512i lov, __m512i hiv, int64_t j0, __m512 sv, __m512 *top,
                                   __m512 *total) {
    __m512 block_top = *top;
    __mmask16 seen[KEYS];
    for (int j = 0; j < KEYS; j++) {
        __m512i jv = _mm512_set1_epi32((int)(j0 + j));
        seen[j] = _mm512_cmple_epi32_mask(lov, jv) & _mm512_cmple_epi32_mask(jv, hiv);
        s[j] = _mm512_mul_ps(s[j], sv);
        block_top = _mm512_mask_max_ps(block_top, seen[j], block_top, s[j]);
    }
    /* rows that have seen no key yet keep -inf: their shift is 0, not NaN */
    __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(block_top, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ),
                                        block_top, _mm512_setzero_ps());
    __m512 rescale = exp16(_mm512_sub_ps(*top, shift));  /* top -inf: 0 */
    *top = block_top;
    __m512 sum = _mm512_mul_ps(*total, rescale);
    for (int j = 0; j < KEYS; j++) {
        s[j] = _mm512_maskz_mov_ps(seen[j], exp16(_mm512_sub_ps(s[j], shift)));
        sum = _mm512_add_ps(sum, s[j]);
    }
    *total = sum;
    return rescale;
}

/* Each row's first and last visible key over rows [i0, i0 + rows), and the rows' intervals in lanes (rows past
   the block's: an empty interval). */
static inline void block_keys(const int32_t *lo, const int32_t *hi, int64_t i0, int64_t rows, int32_t *first,
                              int32_t *last, __m512i *lov, __m512i *hiv) {
    int32_t lo_l[ROWS], hi_l[ROWS];
    row_intervals(lo, hi, i0, rows, first, last, lo_l, hi_l);
    *lov = _mm512_loadu_si512(lo_l), *hiv = _mm512_loadu_si512(hi_l);
}

static inline void vector_normalisers(float *inv, __m512 top, __m512 total, const float *sink) {
    float tops[ROWS], sums[ROWS];
    _mm512_storeu_ps(tops, top), _mm512_storeu_ps(sums, total);
    normalisers(inv, tops, sums, sink);
}

/* The fp32 kernel (AVX-512 without bf16 instructions needed): rows [i0, i0 + ROWS) of one (sequence, head) of
   fp32 q, k, v into out, as row_block below does for bf16, with fused multiply-adds in place of the bf16 dots
   and no rounding of the weights. qt: scratch of dim vectors (q transposed), ot: dim vectors. */
static void row_block_f32(const float *q, int64_t qs, const float *k, int64_t ks, const float *v, int64_t vs,
                          const int32_t *lo, const int32_t *hi, int64_t i0, int64_t t, int64_t dim, float scale,
                          const float *sink, float *out, int64_t os, float *qt, float *ot) {
    int64_t rows = t - i0 < ROWS ? t - i0 : ROWS;
    int32_t first, last;
    __m512i lov, hiv;
    block_keys(lo, hi, i0, rows, &first, &last, &lov, &hiv);
    for (int64_t d = 0; d < dim; d++)  /* lane i: row i's element d (rows past t: 0) */
        for (int64_t i = 0; i < ROWS; i++) qt[d * ROWS + i] = i < rows ? q[(i0 + i) * qs + d] : 0.0f;
    __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps(), sv = _mm512_set1_ps(scale);
    for (int64_t d = 0; d < dim; d++) _mm512_storeu_ps(ot + 16 * d, _mm512_setzero_ps());
    for (int64_t j0 = first / KEYS * KEYS; j0 <= last; j0 += KEYS) {
        __m512 s[KEYS];
        const float *kp[KEYS];
        int keys = (int)(last - j0 + 1 < KEYS ? last - j0 + 1 : KEYS);
        for (int j = 0; j < KEYS; j++) {
            s[j] = _mm512_setzero_ps();
            kp[j] = k + (j < keys ? j0 + j : last) * ks;  /* past the last: masked */
        }
        for (int64_t d = 0; d < dim; d++) {
            __m512 qv = _mm512_loadu_ps(qt + d * ROWS);
            for (int j = 0; j < KEYS; j++) s[j] = _mm512_fmadd_ps(qv, _mm512_set1_ps(kp[j][d]), s[j]);
        }
        __m512 rescale = block_weights(s, lov, hiv, j0, sv, &top, &total);
        for (int64_t d0 = 0; d0 < dim; d0 += 16) {
            __m512 o[16];
            for (int d = 0; d < 16; d++) o[d] = _mm512_mul_ps(_mm512_loadu_ps(ot + 16 * (d0 + d)), rescale);
            for (int j = 0; j < keys; j++) {
                const float *row = v + (j0 + j) * vs + d0;
                for (int d = 0; d < 16; d++) o[d] = _mm512_fmadd_ps(s[j], _mm512_set1_ps(row[d]), o[d]);
            }
            for (int d = 0; d < 16; d++) _mm512_storeu_ps(ot + 16 * (d0 + d), o[d]);
        }
    }
    float inv[ROWS];
    vector_normalisers(inv, top, total, sink);
    for (int64_t i = 0; i < rows; i++)
        for (int64_t d = 0; d < dim; d++) out[(i0 + i) * os + d] = ot[16 * d + i] * inv[i];
}
#endif

#ifdef SIMD_AVX2
/* AVX2: block_weights for 8 rows in the lanes (the masks as lanes of all ones) */
static inline __m256 block_weights(__m256 *s, __m256i lov, __m256i hiv, int64_t j0, __m256 sv, __m256 *top,
                                   __m256 *total) {
    __m256 block_top = *top, seen[KEYS];
    for (int j = 0; j < KEYS; j++) {
        __m256i jv = _mm256_set1_epi32((int)(j0 + j));
        __m256i outside = _mm256_or_si256(_mm256_cmpgt_epi32(lov, jv), _mm256_cmpgt_epi32(jv, hiv));
        seen[j] = _mm256_castsi256_ps(_mm256_xor_si256(outside, _mm256_set1_epi32(-1)));
        s[j] = _mm256_mul_ps(s[j], sv);
        block_top = _mm256_blendv_ps(block_top, _mm256_max_ps(block_top, s[j]), seen[j]);
    }
    __m256 shift = _mm256_blendv_ps(block_top, _mm256_setzero_ps(),
                                    _mm256_cmp_ps(block_top, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
    __m256 rescale = exp8(_mm256_sub_ps(*top, shift));  /* top -inf: ~0, times sums of 0 */
    *top = block_top;
    __m256 sum = _mm256_mul_ps(*total, rescale);
    for (int j = 0; j < KEYS; j++) {
        s[j] = _mm256_and_ps(seen[j], exp8(_mm256_sub_ps(s[j], shift)));
        sum = _mm256_add_ps(sum, s[j]);
    }
    *total = sum;
    return rescale;
}

/* row_block_f32 below for AVX2: 8 rows, blocks of 8 keys, output dims 8 at a time */
static void row_block_f32(const float *q, int64_t qs, const float *k, int64_t ks, const float *v, int64_t vs,
                          const int32_t *lo, const int32_t *hi, int64_t i0, int64_t t, int64_t dim, float scale,
                          const float *sink, float *out, int64_t os, float *qt, float *ot) {
    int64_t rows = t - i0 < ROWS ? t - i0 : ROWS;
    int32_t first, last, lo_l[ROWS], hi_l[ROWS];
    row_intervals(lo, hi, i0, rows, &first, &last, lo_l, hi_l);
    __m256i lov = _mm256_loadu_si256((const __m256i *)lo_l), hiv = _mm256_loadu_si256((const __m256i *)hi_l);
    for (int64_t d = 0; d < dim; d++)  /* lane i: row i's element d (rows past t: 0) */
        for (int64_t i = 0; i < ROWS; i++) qt[d * ROWS + i] = i < rows ? q[(i0 + i) * qs + d] : 0.0f;
    __m256 top = _mm256_set1_ps(-INFINITY), total = _mm256_setzero_ps(), sv = _mm256_set1_ps(scale);
    for (int64_t d = 0; d < dim; d++) _mm256_storeu_ps(ot + ROWS * d, _mm256_setzero_ps());
    for (int64_t j0 = first / KEYS * KEYS; j0 <= last; j0 += KEYS) {
        __m256 s[KEYS];
        const float *kp[KEYS];
        int keys = (int)(last - j0 + 1 < KEYS ? last - j0 + 1 : KEYS);
        for (int j = 0; j < KEYS; j++) {
            s[j] = _mm256_setzero_ps();
            kp[j] = k + (j < keys ? j0 + j : last) * ks;  /* past the last: masked */
        }
        for (int64_t d = 0; d < dim; d++) {
            __m256 qv = _mm256_loadu_ps(qt + d * ROWS);
            for (int j = 0; j < KEYS; j++) s[j] = _mm256_fmadd_ps(qv, _mm256_set1_ps(kp[j][d]), s[j]);
        }
        __m256 rescale = block_weights(s, lov, hiv, j0, sv, &top, &total);
        for (int64_t d0 = 0; d0 < dim; d0 += 8) {
            __m256 o[8];
            for (int d = 0; d < 8; d++) o[d] = _mm256_mul_ps(_mm256_loadu_ps(ot + ROWS * (d0 + d)), rescale);
            for (int j = 0; j < keys; j++) {
                const float *row = v + (j0 + j) * vs + d0;
                for (int d = 0; d < 8; d++) o[d] = _mm256_fmadd_ps(s[j], _mm256_set1_ps(row[d]), o[d]);
            }
            for (int d = 0; d < 8; d++) _mm256_storeu_ps(ot + ROWS * (d0 + d), o[d]);
        }
    }
    float inv[ROWS], tops[ROWS], sums[ROWS];
    _mm256_storeu_ps(tops, top), _mm256_storeu_ps(sums, total);
    normalisers(inv, tops, sums, sink);
    for (int64_t i = 0; i < rows; i++)
        for (int64_t d = 0; d < dim; d++) out[(i0 + i) * os + d] = ot[ROWS * d + i] * inv[i];
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* vp[(j / 2) * dim + d] = (v[j][d], v[j + 1][d]) as bf16 pairs for j < length (a missing last key: 0). */
static void interleave_values(uint32_t *vp, const uint16_t *v, int64_t vs, int64_t length, int64_t dim) {
    for (int64_t j = 0; j < length; j += 2) {
        const uint16_t *v0 = v + j * vs, *v1 = j + 1 < length ? v + (j + 1) * vs : NULL;
        uint32_t *out = vp + (j / 2) * dim;
        if (v1)
            for (int64_t d = 0; d < dim; d++) out[d] = (uint32_t)v0[d] | (uint32_t)v1[d] << 16;
        else
            for (int64_t d = 0; d < dim; d++) out[d] = v0[d];
    }
}

/* Rows [i0, i0 + ROWS) of one (sequence, head) into out (rows os apart). qt: scratch of dim / 2 vectors; ot:
   dim vectors, output dimension d's 16 rows at ot + 16 d. */
static void row_block(const uint16_t *q, int64_t qs, const uint16_t *k, int64_t ks, const uint32_t *vp,
                      const int32_t *lo, const int32_t *hi, int64_t i0, int64_t t, int64_t dim, float scale,
                      const float *sink, uint16_t *out, int64_t os, uint32_t *qt, float *ot) {
    int64_t rows = t - i0 < ROWS ? t - i0 : ROWS, pairs = dim / 2;
    int32_t first, last;
    __m512i lov, hiv;
    block_keys(lo, hi, i0, rows, &first, &last, &lov, &hiv);
    for (int64_t p = 0; p < pairs; p++)  /* lane i: row i's p-th pair (rows past t: 0) */
        for (int64_t i = 0; i < ROWS; i++) qt[p * ROWS + i] = i < rows ? ((const uint32_t *)(q + (i0 + i) * qs))[p] : 0;
    __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps(), sv = _mm512_set1_ps(scale);
    for (int64_t d = 0; d < dim; d++) _mm512_storeu_ps(ot + 16 * d, _mm512_setzero_ps());
    for (int64_t j0 = first / KEYS * KEYS; j0 <= last; j0 += KEYS) {
        __m512 s[KEYS];
        const uint32_t *kp[KEYS];
        for (int j = 0; j < KEYS; j++) {
            s[j] = _mm512_setzero_ps();
            kp[j] = (const uint32_t *)(k + (j0 + j <= last ? j0 + j : last) * ks);  /* past the last: masked */
        }
        for (int64_t p = 0; p < pairs; p++) {
            __m512bh qv = (__m512bh)_mm512_loadu_si512(qt + p * ROWS);
            for (int j = 0; j < KEYS; j++) s[j] = _mm512_dpbf16_ps(s[j], qv, (__m512bh)_mm512_set1_epi32((int)kp[j][p]));
        }
        __m512 rescale = block_weights(s, lov, hiv, j0, sv, &top, &total);
        __m512i pp[KEYS / 2];
        for (int j = 0; j < KEYS; j += 2) {
            __m512i b0 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s[j]));
            __m512i b1 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s[j + 1]));
            pp[j / 2] = _mm512_or_si512(b0, _mm512_slli_epi32(b1, 16));
        }
        const uint32_t *vb = vp + (j0 / 2) * dim;
        int npairs = (int)((last - j0 + 2) / 2 < KEYS / 2 ? (last - j0 + 2) / 2 : KEYS / 2);
        for (int64_t d0 = 0; d0 < dim; d0 += 16) {
            __m512 o[16];
            const int nd = 16;  /* dim a multiple of 16 (the caller checks) */
            for (int64_t d = 0; d < nd; d++) o[d] = _mm512_mul_ps(_mm512_loadu_ps(ot + 16 * (d0 + d)), rescale);
            for (int jp = 0; jp < npairs; jp++) {
                const uint32_t *row = vb + jp * dim + d0;
                for (int64_t d = 0; d < nd; d++)
                    o[d] = _mm512_dpbf16_ps(o[d], (__m512bh)pp[jp], (__m512bh)_mm512_set1_epi32((int)row[d]));
            }
            for (int64_t d = 0; d < nd; d++) _mm512_storeu_ps(ot + 16 * (d0 + d), o[d]);
        }
    }
    float inv[ROWS];
    vector_normalisers(inv, top, total, sink);
    for (int64_t i = 0; i < rows; i++) {
        uint16_t *o = out + (i0 + i) * os;
        for (int64_t d = 0; d < dim; d++) o[d] = bf16_bits(ot[16 * d + i] * inv[i]);
    }
}
#endif

/* prefill_attention's items of bf16 q, k, v (values interleaved into pairs once per (sequence, kv head)). */
static void items_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int32_t *lo, const int32_t *hi,
                       uint16_t *out, int64_t heads, int64_t kv_heads, int64_t t, int64_t length, int64_t dim,
                       const int64_t *qst, const int64_t *kst, const int64_t *vst, const int64_t *ost, float scale,
                       const float *sinks, int64_t splits, int64_t begin, int64_t end) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    int64_t group = heads / kv_heads, padded = (length + 1) / 2 * 2;
    uint32_t *vp = aligned_alloc(64, (padded / 2 * dim + dim / 2 * ROWS) * sizeof(uint32_t) + 64);
    float *ot = aligned_alloc(64, dim * 16 * sizeof(float));
    if (vp && ot) {
        uint32_t *qt = vp + padded / 2 * dim;
        int64_t made = -1;  /* the (b, kv head) whose values vp holds */
        for (int64_t it = begin; it < end; it++) {
            int64_t b = it / splits / heads, h = it / splits % heads, kh = h / group, part = it % splits;
            const uint16_t *kb = k + b * kst[0] + kh * kst[1], *vb = v + b * vst[0] + kh * vst[1];
            if (b * kv_heads + kh != made) {
                interleave_values(vp, vb, vst[2], length, dim);
                made = b * kv_heads + kh;
            }
            for (int64_t i0 = part * ROWS; i0 < t; i0 += splits * ROWS)
                row_block(q + b * qst[0] + h * qst[1], qst[2], kb, kst[2], vp, lo + b * t, hi + b * t, i0, t, dim,
                          scale, sinks ? sinks + h : NULL, out + b * ost[0] + h * ost[1], ost[2], qt, ot);
        }
    }
    free(vp);
    free(ot);
#else
    (void)q, (void)k, (void)v, (void)lo, (void)hi, (void)out, (void)heads, (void)kv_heads, (void)t, (void)length;
    (void)dim, (void)qst, (void)kst, (void)vst, (void)ost, (void)scale, (void)sinks, (void)splits, (void)begin;
    (void)end;
#endif
}

/* The same of fp32 q, k, v. */
static void items_f32(const float *q, const float *k, const float *v, const int32_t *lo, const int32_t *hi,
                      float *out, int64_t heads, int64_t kv_heads, int64_t t, int64_t dim, const int64_t *qst,
                      const int64_t *kst, const int64_t *vst, const int64_t *ost, float scale, const float *sinks,
                      int64_t splits, int64_t begin, int64_t end) {
#if defined(__AVX512F__) || defined(SIMD_AVX2)
    int64_t group = heads / kv_heads;
    float *qt = aligned_alloc(64, 2 * dim * 16 * sizeof(float)), *ot = qt + dim * 16;
    if (qt) {
        for (int64_t it = begin; it < end; it++) {
            int64_t b = it / splits / heads, h = it / splits % heads, kh = h / group, part = it % splits;
            for (int64_t i0 = part * ROWS; i0 < t; i0 += splits * ROWS)
                row_block_f32(q + b * qst[0] + h * qst[1], qst[2], k + b * kst[0] + kh * kst[1], kst[2],
                              v + b * vst[0] + kh * vst[1], vst[2], lo + b * t, hi + b * t, i0, t, dim, scale,
                              sinks ? sinks + h : NULL, out + b * ost[0] + h * ost[1], ost[2], qt, ot);
        }
    }
    free(qt);
#else
    (void)q, (void)k, (void)v, (void)lo, (void)hi, (void)out, (void)heads, (void)kv_heads, (void)t, (void)dim;
    (void)qst, (void)kst, (void)vst, (void)ost, (void)scale, (void)sinks, (void)splits, (void)begin, (void)end;
#endif
}

/* Work items [begin, end) of batch * heads * splits: (b, h) over kv head h / (heads / kv_heads), its blocks of
   query rows dealt out to `splits` items in turn (more items than sequences and heads for many cores; in turn,
   as causal rows cost more the later they come). q, k, v, out of `kind` (bf16 or fp32); q (b, h, i, :) at q +
   b * qst[0] + h * qst[1] + i * qst[2] elements (k, v, out alike; the last dimension contiguous); lo, hi (b, i)
   at b * t + i; sinks: NULL, or each query head's sink logit (fp32, gpt-oss). Returns without work where the CPU
   lacks the instructions (the caller checks prefill_available). */
void prefill_attention(const void *q, const void *k, const void *v, const int32_t *lo, const int32_t *hi, void *out,
                       int kind, int64_t heads, int64_t kv_heads, int64_t t, int64_t length, int64_t dim,
                       const int64_t *qst, const int64_t *kst, const int64_t *vst, const int64_t *ost, float scale,
                       const float *sinks, int64_t splits, int64_t begin, int64_t end) {
    if (kind == KIND_BF16)
        items_bf16(q, k, v, lo, hi, out, heads, kv_heads, t, length, dim, qst, kst, vst, ost, scale, sinks, splits,
                   begin, end);
    else if (kind == KIND_F32)
        items_f32(q, k, v, lo, hi, out, heads, kv_heads, t, dim, qst, kst, vst, ost, scale, sinks, splits, begin,
                  end);
}

/* Whether this build has the kernel for `kind`: AVX-512 or AVX2 for fp32, AVX-512's bf16 dot instruction for bf16. */
int prefill_available(int kind) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return kind == KIND_BF16 || kind == KIND_F32;
#elif defined(__AVX512F__) || defined(SIMD_AVX2)
    return kind == KIND_F32;
#else
    (void)kind;
    return 0;
#endif
}

/* prefill_attention over all `items`, in about 4 ranges a thread, on `threads` OpenMP threads (gemv.c's note). */
void prefill_attention_team(const void *q, const void *k, const void *v, const int32_t *lo, const int32_t *hi,
                            void *out, int kind, int64_t heads, int64_t kv_heads, int64_t t, int64_t length,
                            int64_t dim, const int64_t *qst, const int64_t *kst, const int64_t *vst,
                            const int64_t *ost, float scale, const float *sinks, int64_t splits, int64_t items,
                            int threads) {
    int64_t step = (items + 4 * threads - 1) / (4 * threads), ranges = (items + step - 1) / step;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && ranges > 1)
    for (int64_t r = 0; r < ranges; r++)
        prefill_attention(q, k, v, lo, hi, out, kind, heads, kv_heads, t, length, dim, qst, kst, vst, ost, scale,
                          sinks, splits, r * step, (r + 1) * step < items ? (r + 1) * step : items);
}
