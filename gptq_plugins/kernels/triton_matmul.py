"""Fused dequantize-matmul for decode-sized batches: `x [M, K] @ W.T` with W still packed.

Weights are dequantized in registers, tile by tile, into the activation dtype (float16 or
bfloat16) and accumulated in float32, so the packed weight is read once per M-tile instead of
materialising a float copy. Act-order is a per-row gather of `g_idx`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptq_plugins.kernels.triton_dtypes import ACTIVATION_DTYPES
from gptq_plugins.kernels.triton_layout import INTERPRETED, dequantize_tile, round_to
from gptq_plugins.packing import check_packed

MAX_FUSED_ROWS = 64  # beyond this, dequantize once and let cuBLAS do the matmul
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _fused_matmul_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
                         M, N, K, n_zero_words, stride_xm, stride_om,
                         BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w_mask = (rk[:, None] < K) & (rn[None, :] < N)
        w = dequantize_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, rk, rn, N, K,
                            n_zero_words, w_mask, BITS)
        w = round_to(w, x_ptr.dtype.element_ty, INTERPRETED)
        if INTERPRETED:  # same products and float32 sums, without the interpreter's bf16 gap
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :],
             round_to(acc, out_ptr.dtype.element_ty, INTERPRETED),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def fused_matmul(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """`x [M, in] @ dequantize(...).T` in x's dtype (float16/bfloat16), float32 accumulation."""
    in_features, out_features, _ = check_packed(qweight, qzeros, scales, g_idx, bits)
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x: expected float16 or bfloat16 activations, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x: expected [M, {in_features}], got {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    qweight, qzeros, scales, g_idx = (t.contiguous() for t in (qweight, qzeros, scales, g_idx))
    m = x.shape[0]
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    block_m = min(max(16, triton.next_power_of_2(m)), MAX_FUSED_ROWS)  # tl.dot needs >= 16 rows
    grid = (triton.cdiv(m, block_m), triton.cdiv(out_features, BLOCK_N))
    _fused_matmul_kernel[grid](x, qweight, qzeros, scales, g_idx, out, m, out_features,
                               in_features, qzeros.shape[1], x.stride(0), out.stride(0),
                               BITS=bits, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                               INTERPRETED=INTERPRETED)
    return out
