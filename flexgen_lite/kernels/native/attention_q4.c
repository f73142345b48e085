/* Decode attention over a 4-bit KV cache read as it is stored (quantization.py: codes two a byte, low nibble
   first, in groups along head_dim, each group with an fp16 scale and minimum), so a CPU attending a compressed
   cache reads ~4.5 bits a value instead of dequantizing the whole cache into a dense buffer every step.

   Values are code * scale + minimum in fp32: a lone query head per kv head works from the codes alone (dot_q4,
   axpy_q4); grouped heads share rows rebuilt 16 positions at a time into L1 (tile_*); AVX-512's 16 lanes, or
   AVX2's 8 (most desktop CPUs). The scalar path rebuilds a row as compression.dequantize_reference does (clamped
   to fp16's range, rounded to the attention's kind). Scores and softmax follow attention.c's (fp32 inside). The
   new token's k and v, not yet stored, come dense (k_new, v_new) and stand at cache slot `skip`, whose stored
   row is ignored (it holds an older position in a ring, or nothing yet). */

#include "attention_q4_rows.h"

/* The scores of one kv head's `group` query heads (qf, ds apart) at one position, into s (sl apart): from its
   codes, or (codes NULL) from the new token's dense row `dense`. */
static inline void head_scores(const float *qf, const uint16_t *qb, const float *qsum, int64_t ds, int64_t group,
                               const uint8_t *codes, const _Float16 *sc, const _Float16 *mn, const void *dense,
                               int64_t dim, int64_t gs, int kind, float scale, float *row, float *s, int64_t sl) {
#if defined(__AVX512BW__) || defined(SIMD_AVX2)
    if (codes && lone_head(group, gs, dim)) {  /* straight from the codes: no row to share */
#ifdef __AVX512BF16__
        if (qb) {
            s[0] = dot_q4_bf16(qb, qsum, codes, sc, mn, dim) * scale;
            return;
        }
#endif
        s[0] = dot_q4(qf, qsum, codes, sc, mn, dim) * scale;
        return;
    }
#endif
    (void)qb;
    position_row(codes, sc, mn, dense, dim, gs, kind, row);
    for (int64_t j = 0; j < group; j++) s[j * sl] = dot_f32(qf + j * ds, row, dim) * scale;
}

/* acc (ds apart) += p (sl apart) times one kv head's value row at one position (codes, or the dense row) */
static inline void head_values(float *acc, float *extra, int64_t ds, int64_t group, const float *p, int64_t sl,
                               const uint8_t *codes, const _Float16 *sc, const _Float16 *mn, const void *dense,
                               int64_t dim, int64_t gs, int kind, float *row) {
#if defined(__AVX512BW__) || defined(SIMD_AVX2)
    if (codes && lone_head(group, gs, dim)) {
        axpy_q4(acc, extra, p[0], codes, sc, mn, dim);
        return;
    }
#endif
    position_row(codes, sc, mn, dense, dim, gs, kind, row);
    for (int64_t j = 0; j < group; j++) axpy_f32(acc + j * ds, p[j * sl], row, dim);
}

/* exp(s[l] - top) into s[l] for the n scores (0 for -inf: a position not seen; all 0 where none is), their sum: 16
   at a time by exp16 where the CPU has AVX-512 (8 by exp8 with AVX2), as attention.c's softmax (a scalar expf per
   position was ~10% of this kernel's time at 1024 positions) */
static float softmax_weights(float *s, int64_t n) {
    float top = -INFINITY, total = 0;
    for (int64_t l = 0; l < n; l++) top = s[l] > top ? s[l] : top;
    if (top == -INFINITY) {
        memset(s, 0, sizeof(float) * n);
        return 0.0f;
    }
    int64_t l = 0;
#ifdef __AVX512F__
    __m512 sum = _mm512_setzero_ps(), t = _mm512_set1_ps(top), none = _mm512_set1_ps(-INFINITY);
    for (; l + 16 <= n; l += 16) {
        __m512 x = _mm512_loadu_ps(s + l);
        __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, none, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(x, t)));
        _mm512_storeu_ps(s + l, p);
        sum = _mm512_add_ps(sum, p);
    }
    total = _mm512_reduce_add_ps(sum);
#elif defined(SIMD_AVX2)
    __m256 sum = _mm256_setzero_ps(), t = _mm256_set1_ps(top), none = _mm256_set1_ps(-INFINITY);
    for (; l + 8 <= n; l += 8) {
        __m256 x = _mm256_loadu_ps(s + l);
        __m256 p = _mm256_and_ps(_mm256_cmp_ps(x, none, _CMP_NEQ_OQ), exp8(_mm256_sub_ps(x, t)));
        _mm256_storeu_ps(s + l, p);
        sum = _mm256_add_ps(sum, p);
    }
    total = hsum8(sum);
#endif
    for (; l < n; l++) {
        s[l] = expf(s[l] - top);  /* 0 for -inf */
        total += s[l];
    }
    return total;
}

/* Items [begin, end) of (batch row, block of `block` kv heads): in a position-major cache one position's rows of
   the block's heads are adjacent, read together (block 1 where heads are apart). q (B, heads, d) and out by (b, h)
   strides in elements; codes (rows, kv_heads, length, bytes) by (row, head, position) strides in bytes, scales
   and minima (.., groups) in elements, K's and V's alike; k_new, v_new (B, kv_heads, d) by `new_strides` (NULL:
   no new token); mask (B, length) of bytes, position `skip` the new token's; rows[b]: the cache row of batch
   row b (NULL: b). */
void decode_attention_q4(const void *q, const int64_t *q_strides, int kind, const uint8_t *k_codes,
                         const _Float16 *k_scale, const _Float16 *k_min, const uint8_t *v_codes,
                         const _Float16 *v_scale, const _Float16 *v_min, const int64_t *code_strides,
                         const int64_t *stat_strides, const void *k_new, const void *v_new,
                         const int64_t *new_strides, const uint8_t *mask, int64_t mask_stride, const int64_t *rows,
                         void *out, const int64_t *out_strides, int64_t heads, int64_t kv_heads, int64_t length,
                         int64_t skip, int64_t dim, int64_t gs, float scale, int64_t block, int64_t begin,
                         int64_t end) {
    int64_t item = kind == KIND_F32 ? 4 : 2, group = heads / kv_heads, nq_max = block * group;
    int64_t ds = (dim + 15) / 16 * 16, sl = (length + 1 + 15) / 16 * 16, blocks = (kv_heads + block - 1) / block;
    int64_t ng = (dim + gs - 1) / gs, ngs = (ng + 15) / 16 * 16;  /* per head: q's sums and the minima's share */
    float *qf = aligned_alloc(64, sizeof(float) * (2 * nq_max * ds + ds + nq_max * sl + 16 * ((nq_max + 15) / 16)
                                                   + 2 * nq_max * ngs + 16 * ds));
    if (!qf) return;
    float *acc = qf + nq_max * ds, *row = acc + nq_max * ds, *scores = row + ds, *total = scores + nq_max * sl;
    float *qsum = total + 16 * ((nq_max + 15) / 16), *extra = qsum + nq_max * ngs, *tile = extra + nq_max * ngs;
#if defined(__AVX512BW__) || defined(SIMD_AVX2)
    int tiled = group > 1 && gs == 64 && dim % 64 == 0;  /* grouped heads: positions 16 at a time */
#else
    int tiled = 0;
#endif
    int far = code_strides[2] > code_strides[1];  /* position-major: prefetch_position */
    for (int64_t it = begin; it < end; it++) {
        int64_t b = it / blocks, kh0 = (it % blocks) * block, kh1 = kh0 + block < kv_heads ? kh0 + block : kv_heads;
        int64_t r = rows ? rows[b] : b, h0 = kh0 * group, nq = (kh1 - kh0) * group;
        for (int64_t j = 0; j < nq; j++) {
            load_kind((const char *)q + (b * q_strides[0] + (h0 + j) * q_strides[1]) * item, kind, dim, qf + j * ds);
            for (int64_t g = 0; g < ng; g++) {
                float sum = 0;
                for (int64_t d = g * gs; d < (g + 1) * gs && d < dim; d++) sum += qf[j * ds + d];
                qsum[j * ngs + g] = sum;
                extra[j * ngs + g] = 0;
            }
        }
        const uint16_t *qbs[64], *const *qb = NULL;  /* a bf16 attention's lone heads: q's rows as given */
        if (kind == KIND_BF16 && group == 1 && nq <= 64) {
            for (int64_t j = 0; j < nq; j++)
                qbs[j] = (const uint16_t *)((const char *)q + (b * q_strides[0] + (h0 + j) * q_strides[1]) * item);
            qb = qbs;
        }
        const uint8_t *m = mask + b * mask_stride;
        int64_t span = (kh1 - kh0) * code_strides[1], stat_span = (kh1 - kh0) * stat_strides[1] * 2;
        int own = k_new && skip >= 0 && skip < length && m[skip];
        int64_t c0 = r * code_strides[0], s0 = r * stat_strides[0];
        int64_t code_at = c0 + kh0 * code_strides[1], stat_at = s0 + kh0 * stat_strides[1];  /* the block's first */
#if defined(__AVX512BW__) || defined(SIMD_AVX2)
        for (int64_t kh = kh0; kh < kh1 && tiled; kh++)
            tiled_head(0, qf, acc, (kh - kh0) * group, ds, group, k_codes + c0 + kh * code_strides[1], k_scale,
                       k_min, s0 + kh * stat_strides[1], code_strides[2], stat_strides[2], m, skip, length, far,
                       dim, scale, scores, sl, tile);
#endif
        for (int64_t l = tiled ? length : 0; l <= length; l++) {
            int seen = l < length ? l != skip && m[l] : own;
            if (far && l + AHEAD < length)
                prefetch_position(k_codes + code_at, k_scale + stat_at, k_min + stat_at, l + AHEAD, code_strides[2],
                                  stat_strides[2], span, stat_span);
            for (int64_t kh = kh0; kh < kh1; kh++) {
                int64_t j = (kh - kh0) * group, at = s0 + kh * stat_strides[1] + l * stat_strides[2];
                if (!seen) {
                    for (int64_t g = 0; g < group; g++) scores[(j + g) * sl + l] = -INFINITY;
                } else if (l < length) {
                    head_scores(qf + j * ds, qb ? qb[kh - kh0] : NULL, qsum + j * ngs, ds, group,
                                k_codes + c0 + kh * code_strides[1] + l * code_strides[2], k_scale + at, k_min + at,
                                NULL, dim, gs, kind, scale, row, scores + j * sl + l, sl);
                } else {
                    const char *dense = (const char *)k_new + (b * new_strides[0] + kh * new_strides[1]) * item;
                    head_scores(qf + j * ds, NULL, NULL, ds, group, NULL, NULL, NULL, dense, dim, gs, kind, scale,
                                row, scores + j * sl + l, sl);
                }
            }
        }
        for (int64_t l = 0; l < length && tiled; l++)  /* the tiles scored every position */
            if (l == skip || !m[l])
                for (int64_t j = 0; j < nq; j++) scores[j * sl + l] = -INFINITY;
        for (int64_t j = 0; j < nq; j++) total[j] = softmax_weights(scores + j * sl, length + 1);
        memset(acc, 0, sizeof(float) * nq * ds);
#if defined(__AVX512BW__) || defined(SIMD_AVX2)
        for (int64_t kh = kh0; kh < kh1 && tiled; kh++)
            tiled_head(1, qf, acc, (kh - kh0) * group, ds, group, v_codes + c0 + kh * code_strides[1], v_scale,
                       v_min, s0 + kh * stat_strides[1], code_strides[2], stat_strides[2], m, skip, length, far,
                       dim, scale, scores, sl, tile);
#endif
        for (int64_t l = tiled ? length : 0; l <= length; l++) {
            if (far && l + AHEAD < length)
                prefetch_position(v_codes + code_at, v_scale + stat_at, v_min + stat_at, l + AHEAD, code_strides[2],
                                  stat_strides[2], span, stat_span);
            if (!(l < length ? l != skip && m[l] : own)) continue;
            for (int64_t kh = kh0; kh < kh1; kh++) {
                int64_t j = (kh - kh0) * group, at = s0 + kh * stat_strides[1] + l * stat_strides[2];
                const char *dense = (const char *)v_new + (b * new_strides[0] + kh * new_strides[1]) * item;
                int stored = l < length;
                head_values(acc + j * ds, extra + j * ngs, ds, group, scores + j * sl + l, sl,
                            stored ? v_codes + c0 + kh * code_strides[1] + l * code_strides[2] : NULL,
                            v_scale + at, v_min + at, stored ? NULL : dense, dim, gs, kind, row);
            }
        }
        for (int64_t j = 0; j < nq; j++) {
            char *o = (char *)out + (b * out_strides[0] + (h0 + j) * out_strides[1]) * item;
            for (int64_t d = 0; d < dim; d++) {  /* every position masked: zeros */
                float a = acc[j * ds + d] + extra[j * ngs + d / gs];
                kind_put(o, kind, d, total[j] > 0 ? a / total[j] : 0.0f);
            }
        }
    }
    free(qf);
}

/* decode_attention_q4 over all `items`, in about 4 ranges a thread, on `threads` OpenMP threads (gemv.c's note) */
void decode_attention_q4_team(const void *q, const int64_t *q_strides, int kind, const uint8_t *k_codes,
                              const _Float16 *k_scale, const _Float16 *k_min, const uint8_t *v_codes,
                              const _Float16 *v_scale, const _Float16 *v_min, const int64_t *code_strides,
                              const int64_t *stat_strides, const void *k_new, const void *v_new,
                              const int64_t *new_strides, const uint8_t *mask, int64_t mask_stride,
                              const int64_t *rows, void *out, const int64_t *out_strides, int64_t heads,
                              int64_t kv_heads, int64_t length, int64_t skip, int64_t dim, int64_t gs, float scale,
                              int64_t block, int64_t items, int threads) {
    int64_t step = (items + 4 * threads - 1) / (4 * threads), ranges = (items + step - 1) / step;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && ranges > 1)
    for (int64_t r = 0; r < ranges; r++)
        decode_attention_q4(q, q_strides, kind, k_codes, k_scale, k_min, v_codes, v_scale, v_min, code_strides,
                            stat_strides, k_new, v_new, new_strides, mask, mask_stride, rows, out, out_strides, heads,
                            kv_heads, length, skip, dim, gs, scale, block, r * step,
                            (r + 1) * step < items ? (r + 1) * step : items);
}
