"""`QuantLinear`: checkpoint-compatible buffers, forward against the reference, backend choice."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from test_packing import random_quantized

from gptq_plugins.hookspecs import hookimpl
from gptq_plugins.kernels.cpu_int4 import PREFILL_ROWS
from gptq_plugins.kernels import (BUILTIN_BACKENDS, CpuInt4Backend, CpuInt8Backend, DenseBackend, TritonBackend,
                                  select_backend)
from gptq_plugins.packing import pack_quantized
from gptq_plugins.plugins import get_plugin_manager
from gptq_plugins.quant_linear import QuantLinear


@pytest.mark.parametrize("bits, group_size, bias", [(4, 128, True), (3, 32, False), (2, -1, True),
                                                    (8, 64, False)])
def test_state_dict_holds_exactly_the_checkpoint_tensors(bits, group_size, bias):
    layer = QuantLinear(256, 64, bits, group_size, bias=bias)
    n_groups = 1 if group_size == -1 else 256 // group_size
    expected = {"qweight": ((256 * bits // 32, 64), torch.int32),
                "qzeros": ((n_groups, 64 * bits // 32), torch.int32),
                "scales": ((n_groups, 64), torch.float16),
                "g_idx": ((256,), torch.int32)}
    if bias:
        expected["bias"] = ((64,), torch.float16)
    layer.scales.fill_(1)
    layer(torch.randn(2, 256, dtype=torch.float16))  # prepares a kernel: must not leak into state
    assert {k: (tuple(v.shape), v.dtype) for k, v in layer.state_dict().items()} == expected


def test_loads_a_checkpoint_state_dict_and_reprepares():
    """Checkpoint keys `<module>.qweight` etc. load as is; a reload replaces the kernel's state."""
    model = torch.nn.Sequential(QuantLinear(256, 64, 4, 128, bias=True, dtype=torch.float32))
    x = torch.randn(3, 256)
    for seed in (0, 1):
        qw = random_quantized(64, 256, 4, 128, act_order=True, seed=seed)
        bias = torch.randn(64)
        checkpoint = {f"0.{k}": v for k, v in pack_quantized(qw).items()} | {"0.bias": bias.half()}
        model.load_state_dict(checkpoint)
        reference = x @ qw.dequantize().T + bias.half().float()
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0.02 * reference.abs().max().item())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_forward_matches_reference(bits, act_order):
    qw = random_quantized(64, 256, bits, 64, act_order=act_order, seed=bits)
    bias = torch.randn(64)
    layer = QuantLinear.from_quantized(qw, bias=bias, dtype=torch.float32)
    assert torch.equal(layer.dequantize(), qw.dequantize())
    assert layer.desc_act == act_order
    x = torch.randn(2, 3, 256)
    y = layer(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.float32
    reference = x @ qw.dequantize().T + bias
    # 2/3/4/8-bit run on the int4 kernel in bfloat16 where the CPU has it; on AVX2 float32 models
    # multiply the cached float32 weight.
    tolerance = 0.02 * reference.abs().max().item() if layer.backend.name in ("cpu_int4", "cpu_int8") else 1e-4
    torch.testing.assert_close(y, reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize("bits, out_features, group_size, expected", [
    (4, 64, 128, "cpu_int4"),
    (4, 64, -1, "cpu_int4"),
    (3, 64, 128, "cpu_int4"),  # 2/3-bit codes are int4 codes
    (2, 64, 32, "cpu_int4"),
    (8, 64, 128, "cpu_int8"),  # two 4-bit codes per weight
    (8, 24, 128, "dense"),
    (4, 24, 128, "dense"),  # the int4 op declines 24 outputs: next candidate
    (4, 64, 16, "dense"),   # no int4 sub-group size divides 16
])
def test_post_init_picks_expected_backend(bits, out_features, group_size, expected, monkeypatch):
    monkeypatch.setattr("gptq_plugins.kernels.base.native_bfloat16", lambda device: True)
    qw = random_quantized(out_features, 256, bits, group_size, act_order=False)
    layer = QuantLinear.from_quantized(qw, dtype=torch.float32)
    layer.post_init()
    assert layer.backend.name == expected
    assert f"backend={expected}" in repr(layer)


def test_ragged_layer_the_int4_op_declines_falls_back_with_the_reason_logged(monkeypatch, caplog):
    """160 inputs in groups of 64 (64, 64, 32) share sub-groups of 32, so cpu_int4 takes them; 80
    inputs leave a last group of 16, which no sub-group length of the op divides: declined."""
    monkeypatch.setattr("gptq_plugins.kernels.base.native_bfloat16", lambda device: True)
    taken = QuantLinear.from_quantized(random_quantized(32, 160, 4, 64, act_order=False), dtype=torch.float32)
    taken.post_init()
    assert taken.backend.name == "cpu_int4"
    declined = QuantLinear.from_quantized(random_quantized(32, 80, 4, 64, act_order=False), dtype=torch.float32)
    with caplog.at_level("INFO", logger="gptq_plugins"):
        declined.post_init()
    assert declined.backend.name == "dense"
    assert "a 32x80 layer runs on dense; declined: cpu_int4: groups of [16, 64] columns" in caplog.text
    x = torch.randn(3, 80)
    torch.testing.assert_close(declined(x), x @ declined.dequantize().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native-bfloat16", "avx2"])
def test_select_backend_by_device_dtype_and_isa(native, monkeypatch):
    monkeypatch.setattr("gptq_plugins.kernels.base.native_bfloat16", lambda device: native)
    # The int4 op rounds activations to bfloat16: chosen for float16/32 only where bfloat16 is native.
    expected = CpuInt4Backend if native else DenseBackend
    assert isinstance(select_backend(BUILTIN_BACKENDS, "cpu", 4, 128, True, torch.float16), expected)
    assert isinstance(select_backend(BUILTIN_BACKENDS, "cpu", 4, 128, False, torch.float32), expected)
    assert isinstance(select_backend(BUILTIN_BACKENDS, "cpu", 4, 128, False, torch.bfloat16), CpuInt4Backend)
    assert isinstance(select_backend(BUILTIN_BACKENDS, "cpu", 4, 128, False, torch.float32, requested="cpu_int4"),
                      CpuInt4Backend)
    assert isinstance(select_backend(BUILTIN_BACKENDS, "cpu", 8, 128, False, torch.float16),
                      CpuInt8Backend if native else DenseBackend)
    assert isinstance(select_backend(BUILTIN_BACKENDS, "cuda", 4, 128, True, torch.float32), DenseBackend)
    if TritonBackend().supports("cuda", 4, 128, True, torch.float16):  # triton installed
        assert isinstance(select_backend(BUILTIN_BACKENDS, "cuda", 4, 128, True, torch.bfloat16), TritonBackend)
    assert isinstance(select_backend(BUILTIN_BACKENDS, "cpu", 3, 128, False, torch.float16), expected)
    with pytest.raises(ValueError, match="no kernel backend"):
        select_backend([CpuInt4Backend()], "cpu", 8, 128, False, torch.float16)


def test_forced_backend_sticks_and_replaced_buffers_reprepare():
    layer = QuantLinear.from_quantized(random_quantized(64, 256, 4, 128, False), dtype=torch.float32)
    layer.post_init(backend="dense")
    layer(torch.ones(1, 256))
    # A loader that swaps buffers (not load_state_dict): forward must rebuild the kernel state.
    layer.qweight, layer.qzeros = torch.zeros_like(layer.qweight), torch.zeros_like(layer.qzeros)
    layer.scales = torch.ones_like(layer.scales)
    assert torch.equal(layer(torch.ones(1, 256)), torch.full((1, 64), -256.0))  # (0 - 1) * 1 * 256
    assert layer.backend.name == "dense"


def test_prefill_cache_backend_only_when_forced(monkeypatch):
    monkeypatch.setattr("gptq_plugins.kernels.base.native_bfloat16", lambda device: True)
    qw = random_quantized(64, 256, 4, 128, act_order=True)
    layer = QuantLinear.from_quantized(qw, dtype=torch.float32)
    layer.post_init()
    assert layer.backend.name == "cpu_int4"
    layer.post_init(backend="cpu_int4_prefill_cache")
    weight = qw.dequantize()
    for rows in (1, PREFILL_ROWS):  # int4 kernel below the threshold, cached bfloat16 from it
        x = torch.randn(rows, 256)
        reference = x @ weight.T
        torch.testing.assert_close(layer(x), reference, rtol=0, atol=0.02 * reference.abs().max().item())
    assert torch.equal(layer(x), (x.bfloat16() @ weight.bfloat16().T).float())


def test_prepared_layer_deep_copies():
    """Hosts copy modules (e.g. deepcopy for tied or duplicated layers); the prepared state follows."""
    layer = QuantLinear.from_quantized(random_quantized(64, 256, 4, 128, True), dtype=torch.float32)
    x = torch.randn(2, 256)
    y = layer(x)
    copy = deepcopy(layer)
    assert torch.equal(copy(x), y)


class _PluginBackend(DenseBackend):
    name = "plugin"
    priority = 1000


def test_plugin_backends_take_part_in_selection():
    class Plugin:
        @hookimpl
        def gptq_plugins_kernel_backends(self):
            return [_PluginBackend()]

    manager = get_plugin_manager()
    plugin = Plugin()
    manager.register(plugin)
    try:
        layer = QuantLinear.from_quantized(random_quantized(64, 256, 4, 128, False), dtype=torch.float32)
        layer.post_init()
        assert layer.backend.name == "plugin"
    finally:
        manager.unregister(plugin)


@pytest.mark.parametrize("kwargs, option", [
    (dict(in_features=256, out_features=64, bits=5, group_size=128), "bits"),
    (dict(in_features=256, out_features=64, bits=4, group_size=0), "group_size"),
    (dict(in_features=256, out_features=12, bits=4, group_size=128), "bits"),
])
def test_bad_shapes_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=f"^{option}"):
        QuantLinear(**kwargs)
