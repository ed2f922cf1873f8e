"""GPT-2's Conv1D layers (weight stored `[in, out]`) are quantized exactly as the Linears they compute."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from gptq_plugins.config import QuantizeConfig
from gptq_plugins.linear_weights import features, read_weight, write_weight
from gptq_plugins.pipeline import quantize_modules
from gptq_plugins.testing import tiny_config

CONFIG = QuantizeConfig(bits=4, group_size=32, desc_act=True, num_samples=4, seq_len=16)


def tiny_gpt2():
    torch.manual_seed(0)
    config = tiny_config("gpt2", hidden_size=64, n_inner=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=None, initializer_range=0.3)
    return AutoModelForCausalLM.from_config(config).eval()


def as_linears(model):
    """A copy of `model` with every Conv1D replaced by the `nn.Linear` computing the same function."""
    model = copy.deepcopy(model)
    for name, conv in [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]:
        linear = torch.nn.Linear(*features(conv))
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, linear)
    return model


def test_conv1d_weights_are_read_and_written_as_out_by_in():
    conv = Conv1D(nf=48, nx=32)
    assert features(conv) == (32, 48) and read_weight(conv).shape == (48, 32)
    new = torch.randn(48, 32)
    write_weight(conv, new)
    assert conv.weight.shape == (32, 48) and torch.equal(conv.weight, new.T)
    with pytest.raises(ValueError, match=r"Conv1D weight: expected \[48, 32\] \(\[out, in\]\), got \[32, 48\]"):
        write_weight(conv, new.T)


def test_conv1d_layers_quantize_exactly_as_the_equivalent_linears():
    gpt2 = tiny_gpt2()
    linears = as_linears(gpt2)
    calibration = torch.randint(3, 512, (CONFIG.num_samples, CONFIG.seq_len),
                                generator=torch.Generator().manual_seed(0))
    from_conv1d, _ = quantize_modules(gpt2, CONFIG, calibration, progress=False)
    from_linear, _ = quantize_modules(linears, CONFIG, calibration, progress=False)
    assert list(from_conv1d) == list(from_linear) == [
        f"transformer.h.0.{name}" for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for path, result in from_conv1d.items():
        expected = from_linear[path]
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(result, field), getattr(expected, field)), f"{path}.{field}"
        conv = gpt2.get_submodule(path)
        assert conv.weight.shape == linears.get_submodule(path).weight.T.shape  # still stored [in, out]
        assert torch.equal(read_weight(conv), result.dequantize())
