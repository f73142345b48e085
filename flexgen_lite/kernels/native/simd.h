/* Vector helpers the kernels' files share: AVX-512, and AVX2 (with FMA and F16C) for CPUs without it. */

#ifndef FLEXGEN_LITE_SIMD_H
#define FLEXGEN_LITE_SIMD_H

#include "kinds.h"

#ifdef __AVX512F__
#include <immintrin.h>

/* Elements c .. c + 15 of a row of `kind` as fp32. */
static inline __m512 load16(const char *row, int kind, int64_t c) {
    if (kind == KIND_F32) return _mm512_loadu_ps((const float *)row + c);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + c));
    if (kind == KIND_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* exp(x) 16 at a time (Cephes' expf: range reduction by ln 2, a degree-6 polynomial, within 2 ulp); x below
   -87.3 gives ~0. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* Lane j: the sum of a[j]'s 16 lanes. 16 dot products (a position's query heads; a tile of rows times weight
   rows) reduced together by a tree of unpacks, shuffles and adds (~3 instructions each; a horizontal sum apiece
   takes ~9). */
static inline __attribute__((always_inline)) __m512 lane_sums16(const __m512 *a) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)  /* each 128-bit lane: heads 2i, 2i + 1 interleaved, two partial sums each */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* each 128-bit lane: heads 4i .. 4i + 3, one partial sum each */
        __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#ifdef __AVX512F__
/* 32 codes from 16 bytes as 16 bf16 pairs (128 + low nibble, 128 + high), each exact: a byte b in a 32-bit lane,
   its low nibble kept at bits 0-3, its high one taken from b << 12 to bits 16-19, 128's exponent or-ed in. For the
   CPU's bf16 dot instruction; the 128s come off with a row's sum. */
static inline __attribute__((always_inline)) __m512i code_pairs16(const uint8_t *c) {
    const __m512i own = _mm512_set1_epi32((int)0xFFF0FF0Fu), bias = _mm512_set1_epi32(0x43004300);
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    return _mm512_or_si512(_mm512_ternarylogic_epi32(own, b, _mm512_slli_epi32(b, 12), 0xCA), bias);
}
#endif

#ifdef __AVX512BW__
/* 64 codes from 32 bytes, as fp32 (x[0..3]), not yet scaled */
static inline __attribute__((always_inline)) void codes64(const uint8_t *c, __m512 x[4]) {
    __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)c));
    __m512i bytes = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(15)),
                                    _mm512_slli_epi16(_mm512_srli_epi16(w, 4), 8));
    x[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(bytes, 0)));
    x[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(bytes, 1)));
    x[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(bytes, 2)));
    x[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(bytes, 3)));
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* 8-lane helpers, on every CPU with AVX2 (AVX-512 ones too: a path written in 8 lanes that beats the 16-lane
   one's absence, such as attention.c's fp32 grouped heads) */
#define SIMD_LANES8 1
#if !defined(__AVX512F__)
/* AVX2 machines (most desktop CPUs; AMD before Zen 4): the kernels' 8-lane paths stand in for the 16-lane ones */
#define SIMD_AVX2 1
#endif
#include <immintrin.h>

/* Elements c .. c + 7 of a row of `kind` as fp32. */
static inline __m256 load8(const char *row, int kind, int64_t c) {
    if (kind == KIND_F32) return _mm256_loadu_ps((const float *)row + c);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + c));
    if (kind == KIND_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* v into 8 elements of `kind` at dst, rounded to nearest even as kind_put. */
static inline void store8(void *dst, __m256 v, int kind) {
    if (kind == KIND_F32) {
        _mm256_storeu_ps(dst, v);
    } else if (kind == KIND_F16) {
        _mm_storeu_si128(dst, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        __m256i u = _mm256_castps_si256(v);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
        _mm_storeu_si128(dst, _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The sum of n floats. */
static inline float sum_floats(const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
    float s = hsum8(acc);
    for (; i < n; i++) s += x[i];
    return s;
}

/* exp(x) 8 at a time (exp16's range reduction and polynomial); x below -87.3 gives ~0, x at most 88. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);  /* 2^n */
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* a . b for n values, n a multiple of 8 */
static inline float dot8(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    if (i < n) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    return hsum8(_mm256_add_ps(s0, s1));
}

#endif

#ifdef SIMD_AVX2
/* 16 codes from 8 bytes (value 2i at byte i's low nibble), as fp32 (x[0..1]), not yet scaled */
static inline __attribute__((always_inline)) void codes16(const uint8_t *c, __m256 x[2]) {
    __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)c));
    __m128i lo = _mm_and_si128(w, _mm_set1_epi16(15)), hi = _mm_srli_epi16(w, 4);
    x[0] = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpacklo_epi16(lo, hi)));
    x[1] = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpackhi_epi16(lo, hi)));
}

/* 64 codes from 32 bytes, as fp32 (x[0..7]), not yet scaled */
static inline __attribute__((always_inline)) void codes64(const uint8_t *c, __m256 x[8]) {
    for (int i = 0; i < 4; i++) codes16(c + 8 * i, x + 2 * i);
}
#endif

#endif
