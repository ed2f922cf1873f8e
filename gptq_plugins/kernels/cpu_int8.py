"""8-bit GPTQ on CPU through PyTorch's int4 kernel: each 8-bit code is two 4-bit codes.

`q = 16 * hi + lo` with `hi, lo` in 0..15, so the layer's `W[n, k] = (q - z) * s` is the sum of
a high-nibble weight `(hi - 8) * 16s + c_hi` and a low-nibble weight `(lo - 8) * s + c_lo`, where
`c_hi + c_lo = (136 - z) * s` (136 = 16 * 8 + 8 undoes both halves' code offset of 8). Laid side
by side as one layer of `2 * in` inputs, fed `[x, x]`, the op sums both halves in float32 and
rounds once: one call, the int4 kernel's speed per weight, 1 byte per weight resident (PyTorch's
int8 weight-only op takes one scale per output channel, not GPTQ's per-group scales and zeros).
The scale is rounded to bfloat16 as for 2/3/4-bit; the zero-point term `(136 - z) * s` is carried
by two bfloat16 numbers (16 significant bits), exact for symmetric grids (z = 128: `8 * s`).
Calls of many rows go to `tiled_dequant` like the other widths (see `cpu_dispatch`), which reads
the same weight; `checkpoint_qweight` rebuilds the checkpoint's `qweight` from it (`16 * hi + lo`).
"""

from __future__ import annotations

import torch

from gptq_plugins.kernels.cpu_dispatch import uses_tiled_dequant
from gptq_plugins.kernels.cpu_int4 import (Int4PackedWeight, int4pack_matmul, op_available, op_codes, pack_for_op,
                                           supported_group_size)
from gptq_plugins.kernels.op_layout import NIBBLE, OP_CODE_OFFSET
from gptq_plugins.kernels.tiled_dequant import tiled_dequant_matmul
from gptq_plugins.packing import check_packed, pack_rows, unpack_rows, unpack_zeros

CODE_OFFSET = NIBBLE * OP_CODE_OFFSET + OP_CODE_OFFSET  # both nibbles' offset of 8, in 8-bit units


def convert_to_nibble_pairs(qweight, qzeros, scales, g_idx) -> Int4PackedWeight:
    """The op's weight for a packed 8-bit layer: `2 * in` inputs, high nibbles first."""
    in_features, out_features, n_groups = check_packed(qweight, qzeros, scales, g_idx, 8)
    codes = unpack_rows(qweight, 8, in_features)  # [in, out]
    zeros = unpack_zeros(qzeros, 8, out_features)  # [n_groups, out]
    scale = scales.to(torch.bfloat16)
    zero_term = (CODE_OFFSET - zeros) * scale.float()  # exact in float32
    high_term = zero_term.to(torch.bfloat16)
    low_term = (zero_term - high_term.float()).to(torch.bfloat16)
    return pack_for_op(torch.cat([codes >> 4, codes & (NIBBLE - 1)]),
                       torch.cat([scale * NIBBLE, scale]), torch.cat([high_term, low_term]),
                       torch.cat([g_idx, g_idx + n_groups]), 2 * n_groups)


def nibble_pairs_qweight(weight: Int4PackedWeight) -> torch.Tensor:
    """The checkpoint's packed 8-bit `qweight` of a layer converted by `convert_to_nibble_pairs`."""
    high, low = op_codes(weight).chunk(2)
    return pack_rows(high * NIBBLE + low, 8)


def nibble_pairs_matmul(x: torch.Tensor, weight: Int4PackedWeight) -> torch.Tensor:
    """`x [M, in] @ W.T` in x's dtype, computed with bfloat16 activations."""
    return int4pack_matmul(torch.cat([x, x], dim=1), weight)


class CpuInt8Backend:
    """8-bit layers on CPU through PyTorch's int4 kernel (see the module docstring)."""

    name = "cpu_int8"
    priority = 50
    op_weights_per_weight = 2  # the op reads two 4-bit codes per weight

    def activation_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def supports(self, device_type, bits, group_size, desc_act, dtype) -> bool:
        return (device_type == "cpu" and bits == 8 and dtype.is_floating_point
                and supported_group_size(group_size) and op_available())

    def prepare(self, layer) -> Int4PackedWeight:
        return convert_to_nibble_pairs(layer.qweight, layer.qzeros, layer.scales, layer.g_idx)

    def checkpoint_qweight(self, layer) -> torch.Tensor:
        return nibble_pairs_qweight(layer.kernel_state)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if uses_tiled_dequant(x.shape[0], self.op_weights_per_weight):
            return tiled_dequant_matmul(x, layer.kernel_state, halves=2)
        return nibble_pairs_matmul(x, layer.kernel_state)
