/* Two elementwise steps of a Llama-family layer on a CPU, each one pass where torch makes several: RMSNorm
   (torch: 8 ops and 5 passes over fp32 copies) and the rotary embedding (7). At a prefill they are passes over
   tens of MB each; at a decode step of one row, ~5 us of dispatch each. (SiLU(gate) * up stays torch's, in
   place: its exp is not one a C loop reproduces bit for bit, and in place it was faster than one here.)

   Values as torch's ops give them, rounding for rounding: every op's fp32 result is rounded to the element kind
   where torch rounds it (no fused multiply-adds here: -ffp-contract=off), and RMSNorm's sum of squares is added
   in torch's order (torch_sum_of_squares): both give torch's bits. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kinds.h"

#define INLINE static inline __attribute__((always_inline))

/* The sum of x[i]^2 over a row of n values in torch's order (ATen's cascade_sum over a contiguous row, which
   `pow(2).mean(-1)` runs): vectors of `width` lanes (its Vectorized<float>: 8 here even on AVX-512, which the
   caller finds by trying),
   4 chains of them taking vectors in turn, each chain's sums carried up 4 levels every 2^p vectors, the chains
   added, then the scalar tail and the lanes left to right. The same bits as torch's, so RMSNorm is too: an ulp
   off in the sum flips roundings to bf16 now and then, which moved a real model's greedy answer. */
#define MAX_WIDTH 32
INLINE float torch_sum_of_squares(const void *row, const int kind, int64_t n, int width) {
    int64_t vectors = n / width, size = vectors / 4, power = 0;
    while (((int64_t)1 << power) < size) power++;
    power = power / 4 > 4 ? power / 4 : 4;
    int64_t step = (int64_t)1 << power, mask = step - 1;
    float acc[4][4][MAX_WIDTH] = {{{0}}};  /* [level][chain][lane] */
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int c = 0; c < 4; c++)
                for (int l = 0; l < width; l++) {
                    float v = kind_value(row, kind, (i * 4 + c) * width + l);
                    acc[0][c][l] += v * v;
                }
        for (int level = 1; level < 4; level++) {
            for (int c = 0; c < 4; c++)
                for (int l = 0; l < width; l++) {
                    acc[level][c][l] += acc[level - 1][c][l];
                    acc[level - 1][c][l] = 0;
                }
            if (i & (mask << (level * power))) break;
        }
    }
    for (; i < size; i++)
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < width; l++) {
                float v = kind_value(row, kind, (i * 4 + c) * width + l);
                acc[0][c][l] += v * v;
            }
    for (int level = 1; level < 4; level++)
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < width; l++) acc[0][c][l] += acc[level][c][l];
    for (int64_t t = size * 4; t < vectors; t++)  /* vectors past the last group of 4: chain 0 */
        for (int l = 0; l < width; l++) {
            float v = kind_value(row, kind, t * width + l);
            acc[0][0][l] += v * v;
        }
    for (int c = 1; c < 4; c++)
        for (int l = 0; l < width; l++) acc[0][0][l] += acc[0][c][l];
    float sum = 0;
    for (int64_t t = vectors * width; t < n; t++) {
        float v = kind_value(row, kind, t);
        sum += v * v;
    }
    for (int l = 0; l < width; l++) sum += acc[0][0][l];
    return sum;
}

/* out[r] = w * round(x[r] * rsqrt(mean(x[r]^2) + eps)) for rows [r0, r1) of n >= width values (HF's
   LlamaRMSNorm: fp32 inside, the normalised row rounded to the kind before the weight multiplies it). */
INLINE void rms_norm_kind(const void *x, const void *w, void *out, const int kind, int64_t n, int64_t xs, float eps,
                          int width, int64_t r0, int64_t r1) {
    int64_t item = kind == KIND_F32 ? 4 : 2;
    for (int64_t r = r0; r < r1; r++) {
        const char *row = (const char *)x + r * xs * item;
        char *o = (char *)out + r * n * item;
        float scale = 1.0f / sqrtf(torch_sum_of_squares(row, kind, n, width) / (float)n + eps);
        for (int64_t i = 0; i < n; i++)
            kind_put(o, kind, i, kind_value(w, kind, i) * kind_round(kind_value(row, kind, i) * scale, kind));
    }
}

/* Rotary embedding of rows [r0, r1) of (batch, heads, t) rows of d values: out = x * cos + rotate_half(x) * sin,
   each product and the sum rounded to the kind (torch's three ops), rotate_half(x) = (-x[d/2:], x[:d/2]).
   x row (b, h, i) at x + b * xst[0] + h * xst[1] + i * xst[2] elements; cos and sin rows (b, i) at b * cst[0] + i
   * cst[1]; out contiguous (batch, heads, t, d). */
INLINE void rope_kind(const void *x, const void *cos, const void *sin, void *out, const int kind, int64_t heads,
                      int64_t t, int64_t d, const int64_t *xst, const int64_t *cst, int64_t r0, int64_t r1) {
    int64_t item = kind == KIND_F32 ? 4 : 2, half = d / 2;
    for (int64_t r = r0; r < r1; r++) {
        int64_t b = r / (heads * t), h = r / t % heads, i = r % t;
        const char *row = (const char *)x + (b * xst[0] + h * xst[1] + i * xst[2]) * item;
        const char *c = (const char *)cos + (b * cst[0] + i * cst[1]) * item;
        const char *s = (const char *)sin + (b * cst[0] + i * cst[1]) * item;
        char *o = (char *)out + r * d * item;
        for (int64_t j = 0; j < half; j++) {  /* rotated: -x[j + half] */
            float a = kind_round(kind_value(row, kind, j) * kind_value(c, kind, j), kind);
            float e = kind_round(-kind_value(row, kind, j + half) * kind_value(s, kind, j), kind);
            kind_put(o, kind, j, a + e);
        }
        for (int64_t j = half; j < d; j++) {  /* rotated: x[j - half] */
            float a = kind_round(kind_value(row, kind, j) * kind_value(c, kind, j), kind);
            float e = kind_round(kind_value(row, kind, j - half) * kind_value(s, kind, j), kind);
            kind_put(o, kind, j, a + e);
        }
    }
}

/* Each kernel for a kind known at compile time, so that its loops vectorize. */
#define BY_KIND(kind, call_f32, call_bf16, call_f16) \
    do {                                             \
        if ((kind) == KIND_F32)                      \
            call_f32;                                \
        else if ((kind) == KIND_BF16)                \
            call_bf16;                               \
        else                                         \
            call_f16;                                \
    } while (0)

static void rms_norm_rows(const void *x, const void *w, void *out, int kind, int64_t n, int64_t xs, float eps,
                          int width, int64_t r0, int64_t r1) {
    BY_KIND(kind, rms_norm_kind(x, w, out, KIND_F32, n, xs, eps, width, r0, r1),
            rms_norm_kind(x, w, out, KIND_BF16, n, xs, eps, width, r0, r1),
            rms_norm_kind(x, w, out, KIND_F16, n, xs, eps, width, r0, r1));
}

static void rope_rows(const void *x, const void *cos, const void *sin, void *out, int kind, int64_t heads, int64_t t,
                      int64_t d, const int64_t *xst, const int64_t *cst, int64_t r0, int64_t r1) {
    BY_KIND(kind, rope_kind(x, cos, sin, out, KIND_F32, heads, t, d, xst, cst, r0, r1),
            rope_kind(x, cos, sin, out, KIND_BF16, heads, t, d, xst, cst, r0, r1),
            rope_kind(x, cos, sin, out, KIND_F16, heads, t, d, xst, cst, r0, r1));
}

/* Entry points: a range of rows on the calling thread (`_range`), or all rows in about 4 ranges a thread on
   `threads` OpenMP threads (`_team`: torch's pool, gemv.c's note). */
void rms_norm_range(const void *x, const void *w, void *out, int kind, int64_t n, int64_t xs, float eps, int width,
                    int64_t r0, int64_t r1) {
    rms_norm_rows(x, w, out, kind, n, xs, eps, width, r0, r1);
}

void rope_range(const void *x, const void *cos, const void *sin, void *out, int kind, int64_t heads, int64_t t,
                int64_t d, const int64_t *xst, const int64_t *cst, int64_t r0, int64_t r1) {
    rope_rows(x, cos, sin, out, kind, heads, t, d, xst, cst, r0, r1);
}

static int64_t range_step(int64_t rows, int threads) { return (rows + 4 * threads - 1) / (4 * threads); }

void rms_norm_team(const void *x, const void *w, void *out, int kind, int64_t rows, int64_t n, int64_t xs, float eps,
                   int width, int threads) {
    int64_t step = range_step(rows, threads), ranges = (rows + step - 1) / step;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && ranges > 1)
    for (int64_t q = 0; q < ranges; q++)
        rms_norm_rows(x, w, out, kind, n, xs, eps, width, q * step, (q + 1) * step < rows ? (q + 1) * step : rows);
}

void rope_team(const void *x, const void *cos, const void *sin, void *out, int kind, int64_t heads, int64_t t,
               int64_t d, const int64_t *xst, const int64_t *cst, int64_t rows, int threads) {
    int64_t step = range_step(rows, threads), ranges = (rows + step - 1) / step;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && ranges > 1)
    for (int64_t q = 0; q < ranges; q++)
        rope_rows(x, cos, sin, out, kind, heads, t, d, xst, cst, q * step, (q + 1) * step < rows ? (q + 1) * step : rows);
}
