/* 4-bit weights in the layout of torch's CPU int4 matmul, dequantized for a dense matmul (see int4_matmul.py).

   packed: (N / 64, K, 32) bytes; byte (b, k, j) holds the codes of rows b*64 + j (low nibble) and b*64 + 32 + j
   (high nibble) at column k. scale, minimum: (K / g, N) fp16. Value = code * scale + minimum, in fp32 with no
   fused multiply-add (built with -ffp-contract=off), rounded to nearest even: bit-identical to the torch path. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kinds.h"
#include "simd.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#ifdef __AVX512F__
static inline void store16(void *dst, __m512 v, int kind) {
    if (kind == KIND_F32) {
        _mm512_storeu_ps(dst, v);
    } else if (kind == KIND_BF16) {
#ifdef __AVX512BF16__
        /* round to nearest even, as below: the values (code * scale + minimum, fp16 scales and minimums) are 0 or
           at least 2^-24 in magnitude, never the fp32 subnormals this instruction would flush */
        _mm256_storeu_si256(dst, (__m256i)_mm512_cvtneps_pbh(v));
        return;
#endif
        __m512i u = _mm512_castps_si512(v);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
        _mm256_storeu_si256(dst, _mm512_cvtepi32_epi16(u));
    } else {
        _mm256_storeu_si256(dst, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

/* Block b's 64 values of column col, as `row` does for all blocks, with the block's 64 scales and minimums of
   the column's group in fp32 (sv, mv: rows 0-15, 16-31, 32-47, 48-63), loaded once for the columns sharing them. */
static inline void block64(const uint8_t *src, const __m512 *sv, const __m512 *mv, char *dst, int kind,
                           int64_t itemsize) {
    for (int half = 0; half < 2; half++) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + 16 * half)));
        __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(bytes, 4);
        __m512 vlo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), sv[half]), mv[half]);
        __m512 vhi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), sv[2 + half]), mv[2 + half]);
        store16(dst + 16 * half * itemsize, vlo, kind);
        store16(dst + (32 + 16 * half) * itemsize, vhi, kind);
    }
}
#endif

#ifdef SIMD_AVX2
/* block64 in 8 lanes: block b's 64 values of a column from its 32 code bytes, with the column group's 64 scales
   and minimums in fp32 (sv, mv: 8 rows each). */
static inline void block64_avx2(const uint8_t *src, const __m256 *sv, const __m256 *mv, char *dst, int kind,
                                int64_t itemsize) {
    for (int q = 0; q < 4; q++) {  /* bytes 8q .. 8q + 7: rows 8q .. 8q + 7 (low nibbles), 32 + 8q .. (high) */
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + 8 * q)));
        __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
        __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
        store8(dst + 8 * q * itemsize, _mm256_add_ps(_mm256_mul_ps(lo, sv[q]), mv[q]), kind);
        store8(dst + (32 + 8 * q) * itemsize, _mm256_add_ps(_mm256_mul_ps(hi, sv[4 + q]), mv[4 + q]), kind);
    }
}
#endif

/* Column `col` of W's rows [b0 * 64, b1 * 64), i.e. part of row `col` of W.T, into `dst` as `kind`. */
static void row(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t b0, int64_t b1,
                int64_t k, int64_t col, void *dst, int kind) {
    float lo[32], hi[32];
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *src = packed + (b * k + col) * 32;
        const _Float16 *s = scale + b * 64, *m = minimum + b * 64;
        for (int j = 0; j < 32; j++) {
            lo[j] = (float)(src[j] & 15) * (float)s[j] + (float)m[j];
            hi[j] = (float)(src[j] >> 4) * (float)s[32 + j] + (float)m[32 + j];
        }
        int64_t at = (b - b0) * 64;
        if (kind == KIND_F32) {
            memcpy((float *)dst + at, lo, sizeof lo);
            memcpy((float *)dst + at + 32, hi, sizeof hi);
        } else if (kind == KIND_BF16) {
            uint16_t *d = (uint16_t *)dst + at;
            for (int j = 0; j < 32; j++) d[j] = bf16_bits(lo[j]);
            for (int j = 0; j < 32; j++) d[32 + j] = bf16_bits(hi[j]);
        } else {
            _Float16 *d = (_Float16 *)dst + at;
            for (int j = 0; j < 32; j++) d[j] = (_Float16)lo[j];
            for (int j = 0; j < 32; j++) d[32 + j] = (_Float16)hi[j];
        }
    }
}

/* Rows [r0, r1) of W (multiples of 64) as W.T[:, r0:r1], a (K, r1 - r0) row-major `out` (element size by `kind`);
   only the tiles of 16 columns [t0, t1) (the caller splits them over its threads), each tile walking the blocks,
   reading each block's codes for the tile's columns contiguously. */
void int4_dequantize_t(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t n,
                       int64_t k, int64_t group_size, int64_t r0, int64_t r1, void *out, int kind, int64_t t0, int64_t t1) {
    int64_t itemsize = kind == KIND_F32 ? 4 : 2, tile = 16, width = r1 - r0, b0 = r0 / 64, b1 = r1 / 64;
    for (int64_t col0 = t0 * tile; col0 < k && col0 < t1 * tile; col0 += tile) {
        int64_t col1 = col0 + tile < k ? col0 + tile : k;
#ifdef __AVX512F__
        for (int64_t b = b0; b < b1; b++) {
            __m512 sv[4], mv[4];
            int64_t group = -1;
            for (int64_t col = col0; col < col1; col++) {
                if (col / group_size != group) {  /* a tile's 16 columns share a group: loaded once */
                    group = col / group_size;
                    for (int i = 0; i < 4; i++) {
                        sv[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + group * n + b * 64 + 16 * i)));
                        mv[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(minimum + group * n + b * 64 + 16 * i)));
                    }
                }
                block64(packed + (b * k + col) * 32, sv, mv, (char *)out + (col * width + (b - b0) * 64) * itemsize,
                        kind, itemsize);
            }
        }
#elif defined(SIMD_AVX2)
        for (int64_t b = b0; b < b1; b++) {
            __m256 sv[8], mv[8];
            int64_t group = -1;
            for (int64_t col = col0; col < col1; col++) {
                if (col / group_size != group) {
                    group = col / group_size;
                    for (int i = 0; i < 8; i++) {
                        sv[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + group * n + b * 64 + 8 * i)));
                        mv[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(minimum + group * n + b * 64 + 8 * i)));
                    }
                }
                block64_avx2(packed + (b * k + col) * 32, sv, mv,
                             (char *)out + (col * width + (b - b0) * 64) * itemsize, kind, itemsize);
            }
        }
#else
        for (int64_t col = col0; col < col1; col++) {
            int64_t group = col / group_size;
            row(packed, scale + group * n, minimum + group * n, b0, b1, k, col,
                (char *)out + col * width * itemsize, kind);
        }
#endif
    }
}

/* ---- a few rows multiplied by the codes as they are (decode steps of small batches) ------------------------ */

#ifdef SIMD_AVX2
#define QROWS 4  /* rows of x a pass over a quarter block: 2 x QROWS sums in registers */
/* A quarter q of one block (bytes 8q .. 8q + 7 of each column: rows 8q .. 8q + 7, low nibbles, and 32 + 8q ..
   32 + 8q + 7, high) times NR rows of x: each column's 8 bytes converted once for the NR rows; with fewer than 3
   rows, even and odd columns summed apart (two chains per sum in flight). Each group's sums scaled, and its
   minimums times the group's sums of x (xsum, rows apart by `groups`) added, into out (rows apart by n). */
static inline __attribute__((always_inline)) void quarter_avx2(const uint8_t *codes, const _Float16 *scale,
                                                               const _Float16 *minimum, int64_t n, int64_t k,
                                                               int64_t g, const float *x, const float *xsum,
                                                               int64_t groups, const int NR, float *out) {
    enum { U = 2 };
    const int u = NR < 3 ? U : 1;
    for (int r = 0; r < NR; r++) {
        _mm256_storeu_ps(out + r * n, _mm256_setzero_ps());
        _mm256_storeu_ps(out + r * n + 32, _mm256_setzero_ps());
    }
    for (int64_t g0 = 0; g0 < k; g0 += g) {
        __m256 part[U][QROWS][2];
        for (int j = 0; j < U; j++)
            for (int r = 0; r < QROWS; r++) part[j][r][0] = part[j][r][1] = _mm256_setzero_ps();
        for (int64_t col = g0; col < g0 + g; col += u) {
            for (int j = 0; j < u; j++) {
                __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + (col + j) * 32)));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(15)));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
                for (int r = 0; r < NR; r++) {
                    __m256 xv = _mm256_broadcast_ss(x + r * k + col + j);
                    part[j][r][0] = _mm256_fmadd_ps(lo, xv, part[j][r][0]);
                    part[j][r][1] = _mm256_fmadd_ps(hi, xv, part[j][r][1]);
                }
            }
        }
        const _Float16 *s = scale + (g0 / g) * n, *m = minimum + (g0 / g) * n;
        for (int h = 0; h < 2; h++) {  /* h: the low nibbles' rows, then the high ones' (32 further) */
            __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 32 * h)));
            __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + 32 * h)));
            for (int r = 0; r < NR; r++) {
                __m256 sum = u == 2 ? _mm256_add_ps(part[0][r][h], part[1][r][h]) : part[0][r][h];
                float *o = out + r * n + 32 * h;
                __m256 acc = _mm256_fmadd_ps(sum, sv, _mm256_loadu_ps(o));
                _mm256_storeu_ps(o, _mm256_fmadd_ps(mv, _mm256_set1_ps(xsum[r * groups + g0 / g]), acc));
            }
        }
    }
}

/* int4_gemv in 8 lanes (AVX2): the group sums of x once, then for each block, its quarters by passes of up to
   QROWS rows (the block's codes, 32 bytes a column, stay in L2 between them). 0: no memory for the sums. */
static int int4_gemv_avx2(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t n, int64_t k,
                          int64_t g, const float *x, int64_t rows, float *out, int64_t b0, int64_t b1) {
    const int64_t groups = k / g;
    float *xsum = malloc(sizeof(float) * rows * groups);
    if (!xsum) return 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < groups; i++) xsum[r * groups + i] = sum_floats(x + r * k + i * g, g);
    for (int64_t b = b0; b < b1; b++)
        for (int q = 0; q < 4; q++)
            for (int64_t r0 = 0; r0 < rows; r0 += QROWS) {
                const uint8_t *c = packed + b * k * 32 + 8 * q;
                const _Float16 *s = scale + b * 64 + 8 * q, *m = minimum + b * 64 + 8 * q;
                const float *xr = x + r0 * k, *xs = xsum + r0 * groups;
                float *o = out + r0 * n + b * 64 + 8 * q;
                switch (rows - r0 < QROWS ? rows - r0 : QROWS) {  /* each count of rows its own unrolled loop */
                    case 1: quarter_avx2(c, s, m, n, k, g, xr, xs, groups, 1, o); break;
                    case 2: quarter_avx2(c, s, m, n, k, g, xr, xs, groups, 2, o); break;
                    case 3: quarter_avx2(c, s, m, n, k, g, xr, xs, groups, 3, o); break;
                    default: quarter_avx2(c, s, m, n, k, g, xr, xs, groups, 4, o); break;
                }
            }
    free(xsum);
    return 1;
}
#endif

/* out (rows, N) fp32 = x (rows, K) fp32 @ W.T, W in the layout above, for the blocks of 64 output rows [b0, b1).
   Each column's 32 code bytes are read once and multiplied as codes into every row of x; per group the sums
   are scaled and the minimum times the group's sum of x added (code * scale + minimum, summed over the group):
   the weight crosses memory as 4-bit codes and is never written out. Rows go 2 at a time (their sums stay in
   registers). */
void int4_gemv(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t n, int64_t k,
               int64_t group_size, const float *x, int64_t rows, float *out, int64_t b0, int64_t b1) {
#ifdef SIMD_AVX2
    if (int4_gemv_avx2(packed, scale, minimum, n, k, group_size, x, rows, out, b0, b1)) return;
#endif
    enum { R = 2 };
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t r0 = 0; r0 < rows; r0 += R) {
            int64_t nr = rows - r0 < R ? rows - r0 : R;
#ifdef __AVX512F__
            __m512 acc[R][4];
            for (int r = 0; r < R; r++)
                for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_ps();
            for (int64_t g0 = 0; g0 < k; g0 += group_size) {
                __m512 part[R][4];
                float xsum[R] = {0};
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < 4; i++) part[r][i] = _mm512_setzero_ps();
                for (int64_t col = g0; col < g0 + group_size; col++) {
                    const uint8_t *src = packed + (b * k + col) * 32;
                    __m512i lo0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
                    __m512i lo1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + 16)));
                    __m512 c[4];  /* codes of rows 0-15, 16-31 (low nibbles), 32-47, 48-63 (high) */
                    c[0] = _mm512_cvtepi32_ps(_mm512_and_si512(lo0, _mm512_set1_epi32(15)));
                    c[1] = _mm512_cvtepi32_ps(_mm512_and_si512(lo1, _mm512_set1_epi32(15)));
                    c[2] = _mm512_cvtepi32_ps(_mm512_srli_epi32(lo0, 4));
                    c[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(lo1, 4));
                    for (int r = 0; r < nr; r++) {
                        float xr = x[(r0 + r) * k + col];
                        __m512 xv = _mm512_set1_ps(xr);
                        xsum[r] += xr;
                        for (int i = 0; i < 4; i++) part[r][i] = _mm512_fmadd_ps(c[i], xv, part[r][i]);
                    }
                }
                const _Float16 *s = scale + (g0 / group_size) * n + b * 64, *m = minimum + (g0 / group_size) * n + b * 64;
                for (int i = 0; i < 4; i++) {
                    __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 16 * i)));
                    __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + 16 * i)));
                    for (int r = 0; r < nr; r++)
                        acc[r][i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[r]),
                                                    _mm512_fmadd_ps(part[r][i], sv, acc[r][i]));
                }
            }
            for (int r = 0; r < nr; r++)
                for (int i = 0; i < 4; i++) _mm512_storeu_ps(out + (r0 + r) * n + b * 64 + 16 * i, acc[r][i]);
#else
            float acc[R][64];
            memset(acc, 0, sizeof acc);
            for (int64_t col = 0; col < k; col++) {
                const uint8_t *src = packed + (b * k + col) * 32;
                const _Float16 *s = scale + (col / group_size) * n + b * 64, *m = minimum + (col / group_size) * n + b * 64;
                float w[64];
                for (int j = 0; j < 32; j++) {
                    w[j] = (float)(src[j] & 15) * (float)s[j] + (float)m[j];
                    w[32 + j] = (float)(src[j] >> 4) * (float)s[32 + j] + (float)m[32 + j];
                }
                for (int r = 0; r < nr; r++) {
                    float xv = x[(r0 + r) * k + col];
                    for (int j = 0; j < 64; j++) acc[r][j] += w[j] * xv;
                }
            }
            for (int r = 0; r < nr; r++) memcpy(out + (r0 + r) * n + b * 64, acc[r], sizeof acc[r]);
#endif
        }
    }
}

/* ---- dequantizing as stored (compression.py's layout, any grouping) ---------------------------------------- */

#define CHUNK 2048 /* columns a pass: a group's scales, minima and one row of values stay in L1 */

/* n values code * s + m (fp32, no fused multiply-add, clamped to fp16's range) into out of `kind`; s and m
   per value (sv, mv) or one for all (sv == NULL: s, m) */
static inline void values_out(const float *x, const float *sv, const float *mv, float s, float m, int64_t n,
                              void *out, int kind) {
    if (kind == KIND_F32) {
        float *o = out;
        if (sv) for (int64_t i = 0; i < n; i++) o[i] = clamped(x[i] * sv[i] + mv[i]);
        else for (int64_t i = 0; i < n; i++) o[i] = clamped(x[i] * s + m);
    } else if (kind == KIND_BF16) {
        uint16_t *o = out;
        if (sv) for (int64_t i = 0; i < n; i++) o[i] = bf16_bits(clamped(x[i] * sv[i] + mv[i]));
        else for (int64_t i = 0; i < n; i++) o[i] = bf16_bits(clamped(x[i] * s + m));
    } else {
        _Float16 *o = out;
        if (sv) for (int64_t i = 0; i < n; i++) o[i] = (_Float16)clamped(x[i] * sv[i] + mv[i]);
        else for (int64_t i = 0; i < n; i++) o[i] = (_Float16)clamped(x[i] * s + m);
    }
}

static inline void unpacked(const uint8_t *c, int64_t n, float *x) { /* n even: byte i holds values 2i, 2i + 1 */
    for (int64_t i = 0; i < n / 2; i++) {
        x[2 * i] = (float)(c[i] & 15);
        x[2 * i + 1] = (float)(c[i] >> 4);
    }
}

#ifdef __AVX512BW__
/* 64 values from 32 bytes of codes into dst, as values_out: scales and minima from sv, mv (64 each) or one for
   all (sv == NULL: s, m) */
static inline void values64(const uint8_t *c, const float *sv, const float *mv, float s, float m, char *dst,
                            int kind, int64_t size) {
    __m512 x[4];
    codes64(c, x);
    for (int i = 0; i < 4; i++) {
        __m512 y = sv ? _mm512_add_ps(_mm512_mul_ps(x[i], _mm512_loadu_ps(sv + 16 * i)), _mm512_loadu_ps(mv + 16 * i))
                      : _mm512_add_ps(_mm512_mul_ps(x[i], _mm512_set1_ps(s)), _mm512_set1_ps(m));
        y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-FP16_MAX)), _mm512_set1_ps(FP16_MAX));
        store16(dst + 16 * i * size, y, kind);
    }
}
#endif

#ifdef SIMD_AVX2
/* 16 values from 8 bytes of codes into dst, as values_out (sv == NULL: s, m for all) */
static inline void values16(const uint8_t *c, const float *sv, const float *mv, float s, float m, char *dst,
                            int kind, int64_t size) {
    __m256 x[2];
    codes16(c, x);
    for (int i = 0; i < 2; i++) {
        __m256 y = sv ? _mm256_add_ps(_mm256_mul_ps(x[i], _mm256_loadu_ps(sv + 8 * i)), _mm256_loadu_ps(mv + 8 * i))
                      : _mm256_add_ps(_mm256_mul_ps(x[i], _mm256_set1_ps(s)), _mm256_set1_ps(m));
        y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-FP16_MAX)), _mm256_set1_ps(FP16_MAX));
        store8(dst + 8 * i * size, y, kind);
    }
}
#endif

/* n values (n even) from codes c (value 0 at a byte's low nibble), as values_out */
static inline void row_out(const uint8_t *c, const float *sv, const float *mv, float s, float m, int64_t n,
                           char *dst, int kind, int64_t size, float *x) {
    int64_t i = 0;
#ifdef __AVX512BW__
    for (; i + 64 <= n; i += 64) values64(c + i / 2, sv ? sv + i : NULL, sv ? mv + i : NULL, s, m, dst + i * size,
                                          kind, size);
#elif defined(SIMD_AVX2)
    for (; i + 16 <= n; i += 16) values16(c + i / 2, sv ? sv + i : NULL, sv ? mv + i : NULL, s, m, dst + i * size,
                                          kind, size);
#endif
    if (i == n) return;
    unpacked(c + i / 2, n - i, x);
    values_out(x, sv ? sv + i : NULL, sv ? mv + i : NULL, s, m, n - i, dst + i * size, kind);
}


/* compression.dequantize_reference of a tensor quantized to 4 bits, read as stored: codes two a byte (low nibble
   first) in the flat order of (groups, g, inner), scale and minimum (groups, inner) fp16, into out (groups, g,
   inner) of `kind`, bit for bit. Groups [q0, q1) (the caller splits them over threads). inner is 1 (groups along
   the last dimension: g even) or even (weights grouped along their output dimension, FlexGen's grouping). */
void int4_dequantize_groups(const uint8_t *codes, const _Float16 *scale, const _Float16 *minimum, int64_t g,
                            int64_t inner, void *out, int kind, int64_t q0, int64_t q1) {
    const int64_t size = kind == KIND_F32 ? 4 : 2;
    float x[CHUNK], s[CHUNK], m[CHUNK];
    for (int64_t q = q0; q < q1; q++) {
        if (inner == 1) {
            for (int64_t j0 = 0; j0 < g; j0 += CHUNK) {
                int64_t n = g - j0 < CHUNK ? g - j0 : CHUNK;
                row_out(codes + (q * g + j0) / 2, NULL, NULL, (float)scale[q], (float)minimum[q], n,
                        (char *)out + (q * g + j0) * size, kind, size, x);
            }
            continue;
        }
        for (int64_t c0 = 0; c0 < inner; c0 += CHUNK) {
            int64_t n = inner - c0 < CHUNK ? inner - c0 : CHUNK;
            for (int64_t i = 0; i < n; i++)
                s[i] = (float)scale[q * inner + c0 + i], m[i] = (float)minimum[q * inner + c0 + i];
            for (int64_t j = 0; j < g; j++) {
                int64_t at = (q * g + j) * inner + c0;
                row_out(codes + at / 2, s, m, 0, 0, n, (char *)out + at * size, kind, size, x);
            }
        }
    }
}
