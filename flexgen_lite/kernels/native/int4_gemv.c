/* A few rows times a 4-bit weight in the layout of torch's CPU int4 matmul (int4.c), read as codes (decode steps
   of small batches on a CPU): by pairs of columns through the bf16 dot instruction where the CPU has it, else
   int4.c's walk in fp32; each on a team of OpenMP threads, as gemv.c's dense kernels (its note). */

#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds: nothing here is bit-identical to torch */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kinds.h"
#include "simd.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

int shared_x(int count, const void *x, int64_t rows, const void **xs, int64_t *rs);  /* gemv.c */

void int4_gemv(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t n, int64_t k,
               int64_t group_size, const float *x, int64_t rows, float *out, int64_t b0, int64_t b1);

#define TILE_ROWS 6  /* rows of x a pass over a group of codes takes at most (their sums in 24 registers) */
#define AHEAD_GROUPS 2  /* groups ahead whose scales the pairs kernel prefetches */

/* The first row of pass p when `rows` rows go in `passes` passes as evenly as they divide. */
static inline int64_t pass_start(int64_t rows, int64_t passes, int64_t p) {
    return p * (rows / passes) + (p < rows % passes ? p : rows % passes);
}
#ifdef __AVX512BF16__

/* Columns col and col + 1 of a block (s: column col's 32 bytes; col + 1's follow) as 4 vectors of bf16 pairs
   (128 + code at col, 128 + code at col + 1): rows 0-15, 16-31 (low nibbles), 32-47, 48-63 (high). 0x4300 | code
   is exactly 128 + code in bf16; the 128s are taken off with the minimum (pairs_tile). */
static inline void code_pairs(const uint8_t *s, __m512bh *dst) {
    const __m512i bias = _mm512_set1_epi16(0x4300), low = _mm512_set1_epi16(15);
#ifdef __AVX512VBMI__
    /* bytes j of both columns into the low bytes of a 32-bit lane's two words, the high bytes zero */
    const __m512i rows0 = _mm512_set_epi32(0x2F000F, 0x2E000E, 0x2D000D, 0x2C000C, 0x2B000B, 0x2A000A, 0x290009,
                                           0x280008, 0x270007, 0x260006, 0x250005, 0x240004, 0x230003, 0x220002,
                                           0x210001, 0x200000);
    const __m512i rows16 = _mm512_add_epi32(rows0, _mm512_set1_epi32(0x100010));
    __m512i both = _mm512_loadu_si512(s);
    __m512i w0 = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, rows0, both);
    __m512i w1 = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, rows16, both);
#else
    __m128i a0 = _mm_loadu_si128((const __m128i *)s), a1 = _mm_loadu_si128((const __m128i *)(s + 16));
    __m128i c0 = _mm_loadu_si128((const __m128i *)(s + 32)), c1 = _mm_loadu_si128((const __m128i *)(s + 48));
    __m512i w0 = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(a0, c0), _mm_unpacklo_epi8(a0, c0)));
    __m512i w1 = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(a1, c1), _mm_unpacklo_epi8(a1, c1)));
#endif
    dst[0] = (__m512bh)_mm512_or_si512(_mm512_and_si512(w0, low), bias);
    dst[1] = (__m512bh)_mm512_or_si512(_mm512_and_si512(w1, low), bias);
    dst[2] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w0, 4), bias);
    dst[3] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w1, 4), bias);
}

/* Rows [0, nr) of x (bf16, row stride k, from the group's first column) times a group's `pairs` column pairs of a
   block (src: their bytes): each row's 64 sums of (128 + code) * x by the bf16 dot instruction (products exact,
   fp32 sums), then total += scale * sums + (minimum - 128 scale) * (the row's sum of x over the group,
   xs[r * stride]); mv holds minimum - 128 scale. Inlined with a constant nr: the 24 sums stay in registers. */
static inline __attribute__((always_inline)) void pairs_tile(const uint8_t *src, int64_t pairs, const uint16_t *x,
                                                             int64_t k, int nr,
                                                             const float *sv, const float *mv, const float *xs,
                                                             int64_t stride, float *total, int64_t n) {
    __m512 part[TILE_ROWS][4];
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < 4; i++) part[r][i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh c[4];
        code_pairs(src + 64 * p, c);
        for (int r = 0; r < nr; r++) {
            uint32_t pair;
            memcpy(&pair, x + r * k + 2 * p, 4);
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int i = 0; i < 4; i++) part[r][i] = _mm512_dpbf16_ps(part[r][i], c[i], xv);
        }
    }
    for (int r = 0; r < nr; r++) {
        __m512 sum = _mm512_set1_ps(xs[r * stride]);
        for (int i = 0; i < 4; i++) {
            float *t = total + r * n + 16 * i;
            __m512 scaled = _mm512_fmadd_ps(part[r][i], _mm512_load_ps(sv + 16 * i), _mm512_loadu_ps(t));
            _mm512_storeu_ps(t, _mm512_fmadd_ps(_mm512_load_ps(mv + 16 * i), sum, scaled));
        }
    }
}

/* out (rows, N) fp32 = x (rows, K) bf16 @ W.T for the blocks of 64 output rows [b0, b1), by the CPU's bf16 dot
   instruction: per block, the rows of x in passes of at most TILE_ROWS (as even as they divide), each over every
   group's codes in turn, converting them as it reads them (cheaper than storing them converted and reading them
   back), its rows' sums staying in L1 across the groups; the sums are scaled per group and the minimum times the group's sum of x (xsum: (rows,
   K / group), pairs_group_sums) added. The weight crosses memory as 4-bit codes and is never written out. Each
   row's sums are taken in the same order whatever the rows beside it: a row's product does not depend on the
   batch. */
static void int4_gemv_pairs(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t n,
                            int64_t k, int64_t group_size, const uint16_t *xb, const float *xsum, int64_t rows,
                            float *out, int64_t b0, int64_t b1) {
    const int64_t groups = k / group_size, pairs = group_size / 2, passes = (rows + TILE_ROWS - 1) / TILE_ROWS;
    float sv[64] __attribute__((aligned(64))), mv[64] __attribute__((aligned(64)));
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t r = 0; r < rows; r++) memset(out + r * n + b * 64, 0, 64 * sizeof(float));
        for (int64_t pass = 0; pass < passes; pass++) {  /* a pass's rows over every group: their sums stay in L1 */
            const int64_t r0 = pass_start(rows, passes, pass), nr = pass_start(rows, passes, pass + 1) - r0;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *src = packed + (b * k + g * group_size) * 32;
                if (g + AHEAD_GROUPS < groups) {  /* a later group's scales and minima: n apart, not prefetched by the
                                                     CPU (at one row it waited for them: 18-20 GB/s, 22-24 with this) */
                    const char *s = (const char *)(scale + (g + AHEAD_GROUPS) * n + b * 64);
                    const char *m = (const char *)(minimum + (g + AHEAD_GROUPS) * n + b * 64);
                    for (int line = 0; line < 128; line += 64) __builtin_prefetch(s + line), __builtin_prefetch(m + line);
                }
                for (int i = 0; i < 4; i++) {
                    __m512 s16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + g * n + b * 64 + 16 * i)));
                    __m512 m16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(minimum + g * n + b * 64 + 16 * i)));
                    _mm512_store_ps(sv + 16 * i, s16);
                    _mm512_store_ps(mv + 16 * i, _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), s16, m16));
                }
                const uint16_t *x = xb + r0 * k + g * group_size;
                const float *xs = xsum + r0 * groups + g;
                float *total = out + r0 * n + b * 64;
#define TILE(nr) pairs_tile(src, pairs, x, k, nr, sv, mv, xs, groups, total, n)
                switch (nr) {
                    case 1: TILE(1); break; case 2: TILE(2); break; case 3: TILE(3); break;
                    case 4: TILE(4); break; case 5: TILE(5); break; default: TILE(TILE_ROWS);
                }
#undef TILE
            }
        }
    }
}

/* Each row's sums of x (bf16, rows x k) over each group of columns, xsum (rows, k / group_size), the same in every
   path that calls the pairs kernel. */
static void pairs_group_sums(const uint16_t *xb, int64_t rows, int64_t k, int64_t group_size, float *xsum) {
    int64_t groups = k / group_size;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = g * group_size; j < (g + 1) * group_size; j += 16)
                acc = _mm512_add_ps(acc, load16((const char *)(xb + r * k), KIND_BF16, j));
            xsum[r * groups + g] = _mm512_reduce_add_ps(acc);
        }
}
#define PAIRS_TAKE(kind, group_size) ((kind) == KIND_BF16 && (group_size) % 32 == 0)
#endif

/* int4_gemv over the blocks of 64 output rows [b0, b1); with xb (x in bf16: the same values as xf) by pairs of
   columns where the CPU has the bf16 dot instruction. */
void int4_gemv_blocks(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t n, int64_t k,
                      int64_t group_size, const float *xf, const uint16_t *xb, int64_t rows, float *out, int64_t b0,
                      int64_t b1) {
#ifdef __AVX512BF16__
    float *xsum = xb && PAIRS_TAKE(KIND_BF16, group_size) ? malloc(sizeof(float) * rows * (k / 32)) : NULL;
    if (xsum) {
        pairs_group_sums(xb, rows, k, group_size, xsum);
        int4_gemv_pairs(packed, scale, minimum, n, k, group_size, xb, xsum, rows, out, b0, b1);
        free(xsum);
        return;
    }
#endif
    (void)xb;
    int4_gemv(packed, scale, minimum, n, k, group_size, xf, rows, out, b0, b1);
}

/* y[i] (rows[i], n[i]) = x[i] (rows[i], k) @ W[i].T for `count` 4-bit weights sharing k and the group size, x[i]
   and y[i] of `kind`, on one team of `threads` OpenMP threads; each block's fp32 sums rounded into y[i] by the
   thread that took it. bf16 rows go to the pairs kernel as they are, a work item being a block of 64 output rows
   and, where the blocks are few for the threads, one pass of rows over it (a row's sums do not depend on which);
   others are converted to fp32 once, a work item a block. A mixture of experts' products: each expert's weights
   over its own rows. */
void int4_gemv_groups(int count, const uint8_t *const *packed, const _Float16 *const *scale,
                      const _Float16 *const *minimum, const int64_t *n, int64_t k, int64_t group_size,
                      const void *const *x, int kind, const int64_t *rows, void *const *y, int threads) {
#ifdef __AVX512BF16__
    int pairs = PAIRS_TAKE(kind, group_size);
#else
    int pairs = 0;
#endif
    int64_t groups = k / group_size, blocks = 0, floats = 0, passes = 1;
    int64_t *first = malloc(sizeof(int64_t) * 3 * (count + 1));  /* weight i's first block, sums, x floats */
    if (!first) return;
    int64_t *out_at = first + count + 1, *x_at = out_at + count + 1;
    for (int i = 0; i < count; i++) {
        first[i] = blocks;
        blocks += n[i] / 64;
        out_at[i] = floats;
        floats += rows[i] * n[i];
        int64_t p = pairs ? (rows[i] + TILE_ROWS - 1) / TILE_ROWS : 1;
        passes = p > passes ? p : passes;
    }
    first[count] = blocks;
    x_at[0] = floats;
    for (int i = 0; i < count; i++) x_at[i + 1] = x_at[i] + rows[i] * (pairs ? groups : k);
    int64_t split = pairs && blocks < 8 * threads ? passes : 1;  /* passes a block is cut into as work items */
    float *sums = malloc(sizeof(float) * (x_at[count] ? x_at[count] : 1));
    if (!sums) {
        free(first);
        return;
    }
    for (int i = 0; i < count; i++) {  /* pairs: x's group sums; else x in fp32 */
        float *xf = sums + x_at[i];
#ifdef __AVX512BF16__
        if (pairs) pairs_group_sums(x[i], rows[i], k, group_size, xf);
#endif
        for (int64_t j = 0; !pairs && j < rows[i] * k; j++) xf[j] = kind_value(x[i], kind, j);
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && blocks * split > 1)
    for (int64_t item = 0; item < blocks * split; item++) {
        int64_t it = item / split, part = item % split;
        int i = 0;
        while (it >= first[i + 1]) i++;
        int64_t b = it - first[i], r0 = pass_start(rows[i], split, part), r1 = pass_start(rows[i], split, part + 1);
        float *out = sums + out_at[i], *xf = sums + x_at[i];
        if (r1 <= r0) continue;
#ifdef __AVX512BF16__
        if (pairs)
            int4_gemv_pairs(packed[i], scale[i], minimum[i], n[i], k, group_size, (const uint16_t *)x[i] + r0 * k,
                            xf + r0 * groups, r1 - r0, out + r0 * n[i], b, b + 1);
        else
#endif
            int4_gemv(packed[i], scale[i], minimum[i], n[i], k, group_size, xf, rows[i], out, b, b + 1);
        for (int64_t r = r0; r < r1; r++)
            for (int64_t j = b * 64; j < b * 64 + 64; j++) kind_put(y[i], kind, r * n[i] + j, out[r * n[i] + j]);
    }
    free(sums);
    free(first);
}

/* y[i] = x @ W[i].T for up to 64 4-bit weights (n[i], k) sharing x (rows, k) and the group size: q, k and v; gate
   and up. */
void int4_gemv_team_many(int count, const uint8_t *const *packed, const _Float16 *const *scale,
                         const _Float16 *const *minimum, const int64_t *n, int64_t k, int64_t group_size, const void *x,
                         int kind, int64_t rows, void *const *y, int threads) {
    const void *xs[64];
    int64_t rs[64];
    count = shared_x(count, x, rows, xs, rs);
    int4_gemv_groups(count, packed, scale, minimum, n, k, group_size, xs, kind, rs, y, threads);
}

/* int4_gemv_team_many of one weight. */
void int4_gemv_team(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t n, int64_t k,
                    int64_t group_size, const void *x, int kind, int64_t rows, void *out, int threads) {
    int4_gemv_team_many(1, &packed, &scale, &minimum, &n, k, group_size, x, kind, rows, &out, threads);
}

/* int4.c's dequantization of W.T[:, r0:r1] (a slot for dense matmuls, or a tile) over its column tiles of 16 on
   `threads` OpenMP threads: the decode step's dequantizations run in the compute thread, where handing each to a
   Python thread cost more than a small weight's dequantization. */
void int4_dequantize_t(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t n, int64_t k,
                       int64_t group_size, int64_t r0, int64_t r1, void *out, int kind, int64_t t0, int64_t t1);

void int4_dequantize_t_team(const uint8_t *packed, const _Float16 *scale, const _Float16 *minimum, int64_t n,
                            int64_t k, int64_t group_size, int64_t r0, int64_t r1, void *out, int kind, int threads) {
    int64_t tiles = (k + 15) / 16, step = (tiles + 4 * threads - 1) / (4 * threads), ranges = (tiles + step - 1) / step;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && ranges > 1)
    for (int64_t r = 0; r < ranges; r++)
        int4_dequantize_t(packed, scale, minimum, n, k, group_size, r0, r1, out, kind, r * step,
                          (r + 1) * step < tiles ? (r + 1) * step : tiles);
}
