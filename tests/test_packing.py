"""The v1 layout of `gptq_plugins.packing`, checked against an independent bit-stream model.

`stream_read`/`stream_write` below go through numpy's little-endian bit (un)packing of the
words' bytes: a different construction from packing.py's shifts, so agreement proves the layout
(value i at stream bits [i*bits, (i+1)*bits), word w = stream bits [32w, 32w+32)) rather than
self-consistency.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gptq_plugins.packed_words import packing_period
from gptq_plugins.packing import dequantize_packed, pack_quantized, pack_rows, unpack_rows
from gptq_plugins.solver import QuantizedWeight

BITS = (2, 3, 4, 8)


def stream_read(packed: torch.Tensor, bits: int, n: int) -> np.ndarray:
    """Values [n, m] of the bit streams running down each column of int32 words."""
    words = packed.numpy().astype("<i4")
    out = np.empty((n, words.shape[1]), dtype=np.int64)
    for col in range(words.shape[1]):
        stream = np.unpackbits(np.ascontiguousarray(words[:, col]).view(np.uint8), bitorder="little")
        out[:, col] = stream[:n * bits].reshape(n, bits) @ (1 << np.arange(bits))
    return out


def stream_write(values: np.ndarray, bits: int) -> torch.Tensor:
    """Words [n*bits/32, m] holding each column's values as one little-endian bit stream."""
    n, m = values.shape
    columns = []
    for col in range(m):
        stream = ((values[:, col, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
        columns.append(np.packbits(stream, bitorder="little").view("<i4"))
    return torch.from_numpy(np.stack(columns, axis=1).astype(np.int32))


def random_quantized(out_features: int, in_features: int, bits: int, group_size: int,
                     act_order: bool, seed: int = 0, scales=None) -> QuantizedWeight:
    """A `QuantizedWeight` with random codes, zero points and float16-representable scales."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    group = in_features if group_size == -1 else group_size
    n_groups = -(-in_features // group)  # a last, shorter group where group does not divide
    g_idx = torch.arange(in_features) // group
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    if scales is None:
        scales = (torch.rand(n_groups, out_features, generator=gen) * 0.02 + 1e-3).half().float()
    return QuantizedWeight(
        codes=torch.randint(0, maxq + 1, (out_features, in_features), generator=gen, dtype=torch.int32),
        scales=scales,
        zeros=torch.randint(1, maxq + 1, (n_groups, out_features), generator=gen, dtype=torch.int32),
        g_idx=g_idx.to(torch.int32), bits=bits, group_size=group_size, damp_percent=0.01,
        loss=float("nan"))


def test_known_words():
    # 4-bit: eight values fill one word, first value in the lowest nibble.
    assert pack_rows(torch.arange(1, 9).view(8, 1), 4).item() == np.int32(np.uint32(0x87654321))
    # 3-bit: value 10 occupies stream bits 30, 31 (word 0) and 32 (word 1's bit 0).
    values = torch.zeros(32, 1, dtype=torch.int32)
    values[10] = 0b101
    assert pack_rows(values, 3).view(-1).tolist() == [1 << 30, 1, 0]


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_bit_stream_model(bits):
    period = packing_period(bits)[0]
    values = torch.randint(0, 1 << bits, (3 * period, 5), dtype=torch.int32)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3 * period * bits // 32, 5)
    assert torch.equal(packed, stream_write(values.numpy().astype(np.int64), bits))
    assert np.array_equal(stream_read(packed, bits, values.shape[0]), values.numpy())


@st.composite
def packable_values(draw):
    bits = draw(st.sampled_from(BITS))
    n = packing_period(bits)[0] * draw(st.integers(1, 4))
    shape = (n, draw(st.integers(1, 6)))
    return bits, draw(arrays(np.int32, shape, elements=st.integers(0, (1 << bits) - 1)))


@settings(max_examples=60, deadline=None)
@given(packable_values())
def test_round_trip_and_layout(case):
    bits, values = case
    values = torch.from_numpy(values)
    packed = pack_rows(values, bits)
    assert torch.equal(unpack_rows(packed, bits, values.shape[0]), values)
    assert np.array_equal(stream_read(packed, bits, values.shape[0]), values.numpy())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size, n_groups", [(32, 4), (48, 3)])  # 48: groups of 48, 48, 32
def test_pack_quantized_checkpoint_tensors(bits, act_order, group_size, n_groups):
    qw = random_quantized(out_features=64, in_features=128, bits=bits, group_size=group_size,
                          act_order=act_order)
    packed = pack_quantized(qw)
    assert packed["qweight"].shape == (128 * bits // 32, 64)
    assert packed["qzeros"].shape == (n_groups, 64 * bits // 32)
    assert packed["scales"].dtype == torch.float16 and packed["g_idx"].dtype == torch.int32
    # qweight packs codes down the input dim; qzeros packs zero - 1 along the output dim.
    assert np.array_equal(stream_read(packed["qweight"], bits, 128), qw.codes.T.numpy())
    assert np.array_equal(stream_read(packed["qzeros"].T.contiguous(), bits, 64), (qw.zeros - 1).T.numpy())
    assert torch.equal(dequantize_packed(**packed, bits=bits), qw.dequantize())


@pytest.mark.parametrize("group_size", [32, 40])  # 40: a ragged last group of 16, as the Hub stores it
def test_dequantize_packed_matches_stock_formula(group_size):
    """w = scales[g_idx] * (code - (stored_zero + 1)), written out from the bit-stream model."""
    qw = random_quantized(64, 96, 3, group_size, act_order=True, seed=3)
    assert qw.scales.shape[0] == -(-96 // group_size)
    packed = pack_quantized(qw)
    codes = torch.from_numpy(stream_read(packed["qweight"], 3, 96))          # [in, out]
    stored = torch.from_numpy(stream_read(packed["qzeros"].T.contiguous(), 3, 64)).T  # [groups, out]
    g = packed["g_idx"].long()
    expected = (packed["scales"].float()[g] * (codes - (stored[g] + 1)).float()).T
    assert torch.equal(dequantize_packed(**packed, bits=3), expected)


@pytest.mark.parametrize("call, argument", [
    (lambda: pack_rows(torch.zeros(8, 2, dtype=torch.int32), 5), "bits"),
    (lambda: pack_rows(torch.full((8, 2), 16, dtype=torch.int32), 4), "values"),
    (lambda: pack_rows(torch.full((8, 2), -1, dtype=torch.int32), 4), "values"),
    (lambda: pack_rows(torch.zeros(8, 2), 4), "values"),
    (lambda: pack_rows(torch.zeros(16, 2, dtype=torch.int32), 3), "values"),
    (lambda: pack_rows(torch.zeros(8, dtype=torch.int32), 4), "values"),
    (lambda: unpack_rows(torch.zeros(3, 2, dtype=torch.int32), 4, 16), "packed"),
    (lambda: unpack_rows(torch.zeros(2, 2, dtype=torch.int64), 4, 16), "packed"),
])
def test_bad_inputs_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        call()


def test_bad_checkpoint_tensors_name_the_tensor():
    qw = random_quantized(32, 64, 4, 32, act_order=False)
    packed = pack_quantized(qw)
    with pytest.raises(ValueError, match="^zeros"):
        pack_quantized(QuantizedWeight(**{**qw.__dict__, "zeros": qw.zeros * 0}))
    with pytest.raises(ValueError, match="^codes"):
        pack_quantized(QuantizedWeight(**{**qw.__dict__, "codes": qw.codes + 16}))
    with pytest.raises(ValueError, match="^qzeros"):
        dequantize_packed(packed["qweight"], packed["qzeros"][:, :2], packed["scales"], packed["g_idx"], 4)
    with pytest.raises(ValueError, match="^qweight"):
        dequantize_packed(packed["qweight"][:4], packed["qzeros"], packed["scales"], packed["g_idx"], 4)
    with pytest.raises(ValueError, match="^g_idx"):
        dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"] + 1, 4)
