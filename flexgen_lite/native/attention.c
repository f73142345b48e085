/* Decode attention on the CPU: one new token's query per (sequence, head) over its cached keys and values.

   torch's scaled_dot_product_attention spends ~3 us per (sequence, head) here whatever the length, which at
   decode batches (tens of thousands of pairs, a few dozen positions each) reads the cache at a tenth of the
   memory's speed. This walks each pair's keys and values once, in fp32 (exact for bf16 and fp16 inputs),
   16 lanes at a time so that the compiler vectorizes it without reassociating. */

#pragma GCC optimize("fp-contract=fast")  /* fused multiply-adds here: no bit-identity to keep, unlike int4.c */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2 };
#define LANES 16
#define MAX_DIM 512

/* n values of `kind` at `src` as fp32 into `dst`. */
static inline void load_row(const void *src, int kind, int64_t n, float *dst) {
    if (kind == KIND_F32) {
        memcpy(dst, src, n * sizeof(float));
    } else if (kind == KIND_BF16) {
        const uint16_t *s = src;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)s[i] << 16;
            memcpy(dst + i, &u, 4);
        }
    } else {
        const _Float16 *s = src;
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i];
    }
}

static inline void store_row(void *dst, int kind, int64_t n, const float *src) {
    if (kind == KIND_F32) {
        memcpy(dst, src, n * sizeof(float));
    } else if (kind == KIND_BF16) {
        uint16_t *d = dst;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, src + i, 4);
            d[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  /* nearest even; no NaNs reach here */
        }
    } else {
        _Float16 *d = dst;
        for (int64_t i = 0; i < n; i++) d[i] = (_Float16)src[i];
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    for (; i < n; i++) acc[0] += a[i] * b[i];
    float s = 0;
    for (int j = 0; j < LANES; j++) s += acc[j];
    return s;
}

#ifdef __AVX512F__
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

static inline float dot_bf16(const float *a, const uint16_t *b, int64_t n) {
    int64_t i = 0;
    float s = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), bf16x16(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) {
        uint32_t u = (uint32_t)b[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        s += a[i] * f;
    }
    return s;
}

/* acc += p * b (n bf16 values) */
static inline void axpy_bf16(float *acc, float p, const uint16_t *b, int64_t n) {
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, bf16x16(b + i), _mm512_loadu_ps(acc + i)));
#endif
    for (; i < n; i++) {
        uint32_t u = (uint32_t)b[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        acc[i] += p * f;
    }
}

/* out[b, h] = softmax(scale * q[b, h] . k[b, h / group, l] over unmasked l < length) . v[b, h / group, l].
   Strides in elements; each row of `dim` values is contiguous; mask (b, l) is one byte per position, 0 =
   masked. A row with every position masked gets zeros. `scores` holds `length` floats per thread. */
void decode_attention(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int kind,
                      int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,
                      const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                      int64_t mask_stride, const int64_t *out_strides, float scale, float *scores, int threads) {
    int64_t item = kind == KIND_F32 ? 4 : 2, group = heads / kv_heads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < batch * heads; pair++) {
        int64_t b = pair / heads, h = pair % heads, kh = h / group;
        float qf[MAX_DIM], row[MAX_DIM], acc[MAX_DIM];
#ifdef _OPENMP
        float *s = scores + (int64_t)omp_get_thread_num() * length;
#else
        float *s = scores;
#endif
        load_row((const char *)q + (b * q_strides[0] + h * q_strides[1]) * item, kind, dim, qf);
        const char *kb = (const char *)k + (b * k_strides[0] + kh * k_strides[1]) * item;
        const char *vb = (const char *)v + (b * v_strides[0] + kh * v_strides[1]) * item;
        const uint8_t *m = mask + b * mask_stride;
        float top = -INFINITY;
        for (int64_t l = 0; l < length; l++) {
            if (!m[l]) continue;
            const char *key = kb + l * k_strides[2] * item;
            for (int64_t at = 0; at < dim * item; at += 64) {  /* the memory's latency, not its bandwidth, bounds this */
                __builtin_prefetch(key + 4 * k_strides[2] * item + at);
                __builtin_prefetch(vb + l * v_strides[2] * item + at);
            }
            if (kind == KIND_BF16) {
                s[l] = dot_bf16(qf, (const uint16_t *)key, dim) * scale;
            } else {
                load_row(key, kind, dim, row);
                s[l] = dot(qf, row, dim) * scale;
            }
            top = s[l] > top ? s[l] : top;
        }
        memset(acc, 0, dim * sizeof(float));
        float total = 0;
        if (top != -INFINITY) {
            for (int64_t l = 0; l < length; l++) {
                if (!m[l]) continue;
                float p = expf(s[l] - top);
                total += p;
                const char *value = vb + l * v_strides[2] * item;
                if (kind == KIND_BF16) {
                    axpy_bf16(acc, p, (const uint16_t *)value, dim);
                } else {
                    load_row(value, kind, dim, row);
                    for (int64_t d = 0; d < dim; d++) acc[d] += p * row[d];
                }
            }
            for (int64_t d = 0; d < dim; d++) acc[d] /= total;
        }
        store_row((char *)out + (b * out_strides[0] + h * out_strides[1]) * item, kind, dim, acc);
    }
}
