"""Pipeline behaviours that need no subprocess: degenerate calibration, layer-named errors and
checkpoints saved from a base model."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptq_plugins.calibration import CalibrationError
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.pipeline import quantize_model, quantize_modules
from gptq_plugins.testing import build_tiny_model, greedy_tokens_transformers, read_tensors
from gptq_plugins.validate import check_quantize_inputs

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


def test_gptaq_pairs_the_float_models_inputs_with_the_quantized_ones(tmp_path):
    """Block 0's q/k/v see the same inputs on both paths, so GPTAQ changes nothing there; every
    later layer is fitted to the float model's output and differs; the float stream survives
    offloading (byte-identical artifacts)."""
    model_dir = build_tiny_model(tmp_path / "m", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 with_tokenizer=False)
    config = CONFIG.replace(bits=3, num_samples=4)
    ids = torch.arange(64).view(4, 16) % 50
    plain = read_tensors(quantize_model(model_dir, tmp_path / "plain", config, ids, progress=False))
    gptaq = read_tensors(quantize_model(model_dir, tmp_path / "gptaq", config.replace(gptaq=True), ids,
                                        progress=False))
    offloaded = read_tensors(quantize_model(model_dir, tmp_path / "off", config.replace(gptaq=True), ids,
                                            progress=False, offload_activations=True))
    first = [f"model.layers.0.self_attn.{p}_proj.qweight" for p in "qkv"]
    assert all(torch.equal(plain[name], gptaq[name]) for name in first)
    changed = {name.rsplit(".", 1)[0] for name in plain if not torch.equal(plain[name], gptaq[name])}
    assert len(changed) == 2 * 7 - 3
    assert gptaq.keys() == offloaded.keys() and all(torch.equal(gptaq[k], offloaded[k]) for k in gptaq)


GPT2_IDS = torch.arange(32).view(2, 16) % 50
GPT2_POSITIONS = 64


def edit_tensors(directory: Path, edit) -> None:
    """Replace the tensors of `directory`'s single safetensors file by `edit(tensors)`."""
    file = directory / "model.safetensors"
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})


def with_old_mask_buffers(tensors: dict) -> dict:
    """The causal-mask buffers old GPT-2 checkpoints hold beside the weights; the model has none."""
    return {**tensors, "h.0.attn.bias": torch.ones(GPT2_POSITIONS, GPT2_POSITIONS).tril()[None, None],
            "h.0.attn.masked_bias": torch.tensor(-1e4)}


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    """A tiny tied GPT-2 as Transformers saves it, and the same weights as the Hub's original GPT-2
    checkpoints hold them: saved from the base model (no `transformer.` prefix, no head)."""
    root = tmp_path_factory.mktemp("gpt2")
    prefixed = build_tiny_model(root / "prefixed", model_type="gpt2", hidden_size=64, n_inner=128,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=None,
                                tie_word_embeddings=True, max_position_embeddings=GPT2_POSITIONS)
    base = Path(shutil.copytree(prefixed, root / "base"))
    edit_tensors(base, lambda tensors: {name.removeprefix("transformer."): tensor
                                        for name, tensor in tensors.items() if name != "lm_head.weight"})
    return prefixed, base


@pytest.fixture(scope="module")
def gpt2_artifact(gpt2_dirs, tmp_path_factory):
    return quantize_model(gpt2_dirs[0], tmp_path_factory.mktemp("gpt2_artifact") / "out", CONFIG, GPT2_IDS,
                          progress=False)


def test_base_model_checkpoint_quantizes_to_the_same_artifact(gpt2_dirs, gpt2_artifact, tmp_path):
    expected = read_tensors(gpt2_artifact)
    got = read_tensors(quantize_model(gpt2_dirs[1], tmp_path / "out", CONFIG, GPT2_IDS, progress=False))
    assert "transformer.wte.weight" in got and "transformer.h.0.attn.c_attn.qweight" in got
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_base_model_checkpoint_passes_validation(gpt2_dirs, tmp_path):
    checked = check_quantize_inputs(gpt2_dirs[1], tmp_path / "out", CONFIG)
    assert checked.layout.name == "gpt2" and checked.calibration.token_ids.shape == (2, 16)


def test_old_mask_buffers_are_carried_under_model_names_and_ignored_on_load(gpt2_dirs, gpt2_artifact, tmp_path):
    """Copied like every checkpoint tensor the run does not quantize; Transformers (and vLLM) skip
    GPT-2's `attn.bias`/`attn.masked_bias` when loading."""
    hub = Path(shutil.copytree(gpt2_dirs[1], tmp_path / "hub"))
    edit_tensors(hub, with_old_mask_buffers)
    check_quantize_inputs(hub, tmp_path / "checked", CONFIG)
    artifact = quantize_model(hub, tmp_path / "out", CONFIG, GPT2_IDS, progress=False)
    assert set(read_tensors(artifact)) - set(read_tensors(gpt2_artifact)) == {
        "transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias"}
    prompts = [[5, 17, 42, 9]]
    assert greedy_tokens_transformers(artifact, prompts, 4) == greedy_tokens_transformers(gpt2_artifact, prompts, 4)


def test_the_artifact_records_the_calibration_actually_used(tmp_path):
    """Given token ids are recorded as such, with their shape; drawn windows by source, seed and the
    length actually used (capped at the context length), not what the options asked for."""
    import json

    model = build_tiny_model(tmp_path / "model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             max_position_embeddings=48)
    given = quantize_model(model, tmp_path / "given", CONFIG, calibration=torch.arange(96).view(3, 32) % 50,
                           progress=False)
    meta = json.loads((given / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["calibration"]["dataset"] == "token_ids" and "seed" not in meta["calibration"]
    assert (meta["calibration"]["num_samples"], meta["calibration"]["seq_len"], meta["calibration_tokens"]) == (3, 32, 96)
    drawn = quantize_model(model, tmp_path / "drawn", CONFIG.replace(seq_len=64, seed=5), progress=False)
    calibration = json.loads((drawn / "config.json").read_text())["quantization_config"]["meta"]["calibration"]
    assert (calibration["dataset"], calibration["seed"], calibration["num_samples"], calibration["seq_len"]) == \
        ("builtin", 5, 2, 48)
    read_back = QuantizeConfig.from_quantization_config(
        json.loads((given / "config.json").read_text())["quantization_config"])
    assert read_back.dataset == "token_ids" and read_back.num_samples == 3


def _linear_calls(model, names):
    calls = dict.fromkeys(names, 0)

    def count(name):
        def hook(_module, _args):
            calls[name] += 1
        return hook
    handles = [model.get_submodule(name).register_forward_pre_hook(count(name)) for name in names]
    return calls, handles


def test_finished_parts_are_not_recomputed_and_the_result_is_unchanged(model_dir, monkeypatch):
    """After the attention's Linears are done its output is reused: q_proj's input is read (the
    counted pre-hook) for its Hessian, for o_proj's and for the MLP's input, o_proj's for its own and
    the MLP's, not again for down_proj's Hessian or the outputs. The group gate/up stops at gate
    (both read one input, as the first batch shows), so up_proj runs for the first batch's Hessian,
    then only for down_proj's input and the outputs. Same bits
    as recomputing every forward."""
    from transformers import AutoModelForCausalLM

    import gptq_plugins.run_loop as run_loop
    from gptq_plugins.finished_outputs import NO_REUSE

    ids = torch.arange(20 * 16).view(20, 16) % 50  # 3 calibration batches
    names = [f"model.layers.0.{name}" for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj")]
    runs = {}
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(run_loop, "FinishedOutputs", lambda block, linears: NO_REUSE)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        calls, handles = _linear_calls(model, names)
        results, _ = quantize_modules(model, CONFIG, ids, progress=False)
        for handle in handles:
            handle.remove()
        runs[reuse] = results, calls
    (reused, reused_calls), (recomputed, recomputed_calls) = runs[True], runs[False]
    batches = 3
    assert reused_calls == {names[0]: 3 * batches, names[1]: 2 * batches, names[2]: 2 * batches + 1}
    assert recomputed_calls == {names[0]: 5 * batches, names[1]: 4 * batches, names[2]: 2 * batches + 1}
    for path, result in reused.items():
        assert torch.equal(result.codes, recomputed[path].codes), path
        assert torch.equal(result.scales, recomputed[path].scales), path
