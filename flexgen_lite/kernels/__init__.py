"""Math on tensors: attention (SDPA and the CPU's C kernel), 4-bit group-wise quantization and its fused
Triton dequantization, the CPU's int4 weight matmul and the choice of its path, and sampling."""
