/* A few rows times a 4-bit matrix grouped along its output dimension (FlexGen's grouping, `--weight-group-dim 0`),
   read as compression stores it: codes of W (N, K) row after row, two a byte (column 2j in byte j's low nibble),
   an fp16 scale and minimum for each group of g output rows and each column: (N / g, K).

   W[o, i] = c[o, i] s[G, i] + m[G, i] for o in group G, so x . W[o] = (x * s[G]) . c[o] + x . m[G]: per group
   the row x scaled by the group's scales once (K products shared by its g output rows) and the minima's dot once;
   per output row a dot of the scaled x with the codes, unpacked 64 at a time. Without it a CPU rebuilt the whole
   matrix into a dense slot every decode step (a write of 2 bytes a weight and a read of 2 more, where the codes
   are half a byte). Sums are fp32 and the weights are not rounded to the compute dtype first: the products are
   within fp32's rounding of x . W, nearer than the dequantized bf16 slot's. AVX-512 and AVX2 paths, plain loops
   elsewhere. */

#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds: nothing here is bit-identical to torch */
#include <stdint.h>
#include <string.h>

#include "kinds.h"
#include "simd.h"

#define BLOCK_VALUES 8192  /* a block's scaled rows of x (8192 values over its rows: 16 KiB in bf16) stay in L1
                              while a group's code rows are read */

#define BLOCK 8  /* rows of x whose sums stay in registers while a code row is read */

/* sums[r] += xs[r] . the code row c (kc columns) for r < nr (<= BLOCK; a constant where inlined, so the sums
   stay in registers) */
static inline __attribute__((always_inline)) void code_row_dots(const uint8_t *c, int64_t kc, const float *xs,
                                                                const int nr, float *sums) {
    int64_t i = 0;
#ifdef __AVX512BW__
    __m512 acc[BLOCK];
    for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
    for (; i + 64 <= kc; i += 64) {
        __m512 w[4];
        codes64(c + i / 2, w);
        for (int r = 0; r < nr; r++) {
            const float *x = xs + r * kc + i;
            __m512 a = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), acc[r]);
            a = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x + 16), a);
            a = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(x + 32), a);
            acc[r] = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(x + 48), a);
        }
    }
    for (int r = 0; r < nr; r++) sums[r] += _mm512_reduce_add_ps(acc[r]);
#elif defined(SIMD_AVX2)
    __m256 acc[BLOCK];  /* 16 codes at a time: the sums, two code vectors and x's in AVX2's 16 registers */
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    for (; i + 16 <= kc; i += 16) {
        __m256 w[2];
        codes16(c + i / 2, w);
        for (int r = 0; r < nr; r++) {
            const float *x = xs + r * kc + i;
            acc[r] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), acc[r]));
        }
    }
    for (int r = 0; r < nr; r++) sums[r] += hsum8(acc[r]);
#endif
    for (; i < kc; i += 2) {
        float lo = (float)(c[i / 2] & 15), hi = (float)(c[i / 2] >> 4);
        for (int r = 0; r < nr; r++) sums[r] += xs[r * kc + i] * lo + xs[r * kc + i + 1] * hi;
    }
}

#ifdef __AVX512BF16__
/* code_row_dots for two code rows (c, c + k / 2 bytes) and bf16 scaled rows (xb: pairs of bf16, as the CPU's bf16
   dot instruction takes them): each byte's two codes as the exact bf16 pair (128 + low, 128 + high) (simd.h's
   code_pairs16), 32 products a row in one instruction with fp32 sums; the 128s come off with the group's shift
   (scaled_bf16). A load of the scaled rows serves both code rows, and the 2 x nr sums are reduced together
   (simd.h's lane_sums16): sums[i * BLOCK + r] for code row i. */
static inline __attribute__((always_inline)) void code_rows_dots_bf16(const uint8_t *c, int64_t k, int64_t kc,
                                                                      const uint16_t *xb, const int nr, float *sums) {
    __m512 acc[2 * BLOCK];
    for (int r = 0; r < 2 * BLOCK; r++) acc[r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= kc; i += 32) {
        __m512i pairs[2] = {code_pairs16(c + i / 2), code_pairs16(c + k / 2 + i / 2)};
        for (int r = 0; r < nr; r++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + r * kc + i);
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)pairs[0], xv);
            acc[BLOCK + r] = _mm512_dpbf16_ps(acc[BLOCK + r], (__m512bh)pairs[1], xv);
        }
    }
    _mm512_storeu_ps(sums, lane_sums16(acc));
    for (; i < kc; i += 2)
        for (int h = 0; h < 2; h++) {
            uint8_t byte = c[h * k / 2 + i / 2];
            float lo = 128.0f + (float)(byte & 15), hi = 128.0f + (float)(byte >> 4);
            for (int r = 0; r < nr; r++)
                sums[h * BLOCK + r] += bf16_value(xb[r * kc + i]) * lo + bf16_value(xb[r * kc + i + 1]) * hi;
        }
}
#endif

/* part[r * g + j] += xs[r] . code row o0 + j's columns c0..c0 + kc, for the g rows of a group and every row of x
   (rows x kc, BLOCK at a time: each code row is unpacked once a block) */
static void code_dots(const uint8_t *codes, int64_t k, int64_t o0, int64_t g, int64_t c0, int64_t kc,
                      const void *xs, int bf16, int64_t rows, float *part) {
    for (int64_t r0 = 0; r0 < rows; r0 += BLOCK) {
        int64_t nr = rows - r0 < BLOCK ? rows - r0 : BLOCK;
        const float *x = (const float *)xs + r0 * kc;
        for (int64_t j = 0; j < g; j++) {
            const uint8_t *c = codes + ((o0 + j) * k + c0) / 2;
            float sums[BLOCK] = {0};
#ifdef __AVX512BF16__
            if (bf16) {  /* two code rows at a time (g even) */
                const uint16_t *xb = (const uint16_t *)xs + r0 * kc;
                float both[2 * BLOCK];
                switch (nr) {
                    case 1: code_rows_dots_bf16(c, k, kc, xb, 1, both); break;
                    case 2: code_rows_dots_bf16(c, k, kc, xb, 2, both); break;
                    case 3: code_rows_dots_bf16(c, k, kc, xb, 3, both); break;
                    case 4: code_rows_dots_bf16(c, k, kc, xb, 4, both); break;
                    case 5: code_rows_dots_bf16(c, k, kc, xb, 5, both); break;
                    case 6: code_rows_dots_bf16(c, k, kc, xb, 6, both); break;
                    case 7: code_rows_dots_bf16(c, k, kc, xb, 7, both); break;
                    default: code_rows_dots_bf16(c, k, kc, xb, 8, both); break;
                }
                for (int64_t r = 0; r < nr; r++) {
                    part[(r0 + r) * g + j] += both[r];
                    part[(r0 + r) * g + j + 1] += both[BLOCK + r];
                }
                j++;
                continue;
            }
#endif
            switch (nr) {  /* one copy of the loop per count of rows: the sums in registers */
                case 1: code_row_dots(c, kc, x, 1, sums); break;
                case 2: code_row_dots(c, kc, x, 2, sums); break;
                case 3: code_row_dots(c, kc, x, 3, sums); break;
                case 4: code_row_dots(c, kc, x, 4, sums); break;
                case 5: code_row_dots(c, kc, x, 5, sums); break;
                case 6: code_row_dots(c, kc, x, 6, sums); break;
                case 7: code_row_dots(c, kc, x, 7, sums); break;
                default: code_row_dots(c, kc, x, 8, sums); break;
            }
            for (int64_t r = 0; r < nr; r++) part[(r0 + r) * g + j] += sums[r];
        }
    }
}

/* xs = x * s (n values) and the return x . m: a row of x scaled by a group's scales, and its dot with the minima */
static float scaled(const void *x, int kind, const _Float16 *s, const _Float16 *m, int64_t n, float *xs) {
    int64_t i = 0;
    float sum = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 xv = load16(x, kind, i);
        _mm512_storeu_ps(xs + i, _mm512_mul_ps(xv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i)))));
        acc = _mm512_fmadd_ps(xv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + i))), acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(SIMD_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 xv = load8(x, kind, i);
        _mm256_storeu_ps(xs + i, _mm256_mul_ps(xv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i)))));
        acc = _mm256_fmadd_ps(xv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + i))), acc);
    }
    sum = hsum8(acc);
#endif
    for (; i < n; i++) {
        float v = kind_value(x, kind, i);
        xs[i] = v * (float)s[i];
        sum += v * (float)m[i];
    }
    return sum;
}

#ifdef __AVX512BF16__
/* scaled, with xb = x * s rounded to bf16 (to nearest even); returns x . m - 128 sum(xb): the shift that takes
   the 128s of code_row_dots_bf16's pairs off */
static float scaled_bf16(const void *x, int kind, const _Float16 *s, const _Float16 *m, int64_t n, uint16_t *xb) {
    int64_t i = 0;
    __m512 dot = _mm512_setzero_ps(), total = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 xv = load16(x, kind, i);
        __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i)));
        __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(xv, sv));
        _mm256_storeu_si256((__m256i *)(xb + i), (__m256i)v);
        total = _mm512_add_ps(total, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)v), 16)));
        dot = _mm512_fmadd_ps(xv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + i))), dot);
    }
    float sum = _mm512_reduce_add_ps(dot), rounded = _mm512_reduce_add_ps(total);
    for (; i < n; i++) {
        float v = kind_value(x, kind, i);
        xb[i] = bf16_bits(v * (float)s[i]);
        rounded += bf16_value(xb[i]);
        sum += v * (float)m[i];
    }
    return sum - 128.0f * rounded;
}
#endif

/* x (rows, K) of `kind` times W.T into out (rows, N) of `kind` (fp32 sums), output groups [q0, q1) (the caller
   splits them over its threads). K even, N a multiple of g, rows <= 16 (native.ROW_GROUP_ROWS); bf16: x . W by
   bf16 dot products (g even). */
void int4_gemv_row_groups(const uint8_t *codes, const _Float16 *scale, const _Float16 *minimum, int64_t n,
                          int64_t k, int64_t g, const void *x, int kind, int64_t rows, int bf16, void *out,
                          int64_t q0, int64_t q1) {
    const int64_t size = kind == KIND_F32 ? 4 : 2;
#ifndef __AVX512BF16__
    bf16 = 0;
#endif
    int64_t kc = BLOCK_VALUES / (rows < BLOCK ? rows : BLOCK);
    kc = kc >= k ? k : kc - kc % 64;
    float xs[rows * kc], part[rows * g], shift[rows];
    for (int64_t q = q0; q < q1; q++) {
        memset(part, 0, sizeof(float) * rows * g);
        memset(shift, 0, sizeof(float) * rows);
        for (int64_t c0 = 0; c0 < k; c0 += kc) {
            int64_t w = k - c0 < kc ? k - c0 : kc;
            const _Float16 *s = scale + q * k + c0, *m = minimum + q * k + c0;
            for (int64_t r = 0; r < rows; r++) {
#ifdef __AVX512BF16__
                if (bf16) {
                    shift[r] += scaled_bf16((const char *)x + (r * k + c0) * size, kind, s, m, w,
                                            (uint16_t *)xs + r * w);
                    continue;
                }
#endif
                shift[r] += scaled((const char *)x + (r * k + c0) * size, kind, s, m, w, xs + r * w);
            }
            code_dots(codes, k, q * g, g, c0, w, xs, bf16, rows, part);
        }
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < g; j++) kind_put(out, kind, r * n + q * g + j, part[r * g + j] + shift[r]);
    }
}

/* int4_gemv_row_groups over all N / g groups on `threads` OpenMP threads (torch's pool: gemv.c's note), a few
   groups a work item: a decode step makes ~6 such products a layer, where handing each to Python threads cost
   tens of microseconds. */
void int4_gemv_row_groups_team(const uint8_t *codes, const _Float16 *scale, const _Float16 *minimum, int64_t n,
                               int64_t k, int64_t g, const void *x, int kind, int64_t rows, int bf16, void *out,
                               int threads) {
    int64_t groups = n / g, step = (groups + 4 * threads - 1) / (4 * threads), items = (groups + step - 1) / step;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && items > 1)
    for (int64_t i = 0; i < items; i++)
        int4_gemv_row_groups(codes, scale, minimum, n, k, g, x, kind, rows, bf16, out, i * step,
                             (i + 1) * step < groups ? (i + 1) * step : groups);
}
