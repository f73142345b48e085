/* 4-bit cache attention's grouped query heads: a kv head's positions rebuilt from their codes 16 at a time into
   a tile that stays in L1, each of its query heads' scores and weighted values taken from the tile (AVX-512's
   16 lanes, or AVX2's 8). Called by attention_q4.c. */

#include "attention_q4_rows.h"

#define TILE 16  /* positions rebuilt at a time for grouped heads: 16 rows of up to 256 values stay in L1 */
#ifdef __AVX512BW__

/* A group's 64 values code * s + m from its 32 bytes of codes into dst */
static inline void group_values(const uint8_t *c, float scale, float minimum, float *dst) {
    __m512 x[4], s = _mm512_set1_ps(scale), mv = _mm512_set1_ps(minimum);
    codes64(c, x);
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(dst + 16 * i, _mm512_add_ps(_mm512_mul_ps(x[i], s), mv));
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
static inline void group_values(const uint8_t *c, float scale, float minimum, float *dst) {
    __m256 x[8], s = _mm256_set1_ps(scale), mv = _mm256_set1_ps(minimum);
    codes64(c, x);
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + 8 * i, _mm256_add_ps(_mm256_mul_ps(x[i], s), mv));
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
        for (int64_t g = 0; g < dim / 64; g++)  /* code * scale + minimum, as dot_q4's sums (no rounding) */
            group_values(codes + l * cs + 32 * g, (float)sc[l * ss + g], (float)mn[l * ss + g], tile + p * ds + 64 * g);
    }
}
#endif

#if defined(__AVX512BW__) || defined(SIMD_AVX2)
/* One kv head's stored positions tile by tile: its grouped query heads' scores (values 0), or their weights times
   the value rows into acc (values 1); j: the head's first query head */
void tiled_head(int values, const float *qf, float *acc, int64_t j, int64_t ds, int64_t group,
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
