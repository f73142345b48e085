/* The element kinds the kernels read and write (native.OUT_KIND: fp32, bf16, fp16) and their conversions to and
   from fp32, shared by the kernels' files. bf16 rounds to nearest even (no NaNs reach the kernels). */

#ifndef FLEXGEN_LITE_KINDS_H
#define FLEXGEN_LITE_KINDS_H

#include <stdint.h>
#include <string.h>

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2 };

static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_value(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Element i of p, of `kind`, as fp32. */
static inline float kind_value(const void *p, int kind, int64_t i) {
    if (kind == KIND_F32) return ((const float *)p)[i];
    if (kind == KIND_F16) return (float)((const _Float16 *)p)[i];
    return bf16_value(((const uint16_t *)p)[i]);
}

/* f rounded into element i of p, of `kind`. */
static inline void kind_put(void *p, int kind, int64_t i, float f) {
    if (kind == KIND_F32)
        ((float *)p)[i] = f;
    else if (kind == KIND_F16)
        ((_Float16 *)p)[i] = (_Float16)f;
    else
        ((uint16_t *)p)[i] = bf16_bits(f);
}

#define FP16_MAX 65504.0f

/* x clamped to fp16's range, as compression's dequantization clamps its values */
static inline float clamped(float x) { return x > FP16_MAX ? FP16_MAX : x < -FP16_MAX ? -FP16_MAX : x; }

/* f rounded to `kind` and back to fp32 (f itself for fp32): what a torch op of that dtype leaves. */
static inline float kind_round(float f, int kind) {
    if (kind == KIND_F32) return f;
    if (kind == KIND_F16) return (float)(_Float16)f;
    return bf16_value(bf16_bits(f));
}

#endif
