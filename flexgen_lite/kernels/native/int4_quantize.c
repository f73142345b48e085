/* 4-bit weights quantized into their layouts at placement, exactly as compression.quantize rounds them: groups'
   minimum and scale in fp16 (the scale rounded up, so that no code passes 15), codes to nearest; rows of x
   (compression.py's layout, groups along a row) or torch's int4 matmul layout (int4.c). Built with
   -ffp-contract=off: bit-identical to the torch path. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kinds.h"

static inline uint16_t f16_bits(_Float16 h) {
    uint16_t b;
    memcpy(&b, &h, 2);
    return b;
}

static inline _Float16 f16_from_bits(uint16_t b) {
    _Float16 h;
    memcpy(&h, &b, 2);
    return h;
}

/* fp32 `v` (finite, within fp16 range) rounded to fp16 toward +inf (up) or -inf, as quantization._fp16_round. */
static inline _Float16 round_f16(float v, int up) {
    _Float16 h = (_Float16)v;
    uint16_t bits = f16_bits(h);
    if (up) return (float)h < v ? f16_from_bits(bits + 1) : h;
    if (!((float)h > v)) return h;
    if ((float)h > 0) return f16_from_bits(bits - 1);
    return f16_from_bits(bits == 0 ? 0x8001 : bits + 1);
}


/* One group of g values of x from `base`: its minimum (rounded down) and scale (rounded up) in fp16, as
   compression.quantize computes them; returns 1 / scale (0 for a constant group, whose codes are all 0). */
static inline float group_stats(const void *x, int kind, int64_t base, int64_t g, _Float16 *lo_out,
                                _Float16 *scale_out, float *m_out) {
    float mn = kind_value(x, kind, base), mx = mn;
    for (int64_t c = 1; c < g; c++) {
        float v = kind_value(x, kind, base + c);
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    mn = mn < -FP16_MAX ? -FP16_MAX : mn > FP16_MAX ? FP16_MAX : mn;
    mx = mx < -FP16_MAX ? -FP16_MAX : mx > FP16_MAX ? FP16_MAX : mx;
    _Float16 lo = round_f16(mn, 0);
    float m = (float)lo, range = mx - m;
    _Float16 s = round_f16((range > 0 ? range : 0) / 15.0f, 1);
    float sf = (float)s;
    *lo_out = lo, *scale_out = s, *m_out = m;
    return sf > 0 ? 1.0f / sf : 0.0f;
}

static inline uint8_t code_of(float v, float m, float inv) {
    float q = __builtin_nearbyintf((v - m) * inv);
    return (uint8_t)(q < 0 ? 0 : q > 15 ? 15 : q);
}

/* Rows [r0, r1) of x (R, D), each quantized to 4 bits in groups of g along it, exactly as compression.quantize
   does with groups along the last dimension, in its layout: codes (R, D / 2) bytes (value 2j in byte j's low
   nibble), scale and minimum (R, D / g) fp16. A KV cache's new tokens stored in host RAM. A row at a time in
   fp32; one call releases the GIL for what took ~35 torch calls. */
void int4_quantize_rows(const void *x, int kind, int64_t d, int64_t g, uint8_t *codes, _Float16 *scale,
                        _Float16 *minimum, int64_t r0, int64_t r1) {
    float row[d];
    for (int64_t r = r0; r < r1; r++) {
        if (kind == KIND_F32)
            memcpy(row, (const float *)x + r * d, d * sizeof(float));
        else if (kind == KIND_F16)
            for (int64_t c = 0; c < d; c++) row[c] = (float)((const _Float16 *)x)[r * d + c];
        else
            for (int64_t c = 0; c < d; c++) row[c] = bf16_value(((const uint16_t *)x)[r * d + c]);
        for (int64_t c0 = 0, i = 0; c0 < d; c0 += g, i++) {
            float m;
            float inv = group_stats(row, KIND_F32, c0, g, &minimum[r * (d / g) + i], &scale[r * (d / g) + i], &m);
            uint8_t *out = codes + (r * d + c0) / 2;
            for (int64_t c = 0; c < g; c += 2)
                out[c / 2] = (uint8_t)(code_of(row[c0 + c], m, inv) | code_of(row[c0 + c + 1], m, inv) << 4);
        }
    }
}

/* x (N, K) quantized to 4 bits in groups of g along K exactly as compression.quantize does (min/max per group,
   minimum rounded down and scale up to fp16, codes rounded half to even), written in the layout the dequantization
   above reads: codes (N / 64, K, 32) bytes, scale and minimum (K / g, N) fp16. Only the blocks of 64 rows [b0, b1)
   (the caller splits them over its threads). */
void int4_quantize_pack(const void *x, int kind, int64_t n, int64_t k, int64_t g, uint8_t *packed,
                        _Float16 *scale, _Float16 *minimum, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        for (int r = 0; r < 64; r++) {
            int64_t row = b * 64 + r;
            const int64_t base = row * k;
            for (int64_t c0 = 0; c0 < k; c0 += g) {
                float m;
                float inv = group_stats(x, kind, base + c0, g, &minimum[(c0 / g) * n + row],
                                        &scale[(c0 / g) * n + row], &m);
                for (int64_t c = c0; c < c0 + g; c++) {
                    uint8_t code = code_of(kind_value(x, kind, base + c), m, inv);
                    uint8_t *byte = packed + (b * k + c) * 32 + (r & 31);
                    *byte = r < 32 ? code : (uint8_t)(*byte | (code << 4));
                }
            }
        }
    }
}
