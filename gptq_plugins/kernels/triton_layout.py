"""Triton kernels for the v1 layout: packing and dequantization, bit-identical to `packing.py`.

They compile for CUDA GPUs and run on CPU tensors under ``TRITON_INTERPRET=1``. The device
helpers `read_codes` and `dequantize_tile` are shared with the fused matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptq_plugins.packed_words import WORD_BITS
from gptq_plugins.packing import check_packable, check_packed, pack_quantized_with

# Set when triton was imported under TRITON_INTERPRET=1: kernels then avoid the interpreter's
# gaps (bfloat16 is held as uint16, so `tl.dot` on it is wrong and casts to it truncate).
INTERPRETED = bool(triton.knobs.runtime.interpret)

PACK_BLOCK_WORDS = 32
PACK_BLOCK_LANES = 64
DEQUANT_BLOCK_K = 64
DEQUANT_BLOCK_N = 64


@triton.jit
def _pack_kernel(src_ptr, dst_ptr, n_values, n_lanes, src_stride_value, src_stride_lane,
                 dst_stride_word, dst_stride_lane,
                 BITS: tl.constexpr, BLOCK_WORDS: tl.constexpr, BLOCK_LANES: tl.constexpr):
    """Each output word ORs in the (at most 32 // BITS + 2) values whose bits it holds."""
    words = tl.program_id(0) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    lanes = tl.program_id(1) * BLOCK_LANES + tl.arange(0, BLOCK_LANES)
    in_range = (words[:, None] < n_values * BITS // 32) & (lanes[None, :] < n_lanes)
    word_start = words.to(tl.int64) * 32  # stream bit of each word's bit 0
    first_value = word_start // BITS
    acc = tl.zeros([BLOCK_WORDS, BLOCK_LANES], dtype=tl.int64)
    for t in tl.static_range(32 // BITS + 2):
        value_index = first_value + t
        shift = value_index * BITS - word_start  # where the value's bit 0 lands; < 0: it began earlier
        holds = (shift < 32)[:, None] & in_range
        v = tl.load(src_ptr + value_index[:, None] * src_stride_value + lanes[None, :] * src_stride_lane,
                    mask=holds, other=0).to(tl.int64)
        part = tl.where(shift[:, None] >= 0, v << tl.maximum(shift, 0)[:, None],
                        v >> tl.maximum(-shift, 0)[:, None])
        acc |= tl.where(holds, part, 0)
    # Truncating to 32 bits drops the bits of a value that continue in the next word.
    tl.store(dst_ptr + words[:, None] * dst_stride_word + lanes[None, :] * dst_stride_lane,
             acc.to(tl.int32), mask=in_range)


@triton.jit
def read_codes(ptr, value_index, lane_offset, stride_word, n_words, mask, BITS: tl.constexpr):
    """Values `value_index` of bit streams whose words lie `stride_word` apart (int32 result)."""
    bit = value_index * BITS
    word = bit // 32
    offset = bit % 32
    lo = tl.load(ptr + word * stride_word + lane_offset, mask=mask, other=0)
    if 32 % BITS == 0:
        # Never crosses a word: the arithmetic shift's sign copies lie above the mask.
        codes = (lo >> offset) & ((1 << BITS) - 1)
    else:
        crosses = mask & (offset + BITS > 32) & (word + 1 < n_words)
        hi = tl.load(ptr + (word + 1) * stride_word + lane_offset, mask=crosses, other=0)
        window = (lo.to(tl.int64) & 0xFFFFFFFF) | (hi.to(tl.int64) << 32)
        codes = ((window >> offset) & ((1 << BITS) - 1)).to(tl.int32)
    return codes


@triton.jit
def dequantize_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, rk, rn, N, K, n_zero_words,
                    mask, BITS: tl.constexpr):
    """float32 weights `[len(rk), len(rn)]` (input rows, output columns); 0 where masked."""
    codes = read_codes(qweight_ptr, rk[:, None], rn[None, :], N, K * BITS // 32, mask, BITS)
    groups = tl.load(g_idx_ptr + rk, mask=rk < K, other=0)
    zeros = read_codes(qzeros_ptr, rn[None, :], groups[:, None] * n_zero_words, 1, n_zero_words,
                       mask, BITS) + 1
    scales = tl.load(scales_ptr + groups[:, None] * N + rn[None, :], mask=mask, other=0.0)
    return (codes - zeros).to(tl.float32) * scales.to(tl.float32)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 `x` rounded to nearest even in `dtype` (the interpreter truncates to bfloat16)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _dequantize_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, N, K, n_zero_words,
                       BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       INTERPRETED: tl.constexpr):
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rk[:, None] < K) & (rn[None, :] < N)
    w = dequantize_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, rk, rn, N, K, n_zero_words,
                        mask, BITS)
    tl.store(out_ptr + rn[None, :] * K + rk[:, None],
             round_to(w, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def pack_rows_triton(values: torch.Tensor, bits: int) -> torch.Tensor:
    """`packing.pack_rows` as one kernel, reading a 2-D view of any strides (no transpose copy)."""
    n, m = check_packable(values, bits)
    out = torch.empty(n * bits // WORD_BITS, m, dtype=torch.int32, device=values.device)
    grid = (triton.cdiv(out.shape[0], PACK_BLOCK_WORDS), triton.cdiv(m, PACK_BLOCK_LANES))
    _pack_kernel[grid](values, out, n, m, values.stride(0), values.stride(1), out.stride(0),
                       out.stride(1), BITS=bits, BLOCK_WORDS=PACK_BLOCK_WORDS,
                       BLOCK_LANES=PACK_BLOCK_LANES)
    return out


def pack_quantized_triton(qw) -> dict[str, torch.Tensor]:
    """`packing.pack_quantized` with the packing done by `pack_rows_triton`."""
    return pack_quantized_with(qw, pack_rows_triton)


def dequantize_triton(qweight, qzeros, scales, g_idx, bits, dtype=torch.float32) -> torch.Tensor:
    """`packing.dequantize_packed` as one kernel, written in `dtype` (rounded to nearest even)."""
    in_features, out_features, _ = check_packed(qweight, qzeros, scales, g_idx, bits)
    qweight, qzeros, scales, g_idx = (t.contiguous() for t in (qweight, qzeros, scales, g_idx))
    out = torch.empty(out_features, in_features, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(in_features, DEQUANT_BLOCK_K), triton.cdiv(out_features, DEQUANT_BLOCK_N))
    _dequantize_kernel[grid](qweight, qzeros, scales, g_idx, out, out_features, in_features,
                             qzeros.shape[1], BITS=bits, BLOCK_K=DEQUANT_BLOCK_K,
                             BLOCK_N=DEQUANT_BLOCK_N, INTERPRETED=INTERPRETED)
    return out
