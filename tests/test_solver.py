"""GPTQ solver: quality against RTN, agreement with a plain column-by-column OBS reference,
and the guards (dead inputs, damping escalation, RTN fallback, non-finite inputs)."""

import pytest
import torch

from gptq_plugins.config import QuantizeConfig
from gptq_plugins.grid import dequantize_codes, find_params, quantize_codes
from gptq_plugins.hessian import HessianAccumulator
from gptq_plugins.solver import QuantizedWeight, quantize_weight, rtn

torch.set_num_threads(1)


def correlated_layer(size, seed=0, outliers=8):
    """W ~ N(0, 0.02); inputs X = Z A, A with a decaying spectrum and outlier channels x20.

    Returns the weight and a function drawing `n` input tokens, so held-out inputs come from the
    same distribution as the calibration ones.
    """
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.exp(-torch.arange(size) / size)
    mixing = spectrum[:, None] * torch.randn(size, size, generator=g) / size ** 0.5
    mixing[:, torch.randperm(size, generator=g)[:outliers]] *= 20
    weight = torch.randn(size, size, generator=g) * 0.02
    return weight, lambda n: torch.randn(n, size, generator=g) @ mixing


def calibrated(size, tokens, seed=0):
    weight, draw = correlated_layer(size, seed)
    acc = HessianAccumulator(size)
    acc.add(draw(tokens))
    return weight, acc.hessian(), draw


def output_error(weight, approx, x):
    return float(((weight - approx) @ x.T).square().sum() / (weight @ x.T).square().sum())


def reference_gptq(weight, hessian, config):
    """The paper's algorithm without lazy batching or Cholesky, in float64: quantize one column,
    spread its error with the OBS update, and remove it from the explicit inverse Hessian."""
    w, h = weight.double().clone(), hessian.double().clone()
    n = w.shape[1]
    size = n if config.group_size == -1 else config.group_size
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(h.diagonal(), descending=True) if config.desc_act else torch.arange(n)
    static = [find_params(w[:, c:c + size].float(), config.bits, config.sym) for c in range(0, n, size)]
    h += config.damp_percent * h.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h[order][:, order])
    w = w[:, order]
    codes = torch.zeros(w.shape, dtype=torch.int32)
    group_of, grids, loss = torch.zeros(n, dtype=torch.int32), [], 0.0
    fixed_groups = config.static_groups or config.group_size == -1
    for j in range(n):
        column = order[j]
        if fixed_groups:  # grids of the original column order, picked per column
            group_of[column] = column // size
            scale, zero = static[column // size]
        else:  # grids of the quantization order, from the updated weights at each group start
            group_of[column] = j // size
            if j % size == 0:
                grids.append(find_params(w[:, j:j + size].float(), config.bits, config.sym))
            scale, zero = grids[-1]
        codes[:, j] = quantize_codes(w[:, j], scale, zero, config.maxq)
        q = dequantize_codes(codes[:, j], scale, zero).double()
        loss += float(((w[:, j] - q) ** 2).sum() / hinv[j, j]) / 2
        w[:, j + 1:] -= torch.outer((w[:, j] - q) / hinv[j, j], hinv[j, j + 1:])
        hinv -= torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    grids = static if fixed_groups else grids
    codes[:, order] = codes.clone()
    scales = torch.stack([s for s, _ in grids])
    zeros = torch.stack([z for _, z in grids]).to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, group_of, config.bits, config.group_size,
                           config.damp_percent, loss)


REFERENCE_CASES = {
    "plain": dict(),
    "sym": dict(sym=True),
    "act-order": dict(desc_act=True),
    "act-order static": dict(desc_act=True, static_groups=True),
    "one group per row": dict(group_size=-1),
    "groups smaller than blocks": dict(group_size=32, block_size=48),
    "groups larger than blocks": dict(group_size=64, block_size=24, desc_act=True),
    "3 bits": dict(bits=3, group_size=32),
    # Ragged: 256 inputs in groups of 96, 96 and a last, shorter one of 64.
    "ragged": dict(group_size=96),
    "ragged act-order": dict(group_size=96, desc_act=True),
    "ragged act-order static": dict(group_size=96, desc_act=True, static_groups=True),
    "ragged groups larger than blocks": dict(group_size=96, block_size=40, sym=True),
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_matches_column_by_column_reference(case):
    options = dict(bits=4, group_size=64, sym=False) | REFERENCE_CASES[case]
    config = QuantizeConfig(**options)
    weight, hessian, _ = calibrated(256, 2048, seed=3)
    weight = weight[:96]
    result, expected = quantize_weight(weight, hessian, config), reference_gptq(weight, hessian, config)
    assert result.codes.shape == weight.shape and result.codes.dtype == torch.int32
    assert torch.equal(result.g_idx, expected.g_idx)
    assert (result.codes == expected.codes).float().mean() >= 0.999
    torch.testing.assert_close(result.scales, expected.scales, rtol=2e-3, atol=0)
    torch.testing.assert_close(result.dequantize(), expected.dequantize(), rtol=0, atol=0.01)
    assert result.loss == pytest.approx(expected.loss, rel=1e-3)
    assert result.fallback is None and result.damp_percent == config.damp_percent


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_rtn_on_a_correlated_layer(desc_act):
    config = QuantizeConfig(bits=4, group_size=128, sym=False, desc_act=desc_act)
    weight, hessian, draw = calibrated(512, 8192)
    held_out = draw(4096)
    gptq_error = output_error(weight, quantize_weight(weight, hessian, config).dequantize(), held_out)
    rtn_error = output_error(weight, rtn(weight, config).dequantize(), held_out)
    assert gptq_error <= (0.3 if desc_act else 0.6) * rtn_error


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("size, group", [(128, 32), (160, 64)])  # 160: groups of 64, 64 and 32
def test_group_aware_order_is_gptq_on_whole_groups_reordered_with_contiguous_g_idx(sym, size, group):
    """Group-aware act-order = plain GPTQ on the columns permuted group-wise (whole groups by
    summed Hessian diagonal, a ragged last group kept last, columns within each group by
    diagonal), mapped back to the input order."""
    config = QuantizeConfig(bits=3, group_size=group, sym=sym)
    weight, hessian, _ = calibrated(size, 1024)
    result = quantize_weight(weight, hessian, config.replace(act_group_aware=True))

    whole = size // group * group
    diagonal = hessian.diagonal()
    by_group = diagonal[:whole].reshape(-1, group)
    group_order = torch.argsort(by_group.sum(dim=1), descending=True).tolist() + list(range(whole // group, -(-size // group)))
    perm = torch.cat([g * group + torch.argsort(diagonal[g * group:(g + 1) * group], descending=True)
                      for g in group_order])
    plain = quantize_weight(weight[:, perm], hessian[perm][:, perm], config)
    assert torch.equal(result.g_idx, torch.arange(size, dtype=torch.int32) // group)
    assert torch.equal(result.codes, plain.codes[:, torch.argsort(perm)])
    assert torch.equal(result.scales[group_order], plain.scales)
    assert torch.equal(result.zeros[group_order], plain.zeros)
    torch.testing.assert_close(result.dequantize(), plain.dequantize()[:, torch.argsort(perm)])


@pytest.mark.parametrize("group_size", [-1, 32])
def test_gptaq_fits_the_float_output_from_perturbed_inputs(group_size):
    """With the quantized model's inputs `x` off the float model's `r`, GPTAQ's layer is closer to
    the float output `W r` than GPTQ's; its lazy block update is exact; no asymmetry is GPTQ."""
    from gptq_plugins.hessian import AsymmetryAccumulator

    weight, draw = correlated_layer(128, seed=1)
    r = draw(4096)
    x = r + 0.3 * draw(4096)
    hessian_acc, asymmetry_acc = HessianAccumulator(128), AsymmetryAccumulator(128)
    hessian_acc.add(x)
    asymmetry_acc.add(r, x)
    hessian, asymmetry = hessian_acc.hessian(), asymmetry_acc.asymmetry()
    config = QuantizeConfig(bits=3, group_size=group_size)

    def float_output_error(result):
        target = r @ weight.T
        return float((x @ result.dequantize().T - target).square().sum() / target.square().sum())

    plain = quantize_weight(weight, hessian, config)
    gptaq = quantize_weight(weight, hessian, config, asymmetry)
    assert float_output_error(gptaq) < 0.99 * float_output_error(plain)
    assert torch.equal(quantize_weight(weight, hessian, config.replace(block_size=1 if group_size == -1 else 32),
                                       asymmetry).codes, gptaq.codes)
    assert torch.equal(quantize_weight(weight, hessian, config, torch.zeros(128, 128)).codes, plain.codes)


def test_loss_is_the_output_space_loss_of_the_damped_hessian():
    """GPTQ's per-column OBS losses add up to 1/2 tr(dW H dW^T), H dampened as in the solve."""
    config = QuantizeConfig(bits=3, group_size=32, sym=False, desc_act=True)
    weight, hessian, _ = calibrated(128, 512)
    qw = quantize_weight(weight, hessian, config)
    delta = (weight - qw.dequantize()).double()
    damped = hessian.double() + config.damp_percent * hessian.diagonal().mean() * torch.eye(128)
    assert qw.loss == pytest.approx(float(((delta @ damped) * delta).sum()) / 2, rel=1e-4)


def test_dequantize_is_the_contract_formula():
    config = QuantizeConfig(bits=4, group_size=32, sym=False, desc_act=True)
    weight, hessian, _ = calibrated(128, 512)
    qw = quantize_weight(weight, hessian, config)
    g = qw.g_idx.long()
    expected = (qw.codes - qw.zeros[g].T).float() * qw.scales[g].T
    assert torch.equal(qw.dequantize(), expected)
    assert qw.scales.shape == qw.zeros.shape == (4, 128) and qw.zeros.dtype == torch.int32
    assert qw.codes.is_contiguous() and qw.g_idx.dtype == torch.int32
    assert qw.codes.min() >= 0 and qw.codes.max() <= 15 and qw.zeros.min() >= 1
    assert torch.equal(qw.scales, qw.scales.half().float())
    assert torch.equal(torch.bincount(qw.g_idx), torch.full((4,), 32))


def test_dead_inputs_are_zeroed_and_the_rest_still_solved():
    config = QuantizeConfig(bits=4, group_size=32, sym=False, desc_act=True)
    weight, hessian, _ = calibrated(128, 512)
    dead = torch.tensor([0, 5, 77])
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    qw = quantize_weight(weight, hessian, config)
    assert qw.fallback is None and torch.isfinite(torch.tensor(qw.loss))
    assert torch.equal(qw.dequantize()[:, dead], torch.zeros(128, 3))
    expected = reference_gptq(weight, hessian, config)
    assert (qw.codes == expected.codes).float().mean() >= 0.999


def _indefinite_hessian(size, lowest_eigenvalue):
    """Unit eigenvalues but one, so the damping needed to factorise it is known."""
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(4)))
    eigenvalues = torch.ones(size)
    eigenvalues[0] = lowest_eigenvalue
    return q @ torch.diag(eigenvalues) @ q.T


def test_damping_is_raised_until_cholesky_succeeds_and_recorded():
    hessian = _indefinite_hessian(64, lowest_eigenvalue=-0.05)  # needs damping > 5% of mean diag
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 0.02
    qw = quantize_weight(weight, hessian, QuantizeConfig(group_size=32, damp_percent=0.01))
    assert qw.damp_percent == pytest.approx(0.1) and qw.fallback is None
    assert torch.isfinite(qw.dequantize()).all()


def test_falls_back_to_rtn_with_a_reason_when_damping_cannot_help():
    hessian = _indefinite_hessian(64, lowest_eigenvalue=-30.0)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 0.02
    config = QuantizeConfig(group_size=32)
    qw = quantize_weight(weight, hessian, config)
    assert "round-to-nearest" in qw.fallback and "damping 1" in qw.fallback
    assert qw.damp_percent == 1.0
    assert torch.equal(qw.codes, rtn(weight, config).codes)


@pytest.mark.parametrize("in_features", [64, 56])  # 56: a last, shorter group of 8
def test_rtn_rounds_each_contiguous_group_to_nearest(in_features):
    config = QuantizeConfig(bits=3, group_size=16, sym=False)
    weight = torch.randn(8, in_features, generator=torch.Generator().manual_seed(6))
    qw = rtn(weight, config)
    assert torch.equal(qw.g_idx, torch.arange(in_features, dtype=torch.int32) // 16)
    assert qw.scales.shape == (-(-in_features // 16), 8)
    for g in range(qw.scales.shape[0]):
        columns = weight[:, 16 * g:16 * (g + 1)]
        scale, zero = find_params(columns, 3, sym=False)
        assert torch.equal(qw.codes[:, 16 * g:16 * (g + 1)], quantize_codes(columns, scale, zero, 7))
    assert torch.isnan(torch.tensor(qw.loss))  # no Hessian, no output-space loss


@pytest.mark.parametrize("bad", ["weight", "hessian"])
def test_non_finite_inputs_are_rejected_by_name(bad):
    weight, hessian, _ = calibrated(64, 256)
    {"weight": weight, "hessian": hessian}[bad][3, 4] = float("nan")
    with pytest.raises(ValueError, match=f"{bad} has 1 non-finite"):
        quantize_weight(weight, hessian, QuantizeConfig(group_size=32))


def test_hessian_shape_must_match_the_weight():
    with pytest.raises(ValueError, match=r"hessian must be \[64, 64\]"):
        quantize_weight(torch.zeros(32, 64), torch.eye(32), QuantizeConfig(group_size=32))
