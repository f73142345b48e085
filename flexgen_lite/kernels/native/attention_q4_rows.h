/* What 4-bit cache attention's walks share (attention_q4.c, attention_q4_tiles.c): rows and dot products from a
   position's codes (groups of 64 values rebuilt as dequantize_reference does, AVX-512's 16 lanes or AVX2's 8),
   fp32 rows' dots, and prefetching a position-major store's positions. */

#ifndef ATTENTION_Q4_ROWS_H
#define ATTENTION_Q4_ROWS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kinds.h"
#include "simd.h"
#ifdef __AVX512BW__
#include <immintrin.h>
#endif

#ifdef __AVX512BW__
static inline __m512 rounded16(__m512 x, int kind) {
    if (kind == KIND_BF16) {  /* to nearest even, as kinds.h's bf16_bits */
        __m512i u = _mm512_castps_si512(x);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
        return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
    }
    if (kind == KIND_F16)
        return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return x;
}

/* A group of 64 values from 32 bytes of codes, rebuilt as dequantize_reference does (x[0..3]) */
static inline __attribute__((always_inline)) void group64(const uint8_t *c, float s, float m, int kind,
                                                          __m512 x[4]) {
    __m512 vs = _mm512_set1_ps(s), vm = _mm512_set1_ps(m), top = _mm512_set1_ps(FP16_MAX);
    codes64(c, x);
    for (int i = 0; i < 4; i++) {
        __m512 y = _mm512_add_ps(_mm512_mul_ps(x[i], vs), vm);
        x[i] = rounded16(_mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-FP16_MAX)), top), kind);
    }
}

/* A lone query head per kv head (no rebuilt row to share): the row's values are never made. Its score is
   sum over groups of scale * (codes . q) + minimum * sum(q) (qsum: q's sum per group); a value row adds
   p * scale * codes to acc and p * minimum to extra[group], spread over the group's values at the end. The same
   sums as over the rebuilt row, but for its rounding to the attention dtype and the order of the additions. */
static inline float dot_q4(const float *qf, const float *qsum, const uint8_t *c, const _Float16 *scale,
                           const _Float16 *minimum, int64_t dim) {
    __m512 acc = _mm512_setzero_ps(), x[4];
    float shift = 0;
    for (int64_t g = 0; g < dim / 64; g++) {
        __m512 part = _mm512_setzero_ps();
        codes64(c + 32 * g, x);
        for (int i = 0; i < 4; i++)
            part = _mm512_add_ps(part, _mm512_mul_ps(x[i], _mm512_loadu_ps(qf + 64 * g + 16 * i)));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(part, _mm512_set1_ps((float)scale[g])));
        shift += (float)minimum[g] * qsum[g];
    }
    return _mm512_reduce_add_ps(acc) + shift;
}

#ifdef __AVX512BF16__
/* dot_q4 for a bf16 attention, whose q is exact in bf16 (qb: its row as given): each byte's two codes as a bf16
   pair (128 + low, 128 + high), exact (gemv.c's code_pairs), times q's pairs by the CPU's bf16 dot instruction
   (exact products, fp32 sums: 4 instructions a 32 values where rebuilding them in fp32 takes 13); the 128s come
   off with the minima: scale * (dot - 128 qsum) + minimum * qsum a group. */
static inline float dot_q4_bf16(const uint16_t *qb, const float *qsum, const uint8_t *c, const _Float16 *scale,
                                const _Float16 *minimum, int64_t dim) {
    __m512 acc = _mm512_setzero_ps();
    float shift = 0;
    for (int64_t g = 0; g < dim / 64; g++) {
        __m512 part = _mm512_setzero_ps();
        for (int h = 0; h < 2; h++)
            part = _mm512_dpbf16_ps(part, (__m512bh)code_pairs16(c + 32 * g + 16 * h),
                                    (__m512bh)_mm512_loadu_si512(qb + 64 * g + 32 * h));
        float sg = (float)scale[g];
        acc = _mm512_add_ps(acc, _mm512_mul_ps(part, _mm512_set1_ps(sg)));
        shift += ((float)minimum[g] - 128.0f * sg) * qsum[g];
    }
    return _mm512_reduce_add_ps(acc) + shift;
}
#endif

static inline void axpy_q4(float *out, float *extra, float p, const uint8_t *c, const _Float16 *scale,
                           const _Float16 *minimum, int64_t dim) {
    __m512 x[4];
    for (int64_t g = 0; g < dim / 64; g++) {
        __m512 ps = _mm512_set1_ps(p * (float)scale[g]);
        codes64(c + 32 * g, x);
        for (int i = 0; i < 4; i++) {
            float *o = out + 64 * g + 16 * i;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_mul_ps(ps, x[i])));
        }
        extra[g] += p * (float)minimum[g];
    }
}
#endif

#ifdef SIMD_AVX2
/* AVX2 CPUs: the same routines 8 lanes wide (a group's 64 codes as x[0..7]) */
static inline __m256 rounded8(__m256 x, int kind) {
    if (kind == KIND_BF16) {
        __m256i u = _mm256_castps_si256(x);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
        return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
    if (kind == KIND_F16)
        return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return x;
}

static inline __attribute__((always_inline)) void group64(const uint8_t *c, float s, float m, int kind,
                                                          __m256 x[8]) {
    __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m), top = _mm256_set1_ps(FP16_MAX);
    codes64(c, x);
    for (int i = 0; i < 8; i++) {  /* multiply, then add: as dequantize_reference, no fused rounding */
        __m256 y = _mm256_add_ps(_mm256_mul_ps(x[i], vs), vm);
        x[i] = rounded8(_mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-FP16_MAX)), top), kind);
    }
}

static inline float dot_q4(const float *qf, const float *qsum, const uint8_t *c, const _Float16 *scale,
                           const _Float16 *minimum, int64_t dim) {
    __m256 acc = _mm256_setzero_ps(), x[8];
    float shift = 0;
    for (int64_t g = 0; g < dim / 64; g++) {
        __m256 part0 = _mm256_setzero_ps(), part1 = _mm256_setzero_ps();
        codes64(c + 32 * g, x);
        for (int i = 0; i < 8; i += 2) {
            part0 = _mm256_fmadd_ps(x[i], _mm256_loadu_ps(qf + 64 * g + 8 * i), part0);
            part1 = _mm256_fmadd_ps(x[i + 1], _mm256_loadu_ps(qf + 64 * g + 8 * i + 8), part1);
        }
        acc = _mm256_fmadd_ps(_mm256_add_ps(part0, part1), _mm256_set1_ps((float)scale[g]), acc);
        shift += (float)minimum[g] * qsum[g];
    }
    return hsum8(acc) + shift;
}

static inline void axpy_q4(float *out, float *extra, float p, const uint8_t *c, const _Float16 *scale,
                           const _Float16 *minimum, int64_t dim) {
    __m256 x[8];
    for (int64_t g = 0; g < dim / 64; g++) {
        __m256 ps = _mm256_set1_ps(p * (float)scale[g]);
        codes64(c + 32 * g, x);
        for (int i = 0; i < 8; i++) {
            float *o = out + 64 * g + 8 * i;
            _mm256_storeu_ps(o, _mm256_fmadd_ps(ps, x[i], _mm256_loadu_ps(o)));
        }
        extra[g] += p * (float)minimum[g];
    }
}
#endif

/* One position's `dim` values into `row` (groups of `gs`; a last group padded past dim is cut) */
static inline void dequantized_row(const uint8_t *codes, const _Float16 *scale, const _Float16 *minimum,
                                   int64_t dim, int64_t gs, int kind, float *row) {
    for (int64_t g0 = 0, gi = 0; g0 < dim; g0 += gs, gi++) {
        float s = (float)scale[gi], m = (float)minimum[gi];
        const uint8_t *c = codes + g0 / 2;
#ifdef __AVX512BW__
        if (gs == 64 && dim - g0 >= 64) {
            __m512 x[4];
            group64(c, s, m, kind, x);
            for (int i = 0; i < 4; i++) _mm512_storeu_ps(row + g0 + 16 * i, x[i]);
            continue;
        }
#elif defined(SIMD_AVX2)
        if (gs == 64 && dim - g0 >= 64) {
            __m256 x[8];
            group64(c, s, m, kind, x);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(row + g0 + 8 * i, x[i]);
            continue;
        }
#endif
        int64_t n = dim - g0 < gs ? dim - g0 : gs;
        for (int64_t i = 0; i < n; i++) {
            float x = (float)((c[i >> 1] >> ((i & 1) * 4)) & 15) * s;
            row[g0 + i] = kind_round(clamped(x + m), kind);
        }
    }
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
#ifdef __AVX512BW__
    if (n % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16)
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
        return _mm512_reduce_add_ps(acc);
    }
#elif defined(SIMD_AVX2)
    if (n % 8 == 0) return dot8(a, b, n);
#endif
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float sum = 0;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int j = 0; j < 16; j++) sum += acc[j];
    return sum;
}

static inline void axpy_f32(float *acc, float p, const float *x, int64_t n) {
    int64_t i = 0;
#ifdef SIMD_AVX2
    for (__m256 pv = _mm256_set1_ps(p); i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(acc + i)));
#endif
    for (; i < n; i++) acc[i] += p * x[i];
}

static inline void load_kind(const void *src, int kind, int64_t n, float *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = kind_value(src, kind, i);
}

static inline int lone_head(int64_t group, int64_t gs, int64_t dim) { return group == 1 && gs == 64 && dim % 64 == 0; }

/* In a position-major store one position's rows sit a whole row of the cache (rows x heads) from the next
   position's, past the page the hardware prefetcher follows: the bytes of a position AHEAD positions on are asked
   for while this one is read: position l's n bytes of codes (cs apart) and k bytes each of scales and minima
   (ss elements apart) */
#define AHEAD 4
static inline void prefetch_position(const uint8_t *codes, const _Float16 *sc, const _Float16 *mn, int64_t l,
                                     int64_t cs, int64_t ss, int64_t n, int64_t k) {
    for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(codes + l * cs + i);
    for (int64_t i = 0; i < k; i += 64) {
        __builtin_prefetch((const char *)(sc + l * ss) + i);
        __builtin_prefetch((const char *)(mn + l * ss) + i);
    }
}

/* One position's row: rebuilt from its codes, or (codes NULL) the new token's dense row */
static inline void position_row(const uint8_t *codes, const _Float16 *sc, const _Float16 *mn, const void *dense,
                                int64_t dim, int64_t gs, int kind, float *row) {
    if (codes)
        dequantized_row(codes, sc, mn, dim, gs, kind, row);
    else
        load_kind(dense, kind, dim, row);
}

#if defined(__AVX512BW__) || defined(SIMD_AVX2)
/* attention_q4_tiles.c: one kv head's stored positions 16 at a time rebuilt into L1 for its grouped query heads:
   their scores (values 0), or their weights times the value rows into acc (values 1) */
void tiled_head(int values, const float *qf, float *acc, int64_t j, int64_t ds, int64_t group, const uint8_t *codes,
                const _Float16 *sc, const _Float16 *mn, int64_t s1, int64_t cs, int64_t ss, const uint8_t *m,
                int64_t skip, int64_t length, int far, int64_t dim, float scale, float *scores, int64_t sl,
                float *tile);
#endif

#endif
