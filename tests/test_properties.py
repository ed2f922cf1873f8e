"""Property: any valid configuration on any small layer, against any Hessian a calibration can
produce (rank-deficient, all-zero, dead inputs, tiny or huge magnitudes, made indefinite by
rounding), gives finite positive float16 scales, codes on the grid, zero points the v1 layout can
store, and tensors that pack and unpack exactly, whether GPTQ succeeds, raises its damping or falls
back to round-to-nearest."""

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptq_plugins.config import SUPPORTED_BITS, QuantizeConfig
from gptq_plugins.hessian import HessianAccumulator
from gptq_plugins.packing import dequantize_packed, pack_quantized, unpack_rows, unpack_zeros
from gptq_plugins.solver import QuantizedWeight, quantize_weight, rtn

torch.set_num_threads(1)


@st.composite
def configs(draw, in_features: int) -> QuantizeConfig:
    desc_act = draw(st.booleans())
    return QuantizeConfig(
        bits=draw(st.sampled_from(SUPPORTED_BITS)),
        group_size=draw(st.sampled_from([-1] + [g for g in (16, 32, 64) if in_features % g == 0])),
        sym=draw(st.booleans()), desc_act=desc_act, static_groups=desc_act and draw(st.booleans()),
        mse_clip=draw(st.booleans()), damp_percent=draw(st.floats(1e-4, 0.5)),
        block_size=draw(st.sampled_from([16, 48, 128])))


@dataclass
class Layer:
    """How one random layer and its calibration inputs are drawn (tensors built from `seed`)."""

    out_features: int
    in_features: int
    input_rank: int        # rank of the calibration inputs; 0 gives an all-zero Hessian
    dead_inputs: int       # input columns that are always zero
    weight_scale: float
    input_scale: float
    zero_rows: int         # output rows whose weights are all zero
    indefinite_shift: float  # minus this fraction of the mean diagonal: forces damping up or RTN
    seed: int

    def tensors(self):
        g = torch.Generator().manual_seed(self.seed)
        weight = torch.randn(self.out_features, self.in_features, generator=g) * self.weight_scale
        weight[:, torch.randint(self.in_features, (2,), generator=g)] *= 50  # outlier inputs
        weight[torch.randperm(self.out_features, generator=g)[:self.zero_rows]] = 0
        tokens = 4 * self.in_features
        x = torch.randn(tokens, self.input_rank, generator=g) @ torch.randn(self.input_rank, self.in_features,
                                                                            generator=g)
        x[:, torch.randperm(self.in_features, generator=g)[:self.dead_inputs]] = 0
        acc = HessianAccumulator(self.in_features)
        acc.add(x * self.input_scale)
        hessian = acc.hessian()
        hessian.diagonal().sub_(self.indefinite_shift * hessian.diagonal().mean())
        return weight, hessian


@st.composite
def layers(draw) -> tuple[Layer, QuantizeConfig]:
    in_features = draw(st.sampled_from([32, 64, 96]))
    layer = Layer(
        out_features=draw(st.sampled_from([32, 64])), in_features=in_features,
        input_rank=draw(st.integers(0, in_features)), dead_inputs=draw(st.integers(0, in_features)),
        weight_scale=10 ** draw(st.floats(-6, 2)), input_scale=10 ** draw(st.floats(-4, 3)),
        zero_rows=draw(st.integers(0, 3)), indefinite_shift=draw(st.sampled_from([0.0, 0.0, 0.05, 2.0])),
        seed=draw(st.integers(0, 2**31 - 1)))
    return layer, draw(configs(in_features))


def assert_on_the_grid(result: QuantizedWeight, config: QuantizeConfig, in_features: int, out_features: int):
    n_groups = config.groups_for(in_features)
    scales, zeros, codes, g_idx = result.scales, result.zeros, result.codes, result.g_idx
    assert scales.shape == zeros.shape == (n_groups, out_features)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert torch.equal(scales.half().float(), scales), "scales must be stored exactly as float16"
    assert codes.dtype == torch.int32 and 0 <= int(codes.min()) and int(codes.max()) <= config.maxq
    assert 1 <= int(zeros.min()) and int(zeros.max()) <= config.maxq
    assert 0 <= int(g_idx.min()) and int(g_idx.max()) < n_groups
    assert torch.bincount(g_idx.long(), minlength=n_groups).eq(config.group_size_for(in_features)).all()
    assert torch.isfinite(result.dequantize()).all()


def assert_packs_exactly(result: QuantizedWeight, in_features: int, out_features: int):
    packed = pack_quantized(result)
    assert torch.equal(unpack_rows(packed["qweight"], result.bits, in_features), result.codes.T)
    assert torch.equal(unpack_zeros(packed["qzeros"], result.bits, out_features), result.zeros)
    assert torch.equal(dequantize_packed(**packed, bits=result.bits), result.dequantize())


@settings(max_examples=60, deadline=None, database=None)
@given(layers())
def test_gptq_and_rtn_stay_on_the_grid_and_pack_exactly(case):
    layer, config = case
    weight, hessian = layer.tensors()
    for result in (quantize_weight(weight, hessian, config), rtn(weight, config)):
        assert_on_the_grid(result, config, layer.in_features, layer.out_features)
        assert_packs_exactly(result, layer.in_features, layer.out_features)
    if not config.mse_clip:  # an unclipped grid covers each group's range: RTN is within half a step
        result = rtn(weight, config)
        step = result.scales[result.g_idx.long()].T
        assert ((weight - result.dequantize()).abs() <= step / 2 * (1 + 1e-5)).all()
