"""Many-row calls on CPU: dequantize a tile of output columns at a time, then one GEMM per tile.

PyTorch's int4 kernel costs the same per row whatever the batch (no reuse of a dequantized
weight across rows), so from some tens of rows a bfloat16 GEMM wins even counting the
dequantization. Each tile is dequantized from the op's own weight (`op_layout` reads its codes
back), as the op does, `(q - 8) * scale + offset` in float32, and rounded once to the compute
dtype: the layer holds its weight once, and only one tile of about `TILE_ELEMENTS` weights lives
at a time, never a dense copy of the layer.
"""

from __future__ import annotations

import torch

from gptq_plugins.kernels.op_layout import NIBBLE, OP_CODE_OFFSET, block_columns, read_codes

# About 8 MiB of float32 per tile: fewer, larger GEMMs (each call has a fixed cost); on the ~300M
# shapes 2**21 was faster than 2**20 (by 5-15%) and 2**19 (by 15-30%) on a Sapphire Rapids.
TILE_ELEMENTS = 1 << 21


def tile_columns(op_inputs: int, out_features: int) -> int:
    """Output columns per tile for a layer of this shape: whole blocks of the op's layout."""
    block = block_columns()
    return min(out_features, max(block, TILE_ELEMENTS // op_inputs // block * block))


def tiled_dequant_matmul(x: torch.Tensor, weight, compute_dtype: torch.dtype = torch.bfloat16,
                         halves: int = 1) -> torch.Tensor:
    """`x [M, in] @ W.T` in x's dtype, W read tile by tile from the op's weight (`Int4PackedWeight`)
    and dequantized to `compute_dtype`. `halves=2`: the op's inputs are the high then the low
    nibbles of 8-bit codes (`cpu_int8`), joined again before one dequantization."""
    packed, scales_and_zeros = weight.packed, weight.scales_and_zeros
    out_features, op_inputs = packed.shape[0], packed.shape[1] * 2
    in_features = op_inputs // halves
    xc = x.to(compute_dtype)
    if weight.input_order is not None:  # the halves share one order (`pack_for_op` sorts them alike)
        xc = xc.index_select(1, weight.input_order[:in_features])
    y = torch.empty(x.shape[0], out_features, dtype=compute_dtype, device=x.device)
    step = tile_columns(op_inputs, out_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        codes = read_codes(packed, start, stop)  # uint8 [op inputs, T]
        scale = scales_and_zeros[:, start:stop, 0].float()  # [op groups, T]
        base = scales_and_zeros[:, start:stop, 1].float() - OP_CODE_OFFSET * scale  # (q - 8) s + o == q s + base
        if halves == 2:  # (16 hi + lo) * s + both halves' bases: the high half's scale is 16 s
            high, low = codes.chunk(2)
            codes = high * NIBBLE + low
            high_base, low_base = base.chunk(2)
            scale, base = scale.chunk(2)[1], high_base + low_base
        grouped = codes.view(scale.shape[0], -1, stop - start).float()
        tile = torch.addcmul(base[:, None], grouped, scale[:, None]).view(in_features, -1)
        y[:, start:stop] = xc @ tile.to(compute_dtype)
    return y.to(x.dtype)
