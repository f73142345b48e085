/* A decode step's decoder layers in one call (a Llama-family model on a CPU, a few rows, everything in memory).

   At one to a few rows a layer is ~1 ms of memory reads split into ~25 torch ops and C calls from Python, each
   10-25 us of dispatch: Python, not memory, was half the step. Here each layer is the same kernels the eager
   path calls (gemv.c, int4.c's gemv, attention.c, elementwise.c), called from C, with the eager path's bits:

     x = rms_norm(h); q, k, v = x W^T (+ bias); [q, k = rms_norm per head (Qwen3)]; q, k = rope(q, k);
     cache[start] = k, v
     h = h + attention(q, cache[:start + 1]) Wo^T;  x = rms_norm(h)
     h = h + (silu(x Wg^T) * x Wu^T) Wd^T

   every op rounded to the element kind where torch's op rounds (residual sums, SiLU, its product), and SiLU's exp
   the one torch's kernel takes (below). The engine checks the layers' logits against its eager path's. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kinds.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { Q, K, V, O, GATE, UP, DOWN, MATRICES };

struct matrix {  /* (n, k): dense of the layer's kind (scale NULL), or 4-bit codes in int4.c's layout */
    const void *w, *bias, *scale, *minimum;
    int64_t n, k, group;
};

struct layer {
    int kind, norm_width, exp_lanes;
    int64_t rows, hidden, heads, kv_heads, dim, ffn;
    float eps, scale;
    const void *attn_norm, *mlp_norm, *q_norm, *k_norm;  /* q_norm, k_norm: (dim) each, or NULL */
    struct matrix m[MATRICES];
    void *k_cache, *v_cache;  /* element strides (row, head, position); rows of `dim` contiguous */
    int64_t k_strides[3], v_strides[3], block;  /* block: kv heads per attention work item (attention.c) */
    const void *exp_fn;  /* fp32 SiLU: torch's vector exp (Sleef, exp_lanes wide), or NULL */
    int64_t exp_step;  /* torch's elements per iteration of its vector loop */
    void *work;  /* decode_layer_scratch bytes */
};

struct step {  /* what changes from step to step: shared by a batch's layers */
    void *h;  /* (rows, hidden) of the kind, updated in place */
    const void *cos, *sin;  /* (rows, dim) each, or NULL: no rotary embedding */
    const uint8_t *mask;  /* (rows, mask_stride): position l of row r seen when nonzero, l <= start */
    int64_t mask_stride, start;
    const int64_t *source, *shift;  /* a shared prompt prefix's rows (attention.c), or NULL */
    int64_t shared;
    int64_t threads, silu_chunk;  /* the teams' threads; SiLU's values per thread as torch splits them */
    int64_t rows;  /* the rows computed (h's, the mask's, cos/sin's): at most the layers' rows */
    const int64_t *row_map;  /* the cache's row of each, or NULL: the same rows (the batch's rows still generating) */
};

void rms_norm_range(const void *x, const void *w, void *out, int kind, int64_t n, int64_t xs, float eps, int width,
                    int64_t r0, int64_t r1);
void rms_norm_team(const void *x, const void *w, void *out, int kind, int64_t rows, int64_t n, int64_t xs, float eps,
                   int width, int threads);
void rope_range(const void *x, const void *cos, const void *sin, void *out, int kind, int64_t heads, int64_t t,
                int64_t d, const int64_t *xst, const int64_t *cst, int64_t r0, int64_t r1);
void dense_gemv_team(int count, const void *const *w, const void *const *bias, const int64_t *n, int kind,
                     int out_kind, int64_t k, const void *x, int64_t rows, void *const *y, int threads);
void int4_gemv_team_many(int count, const uint8_t *const *packed, const _Float16 *const *scale,
                         const _Float16 *const *minimum, const int64_t *n, int64_t k, int64_t group_size, const void *x,
                         int kind, int64_t rows, void *const *y, int threads);
void decode_attention_team(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int kind,
                           int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,
                           const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                           int64_t mask_stride, const int64_t *out_strides, float scale, int64_t block,
                           const int64_t *source, const int64_t *shift, int64_t shared, const int64_t *row_map,
                           const float *sinks,
                           int64_t items, int threads);

/* ---- SiLU(gate) * up as torch's in-place ops give it -------------------------------------------------------- */

/* The widest Sleef exp this build can call (what torch's vector kernels use: 16 lanes on AVX-512, 8 on AVX2). */
int decode_layer_exp_lanes(void) {
#if defined(__AVX512F__)
    return 16;
#elif defined(__AVX2__)
    return 8;
#else
    return 0;
#endif
}

/* e[i] = exp(x[i]) for 16 values by torch's vector exp `fn` (lanes 16 or 8), or libm's expf (fn NULL). */
static void exp16_by(const float *x, float *e, const void *fn, int lanes) {
#if defined(__AVX512F__)
    if (fn && lanes == 16) {
        _mm512_storeu_ps(e, ((__m512 (*)(__m512))fn)(_mm512_loadu_ps(x)));
        return;
    }
#endif
#if defined(__AVX2__)
    if (fn && lanes == 8) {
        for (int h = 0; h < 16; h += 8) _mm256_storeu_ps(e + h, ((__m256 (*)(__m256))fn)(_mm256_loadu_ps(x + h)));
        return;
    }
#endif
    for (int i = 0; i < 16; i++) e[i] = expf(x[i]);
}

/* gate = round(round(gate / (1 + exp(-gate))) * up) over n values of `kind` (F.silu(gate, inplace=True).mul_(up)).
   bf16 and fp16 values come out the same from libm's expf and Sleef's (checked over every input). fp32 ones need
   torch's own: Sleef (fn) over each thread's chunk of `chunk` values in iterations of `step` (2 vectors), the
   chunk's tail by expf, as ATen's vectorized loop runs. The chunks on `threads` threads, as ATen's. */
void decode_silu_mul(void *gate, const void *up, int kind, int64_t n, const void *fn, int lanes, int64_t step,
                     int64_t chunk, int threads) {
    int64_t chunks = (n + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t c0 = c * chunk, c1 = c0 + chunk < n ? c0 + chunk : n, vec_end = fn ? c0 + (c1 - c0) / step * step : c0;
        for (int64_t i0 = c0; i0 < c1; i0 += 16) {
            int count = c1 - i0 < 16 ? (int)(c1 - i0) : 16;
            float x[16] = {0}, e[16];
            for (int i = 0; i < count; i++) x[i] = -kind_value(gate, kind, i0 + i);
            if (i0 + 16 <= vec_end)
                exp16_by(x, e, fn, lanes);
            else
                for (int i = 0; i < count; i++) e[i] = expf(x[i]);
            for (int i = 0; i < count; i++) {
                float s = kind_round(-x[i] / (1.0f + e[i]), kind);
                kind_put(gate, kind, i0 + i, s * kind_value(up, kind, i0 + i));
            }
        }
    }
}

/* ---- the layer ------------------------------------------------------------------------------------------------ */

static int64_t item_of(int kind) { return kind == KIND_F32 ? 4 : 2; }

/* Scratch bytes a layer of these sizes needs (the caller allocates them once): x, q, k, v, rotated q and k,
   attention out, o, gate, up, down; each 64-byte aligned. */
static int64_t scratch_sizes(const struct layer *L, int64_t *sizes) {
    int64_t r = L->rows, qd = L->heads * L->dim, kd = L->kv_heads * L->dim, total = 0, item = item_of(L->kind);
    int64_t counts[11] = {r * L->hidden, r * qd, r * kd, r * kd, r * qd, r * kd, r * qd, r * L->hidden,
                          r * L->ffn, r * L->ffn, r * L->hidden};
    for (int i = 0; i < 11; i++) {
        sizes[i] = (counts[i] * item + 63) / 64 * 64;
        total += sizes[i];
    }
    return total;
}

int64_t decode_layer_scratch(const struct layer *L) {
    int64_t sizes[11];
    return scratch_sizes(L, sizes);
}

/* y = x W^T (+ bias) for the matrices `which` (count of them, sharing x), as the eager path multiplies them:
   dense ones in one team (the bias added before rounding); 4-bit ones in one team too (each row's products are
   those of a team per matrix), the bias added after (torch's add). */
static void linears(const struct layer *L, const struct step *S, const int *which, int count, const void *x, void *const *y) {
    const void *w[MATRICES], *bias[MATRICES], *codes[MATRICES], *scale[MATRICES], *minimum[MATRICES];
    void *out[MATRICES], *qout[MATRICES];
    int64_t n[MATRICES], qn[MATRICES];
    int dense = 0, done[MATRICES] = {0};
    for (int i = 0; i < count; i++) {
        const struct matrix *m = &L->m[which[i]];
        if (!m->scale) {
            w[dense] = m->w, bias[dense] = m->bias, n[dense] = m->n, out[dense++] = y[i];
            continue;
        }
        if (done[i]) continue;
        int quantized = 0;
        for (int j = i; j < count; j++) {  /* the 4-bit ones of m's group size: one team */
            const struct matrix *o = &L->m[which[j]];
            if (!o->scale || o->group != m->group) continue;
            codes[quantized] = o->w, scale[quantized] = o->scale, minimum[quantized] = o->minimum;
            qn[quantized] = o->n, qout[quantized++] = y[j], done[j] = 1;
        }
        int4_gemv_team_many(quantized, (const uint8_t *const *)codes, (const _Float16 *const *)scale,
                            (const _Float16 *const *)minimum, qn, m->k, m->group, x, L->kind, S->rows, qout,
                            (int)S->threads);
    }
    for (int i = 0; i < count; i++) {
        const struct matrix *m = &L->m[which[i]];
        if (m->scale && m->bias)
            for (int64_t j = 0; j < S->rows * m->n; j++)
                kind_put(y[i], L->kind, j, kind_value(y[i], L->kind, j) + kind_value(m->bias, L->kind, j % m->n));
    }
    if (dense)
        dense_gemv_team(dense, w, bias, n, L->kind, L->kind, L->m[which[0]].k, x, S->rows, out, (int)S->threads);
}

static void rms_norm(const struct layer *L, const struct step *S, const void *x, const void *w, void *out) {
    if (S->rows * L->hidden >= (1 << 16))
        rms_norm_team(x, w, out, L->kind, S->rows, L->hidden, L->hidden, L->eps, L->norm_width, (int)S->threads);
    else
        rms_norm_range(x, w, out, L->kind, L->hidden, L->hidden, L->eps, L->norm_width, 0, S->rows);
}

/* h += round(y) elementwise, rounded (torch's residual add). */
static void add_into(void *h, const void *y, int kind, int64_t n) {
    for (int64_t i = 0; i < n; i++) kind_put(h, kind, i, kind_value(h, kind, i) + kind_value(y, kind, i));
}

static void decode_layer(const struct layer *L, const struct step *S) {
    int64_t sizes[11], item = item_of(L->kind), r = S->rows, d = L->dim, kd = L->kv_heads * d;
    scratch_sizes(L, sizes);
    char *buf[11], *at = L->work;
    for (int i = 0; i < 11; i++) buf[i] = at, at += sizes[i];
    char *x = buf[0], *q = buf[1], *k = buf[2], *v = buf[3], *qr = buf[4], *kr = buf[5], *attn = buf[6];
    char *o = buf[7], *gate = buf[8], *up = buf[9], *down = buf[10];

    rms_norm(L, S, S->h, L->attn_norm, x);
    linears(L, S, (int[]){Q, K, V}, 3, x, (void *[]){q, k, v});
    if (L->q_norm) {  /* each head's row of q and of k, in place (a row is read whole before it is written) */
        rms_norm_range(q, L->q_norm, q, L->kind, d, d, L->eps, L->norm_width, 0, r * L->heads);
        rms_norm_range(k, L->k_norm, k, L->kind, d, d, L->eps, L->norm_width, 0, r * L->kv_heads);
    }
    const char *qs = q, *ks = k;
    if (S->cos) {  /* q (rows, heads, 1, d) from the rows of q: strides (heads * d, d, heads * d) */
        int64_t qst[3] = {L->heads * d, d, L->heads * d}, kst[3] = {kd, d, kd}, cst[2] = {d, d};
        rope_range(q, S->cos, S->sin, qr, L->kind, L->heads, 1, d, qst, cst, 0, r * L->heads);
        rope_range(k, S->cos, S->sin, kr, L->kind, L->kv_heads, 1, d, kst, cst, 0, r * L->kv_heads);
        qs = qr, ks = kr;
    }
    for (int64_t row = 0; row < r; row++)
        for (int64_t head = 0; head < L->kv_heads; head++) {
            int64_t src = (row * kd + head * d) * item, at = S->row_map ? S->row_map[row] : row;
            memcpy((char *)L->k_cache + (at * L->k_strides[0] + head * L->k_strides[1] + S->start * L->k_strides[2])
                   * item, ks + src, d * item);
            memcpy((char *)L->v_cache + (at * L->v_strides[0] + head * L->v_strides[1] + S->start * L->v_strides[2])
                   * item, v + src, d * item);
        }
    int64_t qst[3] = {L->heads * d, d, d}, ost[3] = {L->heads * d, d, d};
    int64_t items = r * ((L->kv_heads + L->block - 1) / L->block);
    decode_attention_team(qs, L->k_cache, L->v_cache, S->mask, attn, L->kind, r, L->heads, L->kv_heads, S->start + 1,
                          d, qst, L->k_strides, L->v_strides, S->mask_stride, ost, L->scale, L->block, S->source,
                          S->shift, S->shared, S->row_map, NULL, items, (int)S->threads);
    linears(L, S, (int[]){O}, 1, attn, (void *[]){o});
    add_into(S->h, o, L->kind, r * L->hidden);

    rms_norm(L, S, S->h, L->mlp_norm, x);
    linears(L, S, (int[]){GATE, UP}, 2, x, (void *[]){gate, up});
    decode_silu_mul(gate, up, L->kind, r * L->ffn, L->exp_fn, L->exp_lanes, L->exp_step, S->silu_chunk,
                    (int)S->threads);
    linears(L, S, (int[]){DOWN}, 1, gate, (void *[]){down});
    add_into(S->h, down, L->kind, r * L->hidden);
}

/* `count` layers in turn over the step's hidden states. */
void decode_layers(const struct layer *layers, int64_t count, const struct step *S) {
    for (int64_t i = 0; i < count; i++) decode_layer(&layers[i], S);
}
