"""Properties of the per-row quantization grid (scale, zero point, codes)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gptq_plugins.grid import MSE_NORM, dequantize_codes, find_params, quantize_codes

torch.set_num_threads(1)

BITS = st.sampled_from([2, 3, 4, 8])
# Rows of mixed magnitude (down to float16-subnormal scales), with exact zeros and one-signed rows.
MAGNITUDE = st.sampled_from([1e-7, 1e-4, 0.02, 1.0, 300.0])
VALUES = arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
                elements=st.floats(-1, 1, width=32) | st.just(0.0))


def _rows(values, magnitude, sign):
    w = torch.from_numpy(values) * magnitude
    return w.abs() * sign if sign else w


def _check_grid(w, scale, zero, bits):
    maxq = (1 << bits) - 1
    assert scale.dtype == torch.float32 and zero.dtype == torch.float32
    assert scale.shape == zero.shape == (w.shape[0],)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(scale, scale.half().float()), "scales must be float16-representable"
    assert torch.equal(zero, zero.round()) and (zero >= 1).all() and (zero <= maxq).all()


@settings(max_examples=300, deadline=None)
@given(VALUES, MAGNITUDE, st.sampled_from([0, 1, -1]), BITS, st.booleans())
def test_grid_covers_the_row_within_half_a_step(values, magnitude, sign, bits, sym):
    w = _rows(values, magnitude, sign)
    scale, zero = find_params(w, bits, sym)
    _check_grid(w, scale, zero, bits)
    codes = quantize_codes(w, scale, zero, (1 << bits) - 1)
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() <= (1 << bits) - 1
    error = (dequantize_codes(codes, scale, zero) - w).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()


@settings(max_examples=100, deadline=None)
@given(VALUES, MAGNITUDE, BITS, st.booleans())
def test_mse_clip_never_increases_the_searched_error(values, magnitude, bits, sym):
    w = torch.from_numpy(values) * magnitude
    maxq = (1 << bits) - 1

    def row_error(scale, zero):
        deq = dequantize_codes(quantize_codes(w, scale, zero, maxq), scale, zero)
        return (deq - w).abs().pow(MSE_NORM).sum(dim=1)

    scale, zero = find_params(w, bits, sym, mse_clip=True)
    _check_grid(w, scale, zero, bits)
    assert (row_error(scale, zero) <= row_error(*find_params(w, bits, sym)) * (1 + 1e-5)).all()


def test_mse_clip_shrinks_the_range_of_a_row_with_one_outlier():
    w = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    w[:, 5] = 0.5
    plain, _ = find_params(w, 4, sym=False)
    clipped, _ = find_params(w, 4, sym=False, mse_clip=True)
    assert (clipped < plain).all()


def test_mse_clip_is_the_same_in_row_chunks(monkeypatch):
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(1))
    whole = find_params(w, 3, sym=False, mse_clip=True)
    monkeypatch.setattr("gptq_plugins.grid.MSE_CHUNK_ELEMENTS", 1)  # one row per chunk
    for a, b in zip(whole, find_params(w, 3, sym=False, mse_clip=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sym", [True, False])
def test_all_zero_rows_get_a_tiny_valid_grid(sym):
    w = torch.zeros(2, 16)
    scale, zero = find_params(w, 4, sym)
    _check_grid(w, scale, zero, 4)
    assert (scale < 1e-6).all()
    assert torch.equal(dequantize_codes(quantize_codes(w, scale, zero, 15), scale, zero), w)


def test_asym_zero_that_would_round_to_0_is_raised_to_1_and_keeps_the_row_max():
    w = torch.tensor([[-0.01, 0.3, 1.0]])  # -xmin/scale = 0.15 rounds to zero point 0
    scale, zero = find_params(w, 4, sym=False)
    assert zero.item() == 1
    assert (15 - zero.item()) * scale.item() >= 1.0
    codes = quantize_codes(w, scale, zero, 15)
    assert codes[0, 2] == 15 and codes[0, 0] == 1  # -0.01 rounds onto the zero point


def test_plain_grid_matches_gptq_find_params_on_an_ordinary_row():
    """Away from the project rules (float16 rounding, zero >= 1) this is GPTQ's formula."""
    w = torch.tensor([[-0.75, 0.1, 0.5]])
    scale, zero = find_params(w, 4, sym=False)
    assert scale.item() == pytest.approx(1.25 / 15, rel=1e-3) and zero.item() == 9
    scale, zero = find_params(w, 4, sym=True)
    assert scale.item() == pytest.approx(1.5 / 15, rel=1e-3) and zero.item() == 8


def test_params_broadcast_over_leading_dims():
    w = torch.randn(4, 3, 8)
    scale, zero = torch.rand(4, 3) + 0.1, torch.full((4, 3), 8.0)
    codes = quantize_codes(w, scale, zero, 15)
    assert torch.equal(codes[2, 1], quantize_codes(w[2, 1][None], scale[2, 1, None], zero[2, 1, None], 15)[0])
