/* Vector helpers the kernels' files share (AVX-512). */

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

#endif
