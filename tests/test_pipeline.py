"""Pipeline behaviours that need no subprocess: degenerate calibration and layer-named errors."""

import pytest
import torch

from gptq_plugins.calibration import CalibrationError
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.pipeline import quantize_model, quantize_modules
from gptq_plugins.testing import build_tiny_model

CONFIG = QuantizeConfig(group_size=32, num_samples=2, seq_len=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", hidden_size=64, intermediate_size=128,
                            num_hidden_layers=1, with_tokenizer=False)


def test_one_repeated_token_is_refused_before_work(model_dir, tmp_path):
    with pytest.raises(CalibrationError, match="all 32 calibration tokens are id 3"):
        quantize_model(model_dir, tmp_path / "out", CONFIG, calibration=torch.full((2, 16), 3), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_all_zero_inputs_name_the_layer(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.get_input_embeddings().weight.data.zero_()
    ids = torch.arange(32).view(2, 16)
    with pytest.raises(CalibrationError, match=r"model.layers.0.self_attn.q_proj: every calibration input was zero"):
        quantize_modules(model, CONFIG, ids, progress=False)


def test_in_memory_quantization_changes_weights_to_their_grid(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    results, report = quantize_modules(model, CONFIG, torch.arange(64).view(2, 32) % 50, progress=False)
    after = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(after, results["model.layers.0.mlp.down_proj"].dequantize())
    assert not torch.equal(after, before)
    assert report["summary"]["layers"] == 7


def test_bfloat16_hessian_gives_nearly_the_same_layers(model_dir):
    from transformers import AutoModelForCausalLM

    ids = torch.arange(128).view(4, 32) % 50
    errors = {}
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        _, report = quantize_modules(model, CONFIG.replace(hessian_dtype=dtype), ids, progress=False)
        errors[dtype] = report["summary"]["mean_relative_error"]
    assert errors["bfloat16"] != errors["float32"]  # the option reaches the accumulator
    assert abs(errors["bfloat16"] - errors["float32"]) <= 0.05 * errors["float32"]
