/* Decode attention over a 4-bit KV cache read as it is stored (quantization.py: codes two a byte, low nibble
   first, in groups along head_dim, each group with an fp16 scale and minimum), so a CPU attending a compressed
   cache reads ~4.5 bits a value instead of dequantizing the whole cache into a dense buffer every step.

   Values are code * scale + minimum in fp32: a lone query head per kv head works from the codes alone (dot_q4,
   axpy_q4); grouped heads share rows rebuilt 16 positions at a time into L1 (tile_*); AVX-512's 16 lanes, or
   AVX2's 8 (most desktop CPUs). The scalar path rebuilds a row as compression.dequantize_reference does (clamped
   to fp16's range, rounded to the attention's kind). Scores and softmax follow attention.c's (fp32 inside). The
   new token's k and v, not yet stored, come dense (k_new, v_new) and stand at cache slot `skip`, whose stored
   row is ignored (it holds an older position in a ring, or nothing yet). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kinds.h"
#include "simd.h"
#ifdef __AVX512BW__
#include <immintrin.h>
#endif

#ifdef __AVX512BW__
static inline __m512 rounded16(__m512 x, int kind) {
    if (kind == KIND_BF16) {  /* to nearest even, as kinds.h's bf16_bits */
        __m512i u = _mm512_castps_si512(x);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
        return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
    }
    if (kind == KIND_F16)
        return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return x;
}

/* A group of 64 values from 32 bytes of codes, rebuilt as dequantize_reference does (x[0..3]) */
static inline __attribute__((always_inline)) void group64(const uint8_t *c, float s, float m, int kind,
                                                          __m512 x[4]) {
    __m512 vs = _mm512_set1_ps(s), vm = _mm512_set1_ps(m), top = _mm512_set1_ps(FP16_MAX);
    codes64(c, x);
    for (int i = 0; i < 4; i++) {
        __m512 y = _mm512_add_ps(_mm512_mul_ps(x[i], vs), vm);
        x[i] = rounded16(_mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-FP16_MAX)), top), kind);
    }
}

/* A lone query head per kv head (no rebuilt row to share): the row's values are never made. Its score is
   sum over groups of scale * (codes . q) + minimum * sum(q) (qsum: q's sum per group); a value row adds
   p * scale * codes to acc and p * minimum to extra[group], spread over the group's values at the end. The same
   sums as over the rebuilt row, but for its rounding to the attention dtype and the order of the additions. */
static inline float dot_q4(const float *qf, const float *qsum, const uint8_t *c, const _Float16 *scale,
                           const _Float16 *minimum, int64_t dim) {
    __m512 acc = _mm512_setzero_ps(), x[4];
    float shift = 0;
    for (int64_t g = 0; g < dim / 64; g++) {
        __m512 part = _mm512_setzero_ps();
        codes64(c + 32 * g, x);
        for (int i = 0; i < 4; i++)
            part = _mm512_add_ps(part, _mm512_mul_ps(x[i], _mm512_loadu_ps(qf + 64 * g + 16 * i)));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(part, _mm512_set1_ps((float)scale[g])));
        shift += (float)minimum[g] * qsum[g];
    }
    return _mm512_reduce_add_ps(acc) + shift;
}

#ifdef __AVX512BF16__
/* dot_q4 for a bf16 attention, whose q is exact in bf16 (qb: its row as given): each byte's two codes as a bf16
   pair (128 + low, 128 + high), exact (gemv.c's code_pairs), times q's pairs by the CPU's bf16 dot instruction
   (exact products, fp32 sums: 4 instructions a 32 values where rebuilding them in fp32 takes 13); the 128s come
   off with the minima: scale * (dot - 128 qsum) + minimum * qsum a group. */
static inline float dot_q4_bf16(const uint16_t *qb, const float *qsum, const uint8_t *c, const _Float16 *scale,
                                const _Float16 *minimum, int64_t dim) {
    __m512 acc = _mm512_setzero_ps();
    float shift = 0;
    for (int64_t g = 0; g < dim / 64; g++) {
        __m512 part = _mm512_setzero_ps();
        for (int h = 0; h < 2; h++)
            part = _mm512_dpbf16_ps(part, (__m512bh)code_pairs16(c + 32 * g + 16 * h),
                                    (__m512bh)_mm512_loadu_si512(qb + 64 * g + 32 * h));
        float sg = (float)scale[g];
        acc = _mm512_add_ps(acc, _mm512_mul_ps(part, _mm512_set1_ps(sg)));
        shift += ((float)minimum[g] - 128.0f * sg) * qsum[g];
    }
    return _mm512_reduce_add_ps(acc) + shift;
}
#endif

static inline void axpy_q4(float *out, float *extra, float p, const uint8_t *c, const _Float16 *scale,
                           const _Float16 *minimum, int64_t dim) {
    __m512 x[4];
    for (int64_t g = 0; g < dim / 64; g++) {
        __m512 ps = _mm512_set1_ps(p * (float)scale[g]);
        codes64(c + 32 * g, x);
        for (int i = 0; i < 4; i++) {
            float *o = out + 64 * g + 16 * i;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_mul_ps(ps, x[i])));
        }
        extra[g] += p * (float)minimum[g];
    }
}
#endif

#ifdef SIMD_AVX2
/* AVX2 CPUs: the same routines 8 lanes wide (a group's 64 codes as x[0..7]) */
static inline __m256 rounded8(__m256 x, int kind) {
    if (kind == KIND_BF16) {
        __m256i u = _mm256_castps_si256(x);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
        return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
    if (kind == KIND_F16)
        return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return x;
}

static inline __attribute__((always_inline)) void group64(const uint8_t *c, float s, float m, int kind,
                                                          __m256 x[8]) {
    __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m), top = _mm256_set1_ps(FP16_MAX);
    codes64(c, x);
    for (int i = 0; i < 8; i++) {  /* multiply, then add: as dequantize_reference, no fused rounding */
        __m256 y = _mm256_add_ps(_mm256_mul_ps(x[i], vs), vm);
        x[i] = rounded8(_mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-FP16_MAX)), top), kind);
    }
}

static inline float dot_q4(const float *qf, const float *qsum, const uint8_t *c, const _Float16 *scale,
                           const _Float16 *minimum, int64_t dim) {
    __m256 acc = _mm256_setzero_ps(), x[8];
    float shift = 0;
    for (int64_t g = 0; g < dim / 64; g++) {
        __m256 part0 = _mm256_setzero_ps(), part1 = _mm256_setzero_ps();
        codes64(c + 32 * g, x);
        for (int i = 0; i < 8; i += 2) {
            part0 = _mm256_fmadd_ps(x[i], _mm256_loadu_ps(qf + 64 * g + 8 * i), part0);
            part1 = _mm256_fmadd_ps(x[i + 1], _mm256_loadu_ps(qf + 64 * g + 8 * i + 8), part1);
        }
        acc = _mm256_fmadd_ps(_mm256_add_ps(part0, part1), _mm256_set1_ps((float)scale[g]), acc);
        shift += (float)minimum[g] * qsum[g];
    }
    return hsum8(acc) + shift;
}

static inline void axpy_q4(float *out, float *extra, float p, const uint8_t *c, const _Float16 *scale,
                           const _Float16 *minimum, int64_t dim) {
    __m256 x[8];
    for (int64_t g = 0; g < dim / 64; g++) {
        __m256 ps = _mm256_set1_ps(p * (float)scale[g]);
        codes64(c + 32 * g, x);
        for (int i = 0; i < 8; i++) {
            float *o = out + 64 * g + 8 * i;
            _mm256_storeu_ps(o, _mm256_fmadd_ps(ps, x[i], _mm256_loadu_ps(o)));
        }
        extra[g] += p * (float)minimum[g];
    }
}
#endif

/* One position's `dim` values into `row` (groups of `gs`; a last group padded past dim is cut) */
static inline void dequantized_row(const uint8_t *codes, const _Float16 *scale, const _Float16 *minimum,
                                   int64_t dim, int64_t gs, int kind, float *row) {
    for (int64_t g0 = 0, gi = 0; g0 < dim; g0 += gs, gi++) {
        float s = (float)scale[gi], m = (float)minimum[gi];
        const uint8_t *c = codes + g0 / 2;
#ifdef __AVX512BW__
        if (gs == 64 && dim - g0 >= 64) {
            __m512 x[4];
            group64(c, s, m, kind, x);
            for (int i = 0; i < 4; i++) _mm512_storeu_ps(row + g0 + 16 * i, x[i]);
            continue;
        }
#elif defined(SIMD_AVX2)
        if (gs == 64 && dim - g0 >= 64) {
            __m256 x[8];
            group64(c, s, m, kind, x);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(row + g0 + 8 * i, x[i]);
            continue;
        }
#endif
        int64_t n = dim - g0 < gs ? dim - g0 : gs;
        for (int64_t i = 0; i < n; i++) {
            float x = (float)((c[i >> 1] >> ((i & 1) * 4)) & 15) * s;
            row[g0 + i] = kind_round(clamped(x + m), kind);
        }
    }
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
#ifdef __AVX512BW__
    if (n % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16)
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
        return _mm512_reduce_add_ps(acc);
    }
#elif defined(SIMD_AVX2)
    if (n % 8 == 0) return dot8(a, b, n);
#endif
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float sum = 0;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int j = 0; j < 16; j++) sum += acc[j];
    return sum;
}

static inline void axpy_f32(float *acc, float p, const float *x, int64_t n) {
    int64_t i = 0;
#ifdef SIMD_AVX2
    for (__m256 pv = _mm256_set1_ps(p); i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(acc + i)));
#endif
    for (; i < n; i++) acc[i] += p * x[i];
}

static inline void load_kind(const void *src, int kind, int64_t n, float *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = kind_value(src, kind, i);
}

static inline int lone_head(int64_t group, int64_t gs, int64_t dim) { return group == 1 && gs == 64 && dim % 64 == 0; }

/* In a position-major store one position's rows sit a whole row of the cache (rows x heads) from the next
   position's, past the page the hardware prefetcher follows: the bytes of a position AHEAD positions on are asked
   for while this one is read: position l's n bytes of codes (cs apart) and k bytes each of scales and minima
   (ss elements apart) */
#define AHEAD 4
static inline void prefetch_position(const uint8_t *codes, const _Float16 *sc, const _Float16 *mn, int64_t l,
                                     int64_t cs, int64_t ss, int64_t n, int64_t k) {
    for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(codes + l * cs + i);
    for (int64_t i = 0; i < k; i += 64) {
        __builtin_prefetch((const char *)(sc + l * ss) + i);
        __builtin_prefetch((const char *)(mn + l * ss) + i);
    }
}

/* One position's row: rebuilt from its codes, or (codes NULL) the new token's dense row */
static inline void position_row(const uint8_t *codes, const _Float16 *sc, const _Float16 *mn, const void *dense,
                                int64_t dim, int64_t gs, int kind, float *row) {
    if (codes)
        dequantized_row(codes, sc, mn, dim, gs, kind, row);
    else
        load_kind(dense, kind, dim, row);
}

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

#define TILE 16  /* positions rebuilt at a time for grouped heads: 16 rows of up to 256 values stay in L1 */
#ifdef __AVX512BW__

/* Rows of positions [l0, l0 + n) of one kv head rebuilt into tile (ds apart); a position not seen is zeros (its
   weight is 0, and a slot never written may hold anything) */
static inline void tile_rows(const uint8_t *codes, int64_t cs, const _Float16 *sc, const _Float16 *mn, int64_t ss,
                             const uint8_t *m, int64_t skip, int64_t l0, int64_t n, int64_t length, int far,
                             int64_t dim, float *tile, int64_t ds) {
    for (int64_t p = 0; p < TILE; p++) {
        int64_t l = l0 + p;
        if (far && l + TILE < length)
            prefetch_position(codes, sc, mn, l + TILE, cs, ss, dim / 2, dim / 64 * 2);
        if (!(p < n && l != skip && m[l])) {
            memset(tile + p * ds, 0, sizeof(float) * dim);
            continue;
        }
        for (int64_t g = 0; g < dim / 64; g++) {  /* code * scale + minimum, as dot_q4's sums (no rounding) */
            __m512 x[4], s = _mm512_set1_ps((float)sc[l * ss + g]), mv = _mm512_set1_ps((float)mn[l * ss + g]);
            codes64(codes + l * cs + 32 * g, x);
            for (int i = 0; i < 4; i++)
                _mm512_storeu_ps(tile + p * ds + 64 * g + 16 * i, _mm512_add_ps(_mm512_mul_ps(x[i], s), mv));
        }
    }
}

/* Grouped heads' scores over one tile: per query head j, the 16 positions' dot products summed across lanes
   together (simd.h's lane_sums16), into s[j * sl + l0 ..] for the n positions there */
static inline void tile_scores(const float *qf, int64_t ds, int64_t group, const float *tile, int64_t dim,
                               float scale, float *s, int64_t sl, int64_t l0, int64_t n) {
    for (int64_t j = 0; j < group; j++) {
        __m512 a[TILE];
        for (int p = 0; p < TILE; p++) a[p] = _mm512_setzero_ps();
        for (int64_t d = 0; d < dim; d += 16) {
            __m512 qv = _mm512_loadu_ps(qf + j * ds + d);
            for (int p = 0; p < TILE; p++)
                a[p] = _mm512_add_ps(a[p], _mm512_mul_ps(qv, _mm512_loadu_ps(tile + p * ds + d)));
        }
        float out[TILE];
        _mm512_storeu_ps(out, _mm512_mul_ps(lane_sums16(a), _mm512_set1_ps(scale)));
        memcpy(s + j * sl + l0, out, sizeof(float) * n);
    }
}

/* acc (ds apart) += each query head's weights (p, sl apart) times the tile's rows, d values at a time in registers */
static inline void tile_values(float *acc, int64_t ds, int64_t group, const float *p, int64_t sl, int64_t l0,
                               int64_t n, const float *tile, int64_t dim) {
    for (int64_t j = 0; j < group; j++)
        for (int64_t d = 0; d < dim; d += 64) {
            int64_t w = dim - d < 64 ? dim - d : 64;
            __m512 a[4];
            for (int i = 0; i < w / 16; i++) a[i] = _mm512_loadu_ps(acc + j * ds + d + 16 * i);
            for (int64_t q = 0; q < n; q++) {
                __m512 pv = _mm512_set1_ps(p[j * sl + l0 + q]);
                for (int i = 0; i < w / 16; i++)
                    a[i] = _mm512_add_ps(a[i], _mm512_mul_ps(pv, _mm512_loadu_ps(tile + q * ds + d + 16 * i)));
            }
            for (int i = 0; i < w / 16; i++) _mm512_storeu_ps(acc + j * ds + d + 16 * i, a[i]);
        }
}

#elif defined(SIMD_AVX2)
/* AVX2's tile routines: the same sums 8 lanes wide, scores 8 positions at a time (lane_sums8) */
static inline void tile_rows(const uint8_t *codes, int64_t cs, const _Float16 *sc, const _Float16 *mn, int64_t ss,
                             const uint8_t *m, int64_t skip, int64_t l0, int64_t n, int64_t length, int far,
                             int64_t dim, float *tile, int64_t ds) {
    for (int64_t p = 0; p < TILE; p++) {
        int64_t l = l0 + p;
        if (far && l + TILE < length)
            prefetch_position(codes, sc, mn, l + TILE, cs, ss, dim / 2, dim / 64 * 2);
        if (!(p < n && l != skip && m[l])) {
            memset(tile + p * ds, 0, sizeof(float) * dim);
            continue;
        }
        for (int64_t g = 0; g < dim / 64; g++) {
            __m256 x[8], s = _mm256_set1_ps((float)sc[l * ss + g]), mv = _mm256_set1_ps((float)mn[l * ss + g]);
            codes64(codes + l * cs + 32 * g, x);
            for (int i = 0; i < 8; i++)
                _mm256_storeu_ps(tile + p * ds + 64 * g + 8 * i, _mm256_add_ps(_mm256_mul_ps(x[i], s), mv));
        }
    }
}

/* Lane j: the sum of a[j]'s 8 lanes */
static inline __attribute__((always_inline)) __m256 lane_sums8(const __m256 *a) {
    __m256 c0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 c1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

static inline void tile_scores(const float *qf, int64_t ds, int64_t group, const float *tile, int64_t dim,
                               float scale, float *s, int64_t sl, int64_t l0, int64_t n) {
    for (int64_t j = 0; j < group; j++)
        for (int64_t p0 = 0; p0 < n; p0 += 8) {
            __m256 a[8];
            for (int p = 0; p < 8; p++) a[p] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                __m256 qv = _mm256_loadu_ps(qf + j * ds + d);
                for (int p = 0; p < 8; p++)
                    a[p] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(tile + (p0 + p) * ds + d), a[p]);
            }
            float out[8];
            _mm256_storeu_ps(out, _mm256_mul_ps(lane_sums8(a), _mm256_set1_ps(scale)));
            memcpy(s + j * sl + l0 + p0, out, sizeof(float) * (n - p0 < 8 ? n - p0 : 8));
        }
}

static inline void tile_values(float *acc, int64_t ds, int64_t group, const float *p, int64_t sl, int64_t l0,
                               int64_t n, const float *tile, int64_t dim) {
    for (int64_t j = 0; j < group; j++)
        for (int64_t d = 0; d < dim; d += 32) {
            __m256 a[4];
            for (int i = 0; i < 4; i++) a[i] = _mm256_loadu_ps(acc + j * ds + d + 8 * i);
            for (int64_t q = 0; q < n; q++) {
                __m256 pv = _mm256_set1_ps(p[j * sl + l0 + q]);
                for (int i = 0; i < 4; i++)
                    a[i] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(tile + q * ds + d + 8 * i), a[i]);
            }
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(acc + j * ds + d + 8 * i, a[i]);
        }
}
#endif

#if defined(__AVX512BW__) || defined(SIMD_AVX2)
/* One kv head's stored positions tile by tile: its grouped query heads' scores (values 0), or their weights times
   the value rows into acc (values 1); j: the head's first query head */
static inline void tiled_head(int values, const float *qf, float *acc, int64_t j, int64_t ds, int64_t group,
                              const uint8_t *codes, const _Float16 *sc, const _Float16 *mn, int64_t s1, int64_t cs,
                              int64_t ss, const uint8_t *m, int64_t skip, int64_t length, int far, int64_t dim,
                              float scale, float *scores, int64_t sl, float *tile) {
    for (int64_t l0 = 0; l0 < length; l0 += TILE) {
        int64_t n = length - l0 < TILE ? length - l0 : TILE;
        tile_rows(codes, cs, sc + s1, mn + s1, ss, m, skip, l0, n, length, far, dim, tile, ds);
        if (values)
            tile_values(acc + j * ds, ds, group, scores + j * sl, sl, l0, n, tile, dim);
        else
            tile_scores(qf + j * ds, ds, group, tile, dim, scale, scores + j * sl, sl, l0, n);
    }
}
#endif

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
