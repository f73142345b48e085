/* A few rows times a dense weight (decode steps of small batches on a CPU): y = x W^T (+ bias).

   At one to a few rows a matmul is a read of W, and torch's CPU matmul reads a cold weight at about half the
   memory's speed (its blocking is for many rows). This walks each output row's weight row once, front to back,
   with the rows of x in fp32 in the cache: W streams at the memory's speed. Sums are fp32, like torch's.

   Each kernel has a `_team` entry that splits its work over OpenMP threads: built with -fopenmp against the
   libgomp torch has already loaded, the team is torch's own pool (woken in microseconds; nothing spins beside
   it). native/__init__.py checks that the runtime is shared and otherwise hands ranges out itself. */

#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds: nothing here is bit-identical to torch */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kinds.h"
#include "simd.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define XROWS 4  /* rows of x whose sums stay in registers at once */
#define CHUNK 32  /* output rows per work item */

#ifdef __AVX512F__
/* sums[r] = xf[r] . row for r < nr (<= XROWS): 32 columns a step, two sums per row of x. */
static inline void dots(const char *row, int kind, int64_t k, const float *xf, int64_t nr, float *sums) {
    __m512 acc[XROWS][2];
    for (int r = 0; r < XROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
        __m512 w0 = load16(row, kind, c), w1 = load16(row, kind, c + 16);
        for (int r = 0; r < nr; r++) {
            acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + r * k + c), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xf + r * k + c + 16), acc[r][1]);
        }
    }
    for (int r = 0; r < nr; r++) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
    for (; c < k; c++) {
        float w = kind_value(row, kind, c);
        for (int r = 0; r < nr; r++) sums[r] += w * xf[r * k + c];
    }
}
#ifdef __AVX512BF16__
#define WROWS 4  /* weight rows a bf16 tile walks together: XROWS x WROWS sums in registers */
#define AHEAD 2  /* tiles ahead that a tile's steps prefetch */
/* The same for bf16 weights and bf16 rows of x, WROWS weight rows (k apart) at a time: sums[r * WROWS + i] = x
   row r . weight row i for r < nr, i < nw. Products of bf16 pairs summed in fp32 by the CPU's bf16 dot
   instruction (exact products; 3 instructions per 32 weights where converting them takes 10). Each step loads
   32 columns of every weight row and row of x once for XROWS x WROWS dots (one x row per weight row took a load
   per dot: at 4-16 rows the loads, not memory, bounded a core), and the 16 sums are reduced together.
   The WROWS rows are short streams side by side, which the hardware's prefetchers do not follow (at K = 576 the
   tile read at 12 GB/s where one row after another read at 17): each step prefetches as many bytes of a tile
   AHEAD further on (`next`: WROWS rows, contiguous) as it reads of this one. */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *w, int64_t nw, int64_t k,
                                                            const uint16_t *xb, const int nr, float *sums,
                                                            const char *next) {
    __m512 acc[XROWS * WROWS];
    for (int i = 0; i < XROWS * WROWS; i++) acc[i] = _mm512_setzero_ps();
    const uint16_t *wr[WROWS];
    for (int i = 0; i < WROWS; i++) wr[i] = w + (i < nw ? i : 0) * k;  /* past nw: row 0 again, its sums unused */
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
        if (next)
            for (int l = 0; l < WROWS; l++) __builtin_prefetch(next + c * 2 * WROWS + 64 * l, 0, 1);
        __m512bh wv[WROWS];
        for (int i = 0; i < WROWS; i++) wv[i] = (__m512bh)_mm512_loadu_si512(wr[i] + c);
        for (int r = 0; r < nr; r++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + r * k + c);
            for (int i = 0; i < WROWS; i++) acc[r * WROWS + i] = _mm512_dpbf16_ps(acc[r * WROWS + i], wv[i], xv);
        }
    }
    _mm512_storeu_ps(sums, lane_sums16(acc));
    for (; c < k; c++)
        for (int r = 0; r < nr; r++)
            for (int i = 0; i < nw; i++)
                sums[r * WROWS + i] += kind_value(wr[i], KIND_BF16, c) * kind_value(xb, KIND_BF16, r * k + c);
}

/* dense_gemv's output rows [n0, n1) for bf16 (y of out_kind): tiles of WROWS weight rows by XROWS rows of x. */
static void gemv_bf16(const uint16_t *w, const void *bias, int64_t n, int64_t k, const uint16_t *x, int64_t rows,
                      void *y, int out_kind, int64_t n0, int64_t n1) {
    float sums[XROWS * WROWS];
    for (int64_t j = n0; j < n1; j += WROWS) {
        int64_t nw = n1 - j < WROWS ? n1 - j : WROWS;
        for (int64_t r0 = 0; r0 < rows; r0 += XROWS) {
            int64_t nr = rows - r0 < XROWS ? rows - r0 : XROWS;
            const uint16_t *xr = x + r0 * k, *wj = w + j * k;
            const char *next = r0 + XROWS >= rows && j + (AHEAD + 1) * WROWS <= n
                               ? (const char *)(wj + AHEAD * WROWS * k) : NULL;
            switch (nr) {  /* each count of rows its own unrolled loop */
                case 1: tile_bf16(wj, nw, k, xr, 1, sums, next); break;
                case 2: tile_bf16(wj, nw, k, xr, 2, sums, next); break;
                case 3: tile_bf16(wj, nw, k, xr, 3, sums, next); break;
                default: tile_bf16(wj, nw, k, xr, 4, sums, next); break;
            }
            for (int64_t r = 0; r < nr; r++)
                for (int64_t i = 0; i < nw; i++)
                    kind_put(y, out_kind, (r0 + r) * n + j + i,
                             sums[r * WROWS + i] + (bias ? kind_value(bias, KIND_BF16, j + i) : 0.0f));
        }
    }
}
#endif
#elif defined(SIMD_AVX2)
/* sums[r] = xf[r] . row for r < nr (<= XROWS): 16 columns a step, two sums per row of x (8 chains in flight). */
static inline __attribute__((always_inline)) void dots(const char *row, int kind, int64_t k, const float *xf,
                                                       int64_t nr, float *sums) {
    __m256 acc[XROWS][2];
    for (int r = 0; r < XROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
        __m256 w0 = load8(row, kind, c), w1 = load8(row, kind, c + 8);
        for (int r = 0; r < nr; r++) {
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + r * k + c), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + r * k + c + 8), acc[r][1]);
        }
    }
    for (int r = 0; r < nr; r++) sums[r] = hsum8(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (; c < k; c++) {
        float w = kind_value(row, kind, c);
        for (int r = 0; r < nr; r++) sums[r] += w * xf[r * k + c];
    }
}
#else
static inline void dots(const char *row, int kind, int64_t k, const float *xf, int64_t nr, float *sums) {
    for (int r = 0; r < nr; r++) {
        float acc[16] = {0};
        int64_t c = 0;
        for (; c + 16 <= k; c += 16)
            for (int j = 0; j < 16; j++) acc[j] += kind_value(row, kind, c + j) * xf[r * k + c + j];
        float s = 0;
        for (int j = 0; j < 16; j++) s += acc[j];
        for (; c < k; c++) s += kind_value(row, kind, c) * xf[r * k + c];
        sums[r] = s;
    }
}
#endif

/* y (rows, n) = x (rows, k) @ w (n, k)^T + bias (n, or NULL), x, w and bias of `kind`, y of `out_kind` (the fp32
   sums as they are where that is fp32: a head's logits), xf: x in fp32; output rows [n0, n1). Each weight row is
   read from memory once; the rows of x go XROWS at a time over it (in cache). */
void dense_gemv(const void *w, const void *bias, int kind, int out_kind, int64_t n, int64_t k, const void *x,
                const float *xf, int64_t rows, void *y, int64_t n0, int64_t n1) {
    int64_t item = kind == KIND_F32 ? 4 : 2;
    float sums[XROWS];
#ifdef __AVX512BF16__
    if (kind == KIND_BF16) {
        gemv_bf16(w, bias, n, k, x, rows, y, out_kind, n0, n1);
        return;
    }
#endif
    (void)x;
    for (int64_t j = n0; j < n1; j++) {
        const char *row = (const char *)w + j * k * item;
        float b = bias ? kind_value(bias, kind, j) : 0.0f;
        for (int64_t r0 = 0; r0 < rows; r0 += XROWS) {
            int64_t nr = rows - r0 < XROWS ? rows - r0 : XROWS;
#ifdef SIMD_AVX2
            switch (nr) {  /* each count of rows its own unrolled loop */
                case 1: dots(row, kind, k, xf + r0 * k, 1, sums); break;
                case 2: dots(row, kind, k, xf + r0 * k, 2, sums); break;
                case 3: dots(row, kind, k, xf + r0 * k, 3, sums); break;
                default: dots(row, kind, k, xf + r0 * k, 4, sums); break;
            }
#else
            dots(row, kind, k, xf + r0 * k, nr, sums);
#endif
            for (int64_t r = 0; r < nr; r++) kind_put(y, out_kind, (r0 + r) * n + j, sums[r] + b);
        }
    }
}

/* y[i] (rows[i], n[i]) = x[i] (rows[i], k) @ w[i]^T + bias[i] for `count` weights, each as dense_gemv, its x
   converted to fp32 once (where the kernel reads it so); all their chunks of output rows on one team of `threads`
   OpenMP threads, handed out guided (long runs of rows first: cold weights streamed 12% faster than in chunks
   taken in turn; the short last ones still go to whichever thread is free). A mixture of experts' products:
   each expert's weights over its own rows. */
void dense_gemv_groups(int count, const void *const *w, const void *const *bias, const int64_t *n, int kind,
                       int out_kind, int64_t k, const void *const *x, const int64_t *rows, void *const *y,
                       int threads) {
#ifdef __AVX512BF16__
    int convert = kind != KIND_BF16;  /* bf16 rows are multiplied as they are (gemv_bf16) */
#else
    int convert = 1;
#endif
    int64_t *first = malloc(sizeof(int64_t) * 2 * (count + 1)), *xoff = first + count + 1, items = 0;
    if (!first) return;
    xoff[0] = 0;
    for (int i = 0; i < count; i++) {  /* first[i]: weight i's first work item; xoff[i]: its x in xf */
        first[i] = items;
        items += (n[i] + CHUNK - 1) / CHUNK;
        xoff[i + 1] = xoff[i] + (convert ? rows[i] * k : 0);
    }
    first[count] = items;
    float *xf = convert ? malloc(sizeof(float) * (xoff[count] ? xoff[count] : 1)) : NULL;
    if (convert && !xf) {
        free(first);
        return;
    }
    for (int i = 0; convert && i < count; i++)
        for (int64_t j = 0; j < rows[i] * k; j++) xf[xoff[i] + j] = kind_value(x[i], kind, j);
    #pragma omp parallel for schedule(guided) num_threads(threads) if (threads > 1 && items > 1)
    for (int64_t it = 0; it < items; it++) {
        int i = 0;
        while (it >= first[i + 1]) i++;
        int64_t n0 = (it - first[i]) * CHUNK, n1 = n0 + CHUNK < n[i] ? n0 + CHUNK : n[i];
        dense_gemv(w[i], bias[i], kind, out_kind, n[i], k, x[i], convert ? xf + xoff[i] : NULL, rows[i], y[i], n0,
                   n1);
    }
    free(xf);
    free(first);
}

/* The groups' x and rows for up to 64 weights sharing one x: how many. */
int shared_x(int count, const void *x, int64_t rows, const void **xs, int64_t *rs) {
    count = count < 64 ? count : 64;
    for (int i = 0; i < count; i++) {
        xs[i] = x;
        rs[i] = rows;
    }
    return count;
}

/* y[i] = x @ w[i]^T + bias[i] for up to 64 weights (n[i], k) sharing x (rows, k): q, k and v; gate and up. */
void dense_gemv_team(int count, const void *const *w, const void *const *bias, const int64_t *n, int kind,
                     int out_kind, int64_t k, const void *x, int64_t rows, void *const *y, int threads) {
    const void *xs[64];
    int64_t rs[64];
    count = shared_x(count, x, rows, xs, rs);
    dense_gemv_groups(count, w, bias, n, kind, out_kind, k, xs, rs, y, threads);
}
