/* 8-bit weights (int8_weight.py: the embedding and head under --compress-weight on a CPU, a GGUF's Q8_0 as stored):
   codes int8 (n, k) and one fp16 scale per GROUP values along k (n, k / GROUP); value = code * scale.

   int8_gemv: y (rows, n) = x (rows, k) @ W^T for a few rows (decode steps of small batches), each weight row read
   once, front to back: half the bytes of a 16-bit head. Each group's 32 codes are converted and scaled once and
   multiplied into XROWS rows of x (in cache): bf16 rows by the bf16 dot instruction where the CPU has it, else in
   fp32 by fused multiply-adds; sums are fp32.
   int8_dequantize: rows [n0, n1) of W as values of `kind` (the tiles that many rows multiply dense). */

#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds: nothing here is bit-identical to torch */
#include <stdint.h>
#include <stdlib.h>

#include "kinds.h"
#include "simd.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define GROUP 32
#define XROWS 4  /* rows of x whose sums stay in registers at once */
#define CHUNK 32  /* output rows per work item of a team */

#ifdef __AVX512F__
/* 16 codes at c times the group's scale d, in fp32 (exact products of an int8 and an fp16 value). */
static inline __m512 scaled16(const int8_t *c, __m512 d) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c))), d);
}
#endif

#ifdef SIMD_AVX2
/* 8 codes at c times the group's scale d, in fp32. */
static inline __m256 scaled8(const int8_t *c, __m256 d) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)c))), d);
}
#endif

/* sums[r] = x row r . W row (codes w, scales s) for r < nr. */
static inline __attribute__((always_inline)) void dots8(const int8_t *w, const _Float16 *s, int64_t k,
                                                        const float *xf, int64_t nr, float *sums) {
#ifdef __AVX512F__
    __m512 acc[XROWS];
    for (int r = 0; r < XROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k / GROUP; g++) {
        const int8_t *c = w + g * GROUP;
        __m512 d = _mm512_set1_ps((float)s[g]);
        __m512 w0 = scaled16(c, d), w1 = scaled16(c + 16, d);
        for (int64_t r = 0; r < nr; r++) {
            const float *x = xf + r * k + g * GROUP;
            acc[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc[r]);
            acc[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), acc[r]);
        }
    }
    for (int64_t r = 0; r < nr; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(SIMD_AVX2)
    __m256 acc[XROWS][2];  /* two sums a row: the group's 4 products a row in two chains */
    for (int r = 0; r < XROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < k / GROUP; g++) {
        const int8_t *c = w + g * GROUP;
        __m256 d = _mm256_set1_ps((float)s[g]), wv[4];
        for (int i = 0; i < 4; i++) wv[i] = scaled8(c + 8 * i, d);
        for (int64_t r = 0; r < nr; r++) {
            const float *x = xf + r * k + g * GROUP;
            for (int i = 0; i < 4; i++) acc[r][i & 1] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(x + 8 * i), acc[r][i & 1]);
        }
    }
    for (int64_t r = 0; r < nr; r++) sums[r] = hsum8(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
    for (int64_t r = 0; r < nr; r++) sums[r] = 0.0f;
    for (int64_t g = 0; g < k / GROUP; g++) {
        float part[XROWS] = {0};
        for (int64_t c = 0; c < GROUP; c++) {
            float v = (float)w[g * GROUP + c];
            for (int64_t r = 0; r < nr; r++) part[r] += v * xf[r * k + g * GROUP + c];
        }
        for (int64_t r = 0; r < nr; r++) sums[r] += (float)s[g] * part[r];
    }
#endif
}

#ifdef __AVX512BF16__
/* The same for bf16 rows of x: each group's values code * scale rounded to bf16 (as int8_dequantize gives them to
   a dense bf16 product) and multiplied by the bf16 dot instruction (exact products, fp32 sums): the conversion is
   shared by the rows, and a row costs a load and a dot per 32 values, as the dense bf16 kernel's do. */
static void dots8_bf16(const int8_t *w, const _Float16 *s, int64_t k, const uint16_t *xb, int64_t nr, float *sums) {
    __m512 acc[XROWS];
    for (int r = 0; r < XROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k / GROUP; g++) {
        const int8_t *c = w + g * GROUP;
        __m512 d = _mm512_set1_ps((float)s[g]);
        __m512 lo = scaled16(c, d), hi = scaled16(c + 16, d);
        __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);  /* values 0-15 low, 16-31 high: x's order */
        for (int64_t r = 0; r < nr; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(xb + r * k + g * GROUP));
    }
    for (int64_t r = 0; r < nr; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

/* Output rows [n0, n1) of y (rows, n) of `kind`, from xf (rows, k) in fp32, or from xb (bf16) where not NULL. */
void int8_gemv(const int8_t *codes, const _Float16 *scale, int64_t n, int64_t k, const float *xf,
               const uint16_t *xb, int64_t rows, void *y, int kind, int64_t n0, int64_t n1) {
    float sums[XROWS];
    (void)xb;
    for (int64_t j = n0; j < n1; j++) {
        const int8_t *w = codes + j * k;
        const _Float16 *s = scale + j * (k / GROUP);
        for (int64_t r0 = 0; r0 < rows; r0 += XROWS) {
            int64_t nr = rows - r0 < XROWS ? rows - r0 : XROWS;
#ifdef __AVX512BF16__
            if (xb)
                dots8_bf16(w, s, k, xb + r0 * k, nr, sums);
            else
#endif
                switch (nr) {  /* each count of rows its own unrolled loop */
                    case 1: dots8(w, s, k, xf + r0 * k, 1, sums); break;
                    case 2: dots8(w, s, k, xf + r0 * k, 2, sums); break;
                    case 3: dots8(w, s, k, xf + r0 * k, 3, sums); break;
                    default: dots8(w, s, k, xf + r0 * k, 4, sums); break;
                }
            for (int64_t r = 0; r < nr; r++) kind_put(y, kind, (r0 + r) * n + j, sums[r]);
        }
    }
}

/* Whether int8_gemv multiplies bf16 rows as they are (else the caller passes them in fp32). */
int int8_gemv_takes_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* int8_gemv of all output rows on one team of `threads` OpenMP threads (torch's own pool). */
void int8_gemv_team(const int8_t *codes, const _Float16 *scale, int64_t n, int64_t k, const float *xf,
                    const uint16_t *xb, int64_t rows, void *y, int kind, int threads) {
    int64_t items = (n + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(guided) num_threads(threads) if (threads > 1 && items > 1)
    for (int64_t it = 0; it < items; it++)
        int8_gemv(codes, scale, n, k, xf, xb, rows, y, kind, it * CHUNK, (it + 1) * CHUNK < n ? (it + 1) * CHUNK : n);
}

/* Rows [n0, n1) of W as values of `kind` into dst ((n1 - n0), k). */
void int8_dequantize(const int8_t *codes, const _Float16 *scale, int64_t k, void *dst, int kind, int64_t n0,
                     int64_t n1) {
    for (int64_t j = n0; j < n1; j++) {
        const int8_t *w = codes + j * k;
        const _Float16 *s = scale + j * (k / GROUP);
        int64_t out = (j - n0) * k;
        for (int64_t g = 0; g < k / GROUP; g++) {
            float d = (float)s[g];
#ifdef __AVX512F__
            for (int64_t h = 0; h < GROUP; h += 16) {
                __m512 v = scaled16(w + g * GROUP + h, _mm512_set1_ps(d));
                int64_t at = out + g * GROUP + h;
                if (kind == KIND_F32) {
                    _mm512_storeu_ps((float *)dst + at, v);
                } else if (kind == KIND_F16) {
                    _mm256_storeu_si256((__m256i *)((uint16_t *)dst + at),
                                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                } else {  /* bf16, nearest even (kind_put's rounding) */
                    __m512i u = _mm512_castps_si512(v);
                    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                    u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
                    _mm256_storeu_si256((__m256i *)((uint16_t *)dst + at), _mm512_cvtepi32_epi16(u));
                }
            }
#elif defined(SIMD_AVX2)
            for (int64_t h = 0; h < GROUP; h += 8)
                store8((char *)dst + (out + g * GROUP + h) * (kind == KIND_F32 ? 4 : 2),
                       scaled8(w + g * GROUP + h, _mm256_set1_ps(d)), kind);
#else
            for (int64_t c = 0; c < GROUP; c++)
                kind_put(dst, kind, out + g * GROUP + c, (float)w[g * GROUP + c] * d);
#endif
        }
    }
}

void int8_dequantize_team(const int8_t *codes, const _Float16 *scale, int64_t n0, int64_t n1, int64_t k, void *dst,
                          int kind, int threads) {
    int64_t items = (n1 - n0 + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
    for (int64_t it = 0; it < items; it++) {
        int64_t a = n0 + it * CHUNK, b = a + CHUNK < n1 ? a + CHUNK : n1;
        int8_dequantize(codes, scale, k, (char *)dst + (a - n0) * k * (kind == KIND_F32 ? 4 : 2), kind, a, b);
    }
}
