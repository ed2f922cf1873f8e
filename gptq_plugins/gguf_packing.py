"""GPTQ results on a GGUF type's grid, packed into that type's blocks, byte for byte as ggml lays
them out (`gguf.GGML_QUANT_SIZES` gives each block's length; `gguf.quants.dequantize` reads them)."""

from __future__ import annotations

import numpy as np
import torch

from gptq_plugins.solver import QuantizedWeight


def _float16_bytes(values: torch.Tensor) -> np.ndarray:
    """`[n_blocks, out]` float32 (float16-representable) as `[out, n_blocks, 2]` bytes."""
    return values.T.contiguous().half().numpy().view(np.uint8).reshape(*values.T.shape, 2)


def _nibbles(low4: np.ndarray) -> np.ndarray:
    """ggml's nibble order: byte j holds value j (low nibble) and value j + 16 (high nibble)."""
    return low4[..., :16] | (low4[..., 16:] << np.uint8(4))


def _sub_block_integers(values: torch.Tensor, super_values: torch.Tensor, per_super: int) -> np.ndarray:
    """The integer `sc` (or `m`) of each sub-block, `[out, n_super, per_super]`, from its effective
    `d * sc` (exact float32 products, so the division rounds back to the integer)."""
    per_row = values.T.reshape(values.shape[1], -1, per_super)
    return torch.round(per_row / super_values[..., None]).to(torch.int64).numpy()


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and minimums: bytes 0-3 and 4-7 hold sc[0-3] and
    m[0-3] in their low 6 bits and the top 2 bits of sc[4-7] / m[4-7]; bytes 8-11 the low 4 bits
    of sc[4-7] (low nibble) and m[4-7] (high nibble)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    low = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    high = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=-1)


def _k_nibbles(codes: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes: four chunks of 32, chunk c holding sub-block 2c (low nibbles) and 2c + 1."""
    pairs = (codes & np.uint8(0x0F)).reshape(*codes.shape[:-1], 4, 2, 32)
    return (pairs[..., 0, :] | (pairs[..., 1, :] << np.uint8(4))).reshape(*codes.shape[:-1], 128)


def _pack_k(result: QuantizedWeight, codes: np.ndarray) -> list[np.ndarray]:
    grid, gguf_type = result.grid, result.grid.type
    per_super = gguf_type.super_block // gguf_type.block_size
    d = grid.super_scales.cpu()
    sc = _sub_block_integers(result.scales.cpu(), d, per_super)
    d_bytes = _float16_bytes(d.T)
    if gguf_type.name == "Q6_K":
        half = codes.reshape(*codes.shape[:-1], 2, 128)
        ql = (half[..., :64] & 0x0F) | ((half[..., 64:] & 0x0F) << 4)
        quarters = ((half >> 4) & 0x03).reshape(*half.shape[:-1], 4, 32)
        qh = quarters[..., 0, :] | (quarters[..., 1, :] << 2) | (quarters[..., 2, :] << 4) | (quarters[..., 3, :] << 6)
        flat = (*codes.shape[:-1], -1)
        return [ql.reshape(flat), qh.reshape(flat), sc.astype(np.int8).view(np.uint8), d_bytes]
    dmin = grid.super_mins.cpu()
    m = _sub_block_integers(-result.zeros.cpu().float(), dmin, per_super)
    parts = [d_bytes, _float16_bytes(dmin.T), _k_scales(sc, m)]
    if gguf_type.bits == 5:  # bit j of byte i: the high bit of element i of sub-block j
        high = ((codes >> 4) & 1).reshape(*codes.shape[:-1], 8, 32)
        parts.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[:, None], axis=-2))
    parts.append(_k_nibbles(codes))
    return parts


def pack_blocks(result: QuantizedWeight) -> np.ndarray:
    """`[out, in / block * block_bytes]` uint8 of the weight's GGUF type (`result.grid.type`): row r
    holds its blocks in input order, as llama.cpp reads them."""
    gguf_type = getattr(result.grid, "type", None)
    if gguf_type is None:
        raise ValueError("pack_blocks: the weight was quantized on the GPTQ v1 grid, not on a GGUF type's grid")
    out_features, in_features = result.codes.shape
    block = gguf_type.super_block or gguf_type.block_size
    positional = torch.arange(in_features, device=result.g_idx.device) // gguf_type.block_size
    if in_features % block or not torch.equal(result.g_idx.long(), positional):
        raise ValueError(f"pack_blocks: GGUF {gguf_type.name} needs positional blocks of {gguf_type.block_size} "
                         f"inputs in rows of whole {block}-input blocks; got input size {in_features} and another g_idx")
    codes = result.codes.cpu().numpy().astype(np.uint8).reshape(out_features, -1, block)
    if gguf_type.super_block:
        parts = _pack_k(result, codes)
    elif gguf_type.bits == 8:
        parts = [_float16_bytes(result.scales.cpu()), (codes.astype(np.int16) - gguf_type.zero).astype(np.int8).view(np.uint8)]
    else:
        parts = [_float16_bytes(result.scales.cpu())]
        if gguf_type.affine:
            parts.append(_float16_bytes(result.zeros.cpu().float()))
        if gguf_type.bits == 5:
            parts.append(np.packbits((codes >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little"))
        parts.append(_nibbles(codes & np.uint8(0x0F)))
    return np.concatenate(parts, axis=-1).reshape(out_features, -1)
