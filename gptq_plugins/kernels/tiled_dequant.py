"""Many-row calls on CPU: dequantize a tile of output columns at a time, then one GEMM per tile.

PyTorch's int4 kernel costs the same per row whatever the batch (no reuse of a dequantized
weight across rows), so from some tens of rows a bfloat16 GEMM wins even counting the
dequantization. Each tile is dequantized from the checkpoint tensors the layer keeps anyway,
exactly as `dequantize_packed` (integer `q - z`, times the scale in float32) and rounded once to
the compute dtype; only one tile of about `TILE_ELEMENTS` weights lives at a time, never a
dense copy of the layer.
"""

from __future__ import annotations

import torch

from gptq_plugins.packed_words import WORD_BITS, packing_period
from gptq_plugins.packing import unpack_zeros

# About 2 MiB of float32 per tile: it stays in a core's L2 between dequantization and GEMM.
TILE_ELEMENTS = 1 << 19
TILE_MULTIPLE = 16  # columns per tile are a multiple of this (SIMD-friendly GEMM widths)


def tile_columns(in_features: int, out_features: int) -> int:
    """Output columns per tile for a layer of this shape."""
    columns = max(TILE_MULTIPLE, TILE_ELEMENTS // in_features // TILE_MULTIPLE * TILE_MULTIPLE)
    return min(columns, out_features)


def unpack_tile(words: torch.Tensor, bits: int) -> torch.Tensor:
    """`packing.unpack_rows` of a tile `[in*bits/32, T]` -> int32 `[in, T]`, in a few broadcast
    operations instead of two per value of a period (the reference's way, several times slower)."""
    period_values, period_words = packing_period(bits)
    periods, columns = words.shape[0] // period_words, words.shape[1]
    words = words.view(periods, period_words, columns)
    positions = torch.arange(period_values, device=words.device) * bits
    word_of, offset = positions // WORD_BITS, (positions % WORD_BITS).to(torch.int32)
    source = words if period_words == 1 else words.index_select(1, word_of)
    values = torch.bitwise_right_shift(source, offset.view(1, -1, 1))
    crossing = (offset + bits > WORD_BITS).nonzero().flatten().tolist()  # 3 bits: values 10 and 21
    for j in crossing:  # the arithmetic shift left sign copies where the next word's bits go
        low_bits = WORD_BITS - int(offset[j])
        values[:, j] &= (1 << low_bits) - 1
        values[:, j] |= torch.bitwise_left_shift(words[:, int(word_of[j]) + 1], low_bits)
    values &= (1 << bits) - 1
    return values.view(periods * period_values, columns)


def contiguous_group_length(g_idx: torch.Tensor, n_groups: int) -> int | None:
    """The common length of the groups if input `k` belongs to group `k // length`, else None
    (act-order or a ragged last group): then each tile gathers its rows' zeros and scales."""
    in_features = g_idx.shape[0]
    if in_features % n_groups:
        return None
    length = in_features // n_groups
    static = torch.arange(in_features, device=g_idx.device) // length
    return length if torch.equal(g_idx.long(), static) else None


def tiled_dequant_matmul(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int,
                         compute_dtype: torch.dtype) -> torch.Tensor:
    """`x [M, in] @ W.T` in x's dtype, W dequantized tile by tile to `compute_dtype`."""
    in_features, out_features = g_idx.shape[0], qweight.shape[1]
    n_groups = scales.shape[0]
    zeros = unpack_zeros(qzeros, bits, out_features)  # [n_groups, out]
    scales = scales.float()
    length = contiguous_group_length(g_idx, n_groups)
    groups = None if length is not None else g_idx.long()
    xc = x.to(compute_dtype)
    y = torch.empty(x.shape[0], out_features, dtype=compute_dtype, device=x.device)
    step = tile_columns(in_features, out_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        codes = unpack_tile(qweight[:, start:stop].contiguous(), bits)  # [in, T]
        if groups is None:  # groups of `length` consecutive rows: broadcast, no gather
            grouped = codes.view(n_groups, length, stop - start)
            grouped -= zeros[:, None, start:stop].contiguous()
            weight = grouped.float().mul_(scales[:, None, start:stop].contiguous()).view(in_features, stop - start)
        else:
            codes -= zeros[groups, start:stop]
            weight = codes.float().mul_(scales[groups, start:stop])
        y[:, start:stop] = xc @ weight.to(compute_dtype)
    return y.to(x.dtype)
