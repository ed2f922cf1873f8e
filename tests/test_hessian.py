"""HessianAccumulator against `2/N X^T X` computed directly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptq_plugins import hessian as hessian_module
from gptq_plugins.hessian import HessianAccumulator

torch.set_num_threads(1)


def _direct(tokens: torch.Tensor) -> torch.Tensor:
    tokens = tokens.double().reshape(-1, tokens.shape[-1])
    return (2 / tokens.shape[0] * tokens.T @ tokens).float()


@pytest.fixture(autouse=True)
def small_strips(monkeypatch):
    """Several strips even for small layers, so the triangle bookkeeping is exercised."""
    monkeypatch.setattr(hessian_module, "STRIP_COLUMNS", 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_features", [7, 50])
def test_hessian_is_2_over_n_xtx(in_features, dtype):
    x = (torch.randn(3, 11, in_features, generator=torch.Generator().manual_seed(0)) + 0.5).to(dtype)
    acc = HessianAccumulator(in_features)
    acc.add(x)
    h = acc.hessian()
    assert h.dtype == torch.float32 and acc.num_tokens == 33
    torch.testing.assert_close(h, _direct(x.float()), rtol=1e-5, atol=1e-5)
    assert torch.equal(h, h.T)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(0, 2**16))
def test_batch_splitting_does_not_change_the_hessian(batch_sizes, seed):
    x = torch.randn(sum(batch_sizes), 37, generator=torch.Generator().manual_seed(seed)) * 3
    whole, parts = HessianAccumulator(37), HessianAccumulator(37)
    whole.add(x)
    for part in torch.split(x, batch_sizes):
        parts.add(part)
    assert parts.num_tokens == whole.num_tokens == x.shape[0]
    torch.testing.assert_close(parts.hessian(), whole.hessian(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.hessian(), _direct(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=2, max_size=8), st.integers(1, 7), st.integers(0, 2**16))
def test_partial_sums_over_shares_of_the_batches_give_the_same_bits(batch_sizes, cut, seed):
    """What ranks of a distributed run rely on: the batches shared out, the partial sums added up."""
    x = torch.randn(sum(batch_sizes), 37, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    batches = torch.split(x, batch_sizes)
    cut = min(cut, len(batches) - 1)
    whole, first, second = HessianAccumulator(37), HessianAccumulator(37), HessianAccumulator(37)
    for batch in batches:
        whole.add(batch)
    for share, part in ((first, batches[:cut]), (second, batches[cut:])):
        for batch in part:
            share.add(batch)
    added = hessian_module.hessian_from_sum(first.partial_sum() + second.partial_sum(),
                                            first.num_tokens + second.num_tokens)
    assert torch.equal(added, whole.hessian())


def test_mask_excludes_padding_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 20, generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.4
    x[~mask] = 1e4  # padding that would dominate the Hessian if counted
    acc = HessianAccumulator(20)
    acc.add(x, mask=mask.long())
    assert acc.num_tokens == int(mask.sum())
    torch.testing.assert_close(acc.hessian(), _direct(x[mask]), rtol=1e-5, atol=1e-5)


def test_fully_masked_batch_adds_nothing():
    acc = HessianAccumulator(5)
    acc.add(torch.randn(2, 3, 5), mask=torch.zeros(2, 3))
    assert acc.num_tokens == 0 and torch.equal(acc.hessian(), torch.zeros(5, 5))


def test_shape_errors_name_the_expected_dimension():
    acc = HessianAccumulator(64)
    with pytest.raises(ValueError, match="in_features=64"):
        acc.add(torch.randn(2, 63))
    with pytest.raises(ValueError, match=r"mask.*\(2, 3\)"):
        acc.add(torch.randn(2, 3, 64), mask=torch.ones(2, 4))


def test_running_mean_keeps_precision_over_many_batches():
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(2)) + 100  # large mean
    acc = HessianAccumulator(8)
    for part in x.split(1):
        acc.add(part)
    torch.testing.assert_close(acc.hessian(), _direct(x), rtol=1e-4, atol=0)


def test_bfloat16_matmul_option_stays_close_to_float32():
    x = torch.randn(6, 64, 40, generator=torch.Generator().manual_seed(3))
    exact, fast = HessianAccumulator(40), HessianAccumulator(40, matmul_dtype=torch.bfloat16)
    for batch in x:
        exact.add(batch)
        fast.add(batch)
    assert fast.hessian().dtype == torch.float32
    difference = (fast.hessian() - exact.hessian()).norm() / exact.hessian().norm()
    assert 0 < difference < 5e-3


def test_matmul_dtype_must_be_float32_or_bfloat16():
    with pytest.raises(ValueError, match="matmul_dtype"):
        HessianAccumulator(8, matmul_dtype=torch.float16)
