"""GPTQ results on a GGUF type's grid, packed into that type's blocks, byte for byte as ggml lays
them out (`gguf.GGML_QUANT_SIZES` gives each block's length; `gguf.quants.dequantize` reads them)."""

from __future__ import annotations

import numpy as np
import torch

from gptq_plugins.gguf_types import GGUF_TYPES
from gptq_plugins.solver import QuantizedWeight


def _float16_bytes(values: torch.Tensor) -> np.ndarray:
    """`[n_blocks, out]` float32 (float16-representable) as `[out, n_blocks, 2]` bytes."""
    return values.T.contiguous().half().numpy().view(np.uint8).reshape(*values.T.shape, 2)


def _nibbles(low4: np.ndarray) -> np.ndarray:
    """ggml's nibble order: byte j holds value j (low nibble) and value j + 16 (high nibble)."""
    return low4[..., :16] | (low4[..., 16:] << np.uint8(4))


def pack_blocks(result: QuantizedWeight, type_name: str) -> np.ndarray:
    """`[out, in / 32 * block_bytes]` uint8: row r holds its blocks in input order, as llama.cpp reads them."""
    gguf_type = GGUF_TYPES[type_name]
    grid_type = getattr(result.grid, "type", None)
    if grid_type != gguf_type:
        raise ValueError(f"pack_blocks: the weight was quantized on {grid_type.name if grid_type else 'the GPTQ v1 grid'}, "
                         f"not on GGUF {type_name}'s grid")
    out_features, in_features = result.codes.shape
    block = gguf_type.block_size
    positional = torch.arange(in_features, device=result.g_idx.device) // block
    if in_features % block or not torch.equal(result.g_idx.long(), positional):
        raise ValueError(f"pack_blocks: GGUF {type_name} needs positional blocks of {block} inputs "
                         f"(g_idx = i // {block}); got input size {in_features} with another g_idx")
    codes = result.codes.cpu().numpy().astype(np.uint8).reshape(out_features, -1, block)
    scales = _float16_bytes(result.scales.cpu())
    if gguf_type.bits == 8:
        parts = [scales, (codes.astype(np.int16) - gguf_type.zero).astype(np.int8).view(np.uint8)]
    else:
        parts = [scales] + ([_float16_bytes(result.zeros.cpu().float())] if gguf_type.affine else [])
        if gguf_type.bits == 5:
            parts.append(np.packbits((codes >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little"))
        parts.append(_nibbles(codes & np.uint8(0x0F)))
    return np.concatenate(parts, axis=-1).reshape(out_features, -1)
