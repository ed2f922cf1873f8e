"""2-, 3- and 4-bit GPTQ on CPU through PyTorch's native int4 kernels.

`aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)` computes
`x @ W.T` with `W[n, k] = (q[n, k] - 8) * scale[g, n] + offset[g, n]`, `g = k // group_size`
(verified on the op, see tests). A GPTQ weight `(q - z) * s` maps exactly onto it with
`scale = s` and `offset = (8 - z) * s`; both are held in bfloat16, the only activation dtype
for which the op is fast (0.4 ms against 15 ms in float32 for a 4096x4096 matvec). Scales
that are not bfloat16-representable are rounded (relative error <= 2**-9, like the cast of
the activations); symmetric grids (z = 8) have offset 0, so the zero point itself is exact.
2- and 3-bit layers run on the same kernel at the 4-bit kernel's memory instead of a dense copy:
their `q - z + 8` (0..14) are 4-bit codes, so the zero point moves into the codes and the offset
is exactly 0, symmetric or not; only the scale is rounded to bfloat16.

The op takes one scale per 32/64/128/256 inputs: larger groups (group_size=-1 is one group of
in_features, a ragged last group is shorter) repeat their scale over sub-groups of a length that
divides every group. Act-order weights are stored with
their input columns sorted by group, and each call gathers the activations in that order.
Calls of many rows skip the op for `tiled_dequant` (`cpu_dispatch` says from how many rows).
Both paths read the op's weight, which holds the codes exactly (`op_layout` reads them back), so
the layer keeps no other copy: `checkpoint_qweight` rebuilds the checkpoint's `qweight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_plugins.kernels.base import BackendUnsupported
from gptq_plugins.kernels.cpu_dispatch import uses_tiled_dequant
from gptq_plugins.kernels.op_layout import OP_CODE_OFFSET, block_columns, check_layout, read_codes
from gptq_plugins.kernels.tiled_dequant import tiled_dequant_matmul
from gptq_plugins.packing import check_packed, dequantize_packed, pack_rows, unpack_rows, unpack_zeros

OP_BITS = (2, 3, 4)  # code widths whose codes fit the op's 4-bit codes
OP_GROUP_SIZES = (256, 128, 64, 32)  # what the op accepts, largest (fewest scales) first
OP_OUT_MULTIPLE = 16  # the op's packing needs out_features divisible by 16
INNER_K_TILES = 8  # packing parameter of the CUDA layout; the CPU layout does not depend on it
# From about this many rows a cached bfloat16 matmul beats the int4 kernel 2-3x (benchmarks/kernels.py).
PREFILL_ROWS = 32


@dataclass
class Int4PackedWeight:
    packed: torch.Tensor            # uint8 [out, in/2], the op's layout
    scales_and_zeros: torch.Tensor  # bfloat16 [in/op_group_size, out, 2]: scale, offset
    op_group_size: int
    input_order: torch.Tensor | None  # act-order: activation columns in group order


def convert_to_int4pack(qweight, qzeros, scales, g_idx, bits: int = 4) -> Int4PackedWeight:
    """Convert a packed 2/3/4-bit GPTQ layer; raises BackendUnsupported for shapes the op lacks."""
    if bits not in OP_BITS:
        raise BackendUnsupported(f"bits={bits}: the int4 op holds codes of {list(OP_BITS)} bits")
    in_features, out_features, n_groups = check_packed(qweight, qzeros, scales, g_idx, bits)
    codes = unpack_rows(qweight, bits, in_features)  # [in, out]
    zeros = unpack_zeros(qzeros, bits, out_features)  # [n_groups, out]
    scale = scales.to(torch.bfloat16)
    if bits < 4:  # q - z + 8 stays in 0..15: the zero point moves into the codes, the offset is exactly 0
        codes = codes - zeros[g_idx.long()] + OP_CODE_OFFSET
        offset = torch.zeros_like(scale)
    else:
        offset = ((OP_CODE_OFFSET - zeros) * scale.float()).to(torch.bfloat16)
    return pack_for_op(codes, scale, offset, g_idx, n_groups)


def pack_for_op(codes, scale, offset, g_idx, n_groups: int) -> Int4PackedWeight:
    """The op's weight for 4-bit `codes [in, out]` with bfloat16 `scale`, `offset [n_groups, out]`
    and input groups `g_idx`; raises BackendUnsupported for shapes the op lacks."""
    in_features, out_features = codes.shape
    if out_features % OP_OUT_MULTIPLE:
        raise BackendUnsupported(f"out_features={out_features} is not a multiple of {OP_OUT_MULTIPLE}")
    # Sorting columns by group makes every group contiguous (act-order included); the op then
    # needs one sub-group length dividing every group's column count (a ragged last group too).
    order = torch.argsort(g_idx, stable=True)
    positions = torch.arange(in_features, device=g_idx.device)
    counts = torch.bincount(g_idx.long(), minlength=n_groups)
    op_group_size = next((s for s in OP_GROUP_SIZES if not bool((counts % s).any())), None)
    if op_group_size is None:
        lengths = sorted(set(counts.tolist()))
        raise BackendUnsupported(f"groups of {lengths} columns: the op needs every group's length to be "
                                 f"a multiple of one of {list(OP_GROUP_SIZES)}")
    check_layout(out_features % block_columns())
    in_order = torch.equal(order, positions)
    if not in_order:
        codes = codes[order]
    scales_and_zeros = torch.stack([scale, offset], dim=-1).repeat_interleave(counts // op_group_size, dim=0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.T.contiguous(), INNER_K_TILES)
    return Int4PackedWeight(packed, scales_and_zeros.contiguous(), op_group_size,
                            None if in_order else order)


def op_codes(weight: Int4PackedWeight) -> torch.Tensor:
    """The op's 4-bit codes, int32 `[op inputs, out]`, in the checkpoint's input order."""
    codes = read_codes(weight.packed, 0, weight.packed.shape[0]).to(torch.int32)
    if weight.input_order is None:
        return codes
    return torch.empty_like(codes).index_copy_(0, weight.input_order, codes)


def int4pack_qweight(weight: Int4PackedWeight, qzeros, g_idx, bits: int) -> torch.Tensor:
    """The checkpoint's packed `qweight` of a layer converted by `convert_to_int4pack`, exactly."""
    codes = op_codes(weight)
    if bits < 4:  # the zero points were moved into the codes
        zeros = unpack_zeros(qzeros.to(codes.device), bits, codes.shape[1])
        codes = codes + zeros[g_idx.to(codes.device).long()] - OP_CODE_OFFSET
    return pack_rows(codes, bits)


def int4pack_matmul(x: torch.Tensor, weight: Int4PackedWeight) -> torch.Tensor:
    """`x [M, in] @ W.T` in x's dtype, computed with bfloat16 activations."""
    x16 = x.to(torch.bfloat16)
    if weight.input_order is not None:
        x16 = x16.index_select(1, weight.input_order)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x16, weight.packed, weight.op_group_size,
                                                   weight.scales_and_zeros)
    return y.to(x.dtype)


def op_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def supported_group_size(group_size: int) -> bool:
    """Whether sub-groups the op takes can divide such groups (a ragged last group is checked
    by `pack_for_op`)."""
    return group_size == -1 or group_size % min(OP_GROUP_SIZES) == 0


class CpuInt4Backend:
    """2/3/4-bit layers on CPU through PyTorch's int4 kernel (see the module docstring); calls of
    many rows (prefill, batched decode) dequantize tile by tile instead (`cpu_dispatch`)."""

    name = "cpu_int4"
    priority = 50

    def activation_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16  # the op's only fast activation dtype, on AVX2 and AVX-512 alike

    def supports(self, device_type, bits, group_size, desc_act, dtype) -> bool:
        return (device_type == "cpu" and bits in OP_BITS and dtype.is_floating_point
                and supported_group_size(group_size) and op_available())

    def prepare(self, layer) -> Int4PackedWeight:
        return convert_to_int4pack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)

    def checkpoint_qweight(self, layer) -> torch.Tensor:
        return int4pack_qweight(layer.kernel_state, layer.qzeros, layer.g_idx, layer.bits)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if uses_tiled_dequant(x.shape[0]):
            return tiled_dequant_matmul(x, layer.kernel_state)
        return int4pack_matmul(x, layer.kernel_state)


class CpuInt4PrefillCacheBackend(CpuInt4Backend):
    """`cpu_int4` for decode plus a cached bfloat16 weight for prefill-sized batches.

    Prompts run 2-3x faster for 4x the memory of the int4 weight, a trade only the user can
    make: the lower priority means it is used only when forced by name in `post_init`.
    """

    name = "cpu_int4_prefill_cache"
    priority = CpuInt4Backend.priority - 1

    def prepare(self, layer) -> tuple[Int4PackedWeight, torch.Tensor]:
        dense = dequantize_packed(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
        return super().prepare(layer), dense.to(torch.bfloat16)

    def checkpoint_qweight(self, layer) -> torch.Tensor:
        return int4pack_qweight(layer.kernel_state[0], layer.qzeros, layer.g_idx, layer.bits)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        int4_weight, dense = layer.kernel_state
        if x.shape[0] < PREFILL_ROWS:
            return int4pack_matmul(x, int4_weight)
        return torch.nn.functional.linear(x.to(torch.bfloat16), dense).to(x.dtype)
