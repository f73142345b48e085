/* Decode attention on the CPU: one new token's query per (sequence, head) over its cached keys and values.

   torch's scaled_dot_product_attention spends ~3 us per (sequence, head) here whatever the length, which at
   decode batches (tens of thousands of pairs, a few dozen positions each) reads the cache at a tenth of the
   memory's speed. This walks each pair's keys and values once, in fp32 (exact for bf16 and fp16 inputs),
   16 lanes at a time so that the compiler vectorizes it without reassociating. */

#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds here: no bit-identity to keep, unlike int4.c */
#include "attention_rows.h"

#ifdef __AVX512F__
/* acc (16 * nv floats) = sum over unmasked l of p[l] * v[l] for rows of a 16-bit kind `stride` bytes apart; nv a
   constant at each call (4 or 8), so that the sums stay in registers. */
static inline void weighted_rows_half(float *acc, const float *p, const uint8_t *m, const rows_t *c, int64_t length,
                                      int64_t stride, const int nv, int kind) {
    __m512 sum[8];
    for (int i = 0; i < nv; i++) sum[i] = _mm512_setzero_ps();
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) continue;
        const uint16_t *value = (const uint16_t *)value_at(c, l, stride);
        __m512 pv = _mm512_set1_ps(p[l]);
        for (int i = 0; i < nv; i++) sum[i] = _mm512_fmadd_ps(pv, half16(value + 16 * i, kind), sum[i]);
    }
    for (int i = 0; i < nv; i++) _mm512_storeu_ps(acc + 16 * i, sum[i]);
}
#endif

/* One (sequence, query head) of a head-major cache: keys first (the values prefetched meanwhile, so that the
   second pass finds them in L2), then values. `s` holds `length` floats. */
static void pair_two_pass(const float *qf, const rows_t *c, const uint8_t *m, int kind, int64_t item,
                          int64_t length, int64_t dim, int64_t ks, int64_t vs, float scale, const float *sink,
                          float *s, float *row, float *acc) {
    float top = -INFINITY;
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) {
            s[l] = -INFINITY;
            continue;
        }
        const char *key = key_at(c, l, ks * item), *value = value_at(c, l, vs * item);
        for (int64_t at = 0; at < dim * item; at += 64) {  /* latency, not bandwidth, bounds a lone walk */
            __builtin_prefetch(key + 4 * ks * item + at, 0, 1);
            __builtin_prefetch(value + at, 0, 1);
        }
        if (kind != KIND_F32) {
            s[l] = dot_half(qf, (const uint16_t *)key, dim, kind) * scale;
        } else {
            load_row(key, kind, dim, row);
            s[l] = dot(qf, row, dim) * scale;
        }
        top = s[l] > top ? s[l] : top;
    }
    memset(acc, 0, dim * sizeof(float));
    if (top == -INFINITY) return;  /* every position masked: zeros */
    float total = softmax_weights(s, m, length, top) + sink_term(sink, 0, top);
#ifdef __AVX512F__
    if (kind != KIND_F32 && (dim == 64 || dim == 128)) {  /* the sums held in registers across positions */
        if (dim == 64)
            weighted_rows_half(acc, s, m, c, length, vs * item, 4, kind);
        else
            weighted_rows_half(acc, s, m, c, length, vs * item, 8, kind);
        for (int64_t d = 0; d < dim; d++) acc[d] /= total;
        return;
    }
#endif
    for (int64_t l = 0; l < length; l++) {
        if (!m[l]) continue;
        float p = s[l];
        const char *value = value_at(c, l, vs * item);
        if (kind != KIND_F32) {
            axpy_half(acc, p, (const uint16_t *)value, dim, kind);
        } else {
            load_row(value, kind, dim, row);
            for (int64_t d = 0; d < dim; d++) acc[d] += p * row[d];
        }
    }
    for (int64_t d = 0; d < dim; d++) acc[d] /= total;
}

/* out[b, h] = softmax(scale * q[b, h] . k[b, h / group, l] over unmasked l < length) . v[b, h / group, l].
   Strides in elements; each row of `dim` values is contiguous; mask (b, l) is one byte per position, 0 =
   masked. A row with every position masked gets zeros.

   Work items [begin, end) of batch * ceil(kv_heads / block): one sequence's `block` consecutive kv heads and
   all their query heads, each key and value row read once for the group. Each position's rows of the block
   are read together: in the position-major cache across a link (l, b, kv_head, d) they are one contiguous
   run, where one head at a time strides a page or more per position (the caller picks block 1 for
   head-major caches, whose heads are apart anyway). `decode_attention_team` runs the items on torch's OpenMP
   pool; where that pool is not shared, the caller hands out ranges itself (native/__init__.py).

   source (or NULL): per sequence b, the sequence whose rows hold b's positions below `shared`, at `shift[b]`
   positions earlier (rows_t). The result is the same bits: only where the rows are read from changes.

   row_map (or NULL): sequence b of q, mask and out is the cache's row row_map[b] (the rows of a batch still
   generating; source and shift are indexed by cache rows).

   sinks (or NULL): each query head's sink logit (fp32, gpt-oss), a term of its softmax's denominator alone. */
void decode_attention(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int kind,
                      int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,
                      const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                      int64_t mask_stride, const int64_t *out_strides, float scale, int64_t block,
                      const int64_t *source, const int64_t *shift, int64_t shared, const int64_t *row_map,
                      const float *sinks, int64_t begin, int64_t end) {
    int64_t item = kind == KIND_F32 ? 4 : 2, group = heads / kv_heads;
    int64_t blocks = (kv_heads + block - 1) / block, max_q = block * group;
    /* rows at 64-byte boundaries: AVX-512 loads and stores that split cache lines cost twice */
    int64_t ds = (dim + 15) / 16 * 16, mq = (max_q + 15) / 16 * 16;
    int64_t sl = (length + 15) / 16 * 16;  /* a head's scores (head-major: each of the group's heads its own) */
    int two_pass = kind != KIND_F32 && block > 1 && dim % 16 == 0 && dim <= 128 && max_q <= 16;
    int64_t floats = 2 * mq * ds + 2 * mq + ds + (block == 1 ? group : two_pass ? 16 : 0) * sl;  /* 64-byte mult. */
    float *qf = aligned_alloc(64, sizeof(float) * floats);
    if (!qf) return;
    float *acc = qf + mq * ds, *top = acc + mq * ds, *total = top + mq, *row = total + mq, *scores = row + ds;
    int direct = kind != KIND_F32 && group == 1;  /* 16-bit rows multiplied as read, not converted first */
    for (int64_t it = begin; it < end; it++) {
        int64_t b = it / blocks, kh0 = (it % blocks) * block, kh1 = kh0 + block < kv_heads ? kh0 + block : kv_heads;
        int64_t nq = (kh1 - kh0) * group, h0 = kh0 * group;
        for (int64_t j = 0; j < nq; j++) {
            load_row((const char *)q + (b * q_strides[0] + (h0 + j) * q_strides[1]) * item, kind, dim, qf + j * ds);
            top[j] = -INFINITY;
            total[j] = 0;
        }
        int64_t cb = row_map ? row_map[b] : b;  /* b's row of the cache */
        const char *kb = (const char *)k + cb * k_strides[0] * item, *vb = (const char *)v + cb * v_strides[0] * item;
        rows_t c = {kb, vb, kb, vb, 0};
        if (source && source[cb] != cb) {  /* positions below `shared`: the source row's, `shift` earlier there */
            c.k0 = (const char *)k + (source[cb] * k_strides[0] - shift[cb] * k_strides[2]) * item;
            c.v0 = (const char *)v + (source[cb] * v_strides[0] - shift[cb] * v_strides[2]) * item;
            c.split = shared;
        }
        rows_t ch = heads_of(c, kh0 * k_strides[1] * item, kh0 * v_strides[1] * item);
        const uint8_t *m = mask + b * mask_stride;
#ifdef __AVX512F__
        if (block == 1 && kind != KIND_F32 && group > 1 && (dim == 64 || dim == 128)) {
            const uint16_t *qb = (const uint16_t *)q + b * q_strides[0] + h0 * q_strides[1];
            group_two_pass_half(qf, ds, qb, q_strides[1], nq, &ch, m, length, k_strides[2] * item, v_strides[2] * item,
                                scale, sinks ? sinks + h0 : NULL, scores, sl, acc, dim / 16, kind);
            for (int64_t j = 0; j < nq; j++)
                store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim,
                          acc + j * ds);
            continue;
        }
#endif
#ifdef __AVX512F__
        if (two_pass) {
            const uint16_t *qb = (const uint16_t *)q + b * q_strides[0] + h0 * q_strides[1];
            block_two_pass_half(qf, ds, qb, q_strides[1], kh1 - kh0, group, &ch, k_strides[1] * item, k_strides[2] * item,
                                v_strides[1] * item, v_strides[2] * item, m, length, scale, sinks ? sinks + h0 : NULL,
                                scores, acc, dim / 16, kind);
            for (int64_t j = 0; j < nq; j++)
                store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim,
                          acc + j * ds);
            continue;
        }
#endif
#ifdef SIMD_LANES8  /* AVX-512 CPUs too: 2.2-2.6x their head-at-a-time walk (SmolLM2's 9 / 3 heads of 64) */
        if (block == 1 && kind == KIND_F32 && group > 1 && dim % 8 == 0) {
            group_two_pass_f32(qf, ds, nq, &ch, m, length, k_strides[2] * item, v_strides[2] * item, scale,
                               sinks ? sinks + h0 : NULL, scores, sl, acc, dim);
            for (int64_t j = 0; j < nq; j++)
                store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim,
                          acc + j * ds);
            continue;
        }
#endif
        if (block == 1) {
            for (int64_t j = 0; j < nq; j++) {
                pair_two_pass(qf + j * ds, &ch, m, kind, item, length, dim, k_strides[2], v_strides[2], scale,
                              sinks ? sinks + h0 + j : NULL, scores, row, acc);
                store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim, acc);
            }
            continue;
        }
        memset(acc, 0, nq * ds * sizeof(float));
        /* position-major: one pass, keys and values of a position together (online softmax: the running sums
           are rescaled when a larger score comes) */
        for (int64_t l = 0; l < length; l++) {
            if (!m[l]) continue;
            for (int64_t kh = kh0; kh < kh1; kh++) {
                const char *key = key_at(&c, l, k_strides[2] * item) + kh * k_strides[1] * item;
                const char *value = value_at(&c, l, v_strides[2] * item) + kh * v_strides[1] * item;
                for (int64_t at = 0; at < dim * item; at += 64) {  /* latency, not bandwidth, bounds a lone walk */
                    __builtin_prefetch(key + 4 * k_strides[2] * item + at, 0, 1);
                    __builtin_prefetch(value + 4 * v_strides[2] * item + at, 0, 1);
                }
                float sc[MAX_GROUP], *a0 = acc + (kh - kh0) * group * ds;
                int64_t j0 = (kh - kh0) * group;
                if (direct) {
                    sc[0] = dot_half(qf + j0 * ds, (const uint16_t *)key, dim, kind) * scale;
                } else {
                    load_row(key, kind, dim, row);
                    for (int64_t g = 0; g < group; g++) sc[g] = dot(qf + (j0 + g) * ds, row, dim) * scale;
                }
                for (int64_t g = 0; g < group; g++) {
                    int64_t j = j0 + g;
                    if (sc[g] > top[j]) {
                        float shrink = expf(top[j] - sc[g]);  /* 0 for the first position */
                        for (int64_t d = 0; d < dim; d++) a0[g * ds + d] *= shrink;
                        total[j] *= shrink;
                        top[j] = sc[g];
                    }
                    sc[g] = expf(sc[g] - top[j]);
                    total[j] += sc[g];
                }
                if (direct) {
                    axpy_half(a0, sc[0], (const uint16_t *)value, dim, kind);
                } else {
                    load_row(value, kind, dim, row);
                    for (int64_t g = 0; g < group; g++)
                        for (int64_t d = 0; d < dim; d++) a0[g * ds + d] += sc[g] * row[d];
                }
            }
        }
        for (int64_t j = 0; j < nq; j++) {
            if (total[j] > 0) total[j] += sink_term(sinks, h0 + j, top[j]);
            if (total[j] > 0)  /* else every position masked: zeros */
                for (int64_t d = 0; d < dim; d++) acc[j * ds + d] /= total[j];
            store_row((char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item, kind, dim, acc + j * ds);
        }
    }
    free(qf);
}

/* decode_attention over all `items`, in about 4 ranges a thread, on `threads` OpenMP threads (gemv.c's note). */
void decode_attention_team(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int kind,
                           int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,
                           const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                           int64_t mask_stride, const int64_t *out_strides, float scale, int64_t block,
                           const int64_t *source, const int64_t *shift, int64_t shared, const int64_t *row_map,
                           const float *sinks, int64_t items, int threads) {
    int64_t step = (items + 4 * threads - 1) / (4 * threads), ranges = (items + step - 1) / step;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && ranges > 1)
    for (int64_t r = 0; r < ranges; r++)
        decode_attention(q, k, v, mask, out, kind, batch, heads, kv_heads, length, dim, q_strides, k_strides,
                         v_strides, mask_stride, out_strides, scale, block, source, shift, shared, row_map, sinks,
                         r * step,
                         (r + 1) * step < items ? (r + 1) * step : items);
}
