/* What the decode attention walks share (attention.c, attention_groups.c, attention_blocks.c): a sequence's
   cached rows (rows_t), rows converted to fp32 as read, dot products, and the softmax's weights; and the walks
   the other files define for attention.c's decode_attention to call. */

#ifndef ATTENTION_ROWS_H
#define ATTENTION_ROWS_H

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
/* attention_groups.c: the query heads [0, g) sharing one kv head of a head-major 16-bit cache, dim 16 * nv */
void group_two_pass_half(const float *qf, int64_t ds, const uint16_t *qb, int64_t qs, int64_t g, const rows_t *c,
                         const uint8_t *m, int64_t length, int64_t ks, int64_t vs, float scale, const float *sinks,
                         float *s, int64_t sl, float *acc, int64_t nv, int kind);
/* attention_blocks.c: a block of kv heads and their query heads of a position-major 16-bit cache */
void block_two_pass_half(const float *qf, int64_t ds, const uint16_t *qb, int64_t qs, int64_t nkv, int64_t group,
                         const rows_t *c, int64_t kh_s, int64_t l_s, int64_t vh_s, int64_t vl_s, const uint8_t *m,
                         int64_t length, float scale, const float *sinks, float *s, float *acc, int64_t nv, int kind);
#endif
#ifdef SIMD_LANES8
/* attention_groups.c: the query heads [0, g) sharing one kv head of a head-major fp32 cache, 8 lanes */
void group_two_pass_f32(const float *qf, int64_t ds, int64_t g, const rows_t *c, const uint8_t *m, int64_t length,
                        int64_t ks, int64_t vs, float scale, const float *sinks, float *s, int64_t sl, float *acc,
                        int64_t dim);
#endif

#endif
