"""Transformers adapter end to end on a tiny local Llama.

`from_pretrained(artifact)` must compute what the dequantized weights compute; quantize-on-load
then `save_pretrained` must write the CLI's artifact byte for byte; `gptq-plugins convert` must
move a checkpoint between quant_methods without touching a tensor.
"""

import copy
import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig, pipeline
from transformers.quantizers import auto as hf_quantizers

from gptq_plugins.artifact import ArtifactError, read_artifact
from gptq_plugins.cli import main as gptq_plugins_cli
from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.packing import dequantize_packed
from gptq_plugins.model_loading import calibration_for, load_model
from gptq_plugins.pipeline import quantize_model
from gptq_plugins.quant_linear import QuantLinear
from gptq_plugins.testing import build_tiny_model, read_tensors, greedy_tokens, greedy_tokens_transformers
from gptq_plugins_transformers import GPTQPluginsConfig

CALIBRATION = {"num_samples": 8, "seq_len": 64}
GROUP_SIZE = 64
CASES = [(bits, desc_act) for bits in (2, 3, 4, 8) for desc_act in (False, True)]
# Group 96 leaves ragged last groups (128 inputs = 96 + 32, 256 = 96 + 96 + 64), as Hub checkpoints do.
RAGGED_GROUP_SIZE = 96
RAGGED_CASES = [(4, False, RAGGED_GROUP_SIZE), (3, True, RAGGED_GROUP_SIZE)]
PROMPTS = ["def main():\n    return", "The quick brown fox", "import os\nimport"]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPTS]


@pytest.fixture(scope="module")
def artifacts(model_dir, tmp_path_factory):
    """One artifact per (bits, desc_act), from one loaded float model and one calibration set."""
    out = tmp_path_factory.mktemp("artifacts")
    model, tokenizer = load_model(model_dir)
    calibration = calibration_for(model, QuantizeConfig(**CALIBRATION), tokenizer)
    paths = {}
    for case in CASES + RAGGED_CASES:
        bits, desc_act, group_size = (*case, GROUP_SIZE)[:3]
        config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, **CALIBRATION)
        path = out / f"b{bits}{'-act' if desc_act else ''}-g{group_size}"
        quantize_model(copy.deepcopy(model), path, config, calibration, progress=False)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(model_dir / name, path / name)
        paths[case] = path
    return paths


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def dequantized_reference(model_dir: Path, artifact_dir: Path, dtype=torch.float32):
    """The float model with each quantized Linear's weight replaced by the core reference dequantization."""
    artifact = read_artifact(artifact_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tensors = artifact.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name.rsplit(".", 1)[0] not in artifact.modules:
                model.get_parameter(name).copy_(tensor)
        for name in artifact.modules:
            weight = dequantize_packed(*(tensors[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")),
                                       artifact.config.bits)
            model.get_submodule(name).weight.copy_(weight)
    return model


@torch.no_grad()
def logits(model, prompt_ids) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompt_ids]


def assert_close_logits(got, expected, rtol):
    for g, e in zip(got, expected):
        scale = e.abs().max()
        assert torch.isfinite(g).all()
        assert (g - e).abs().max() <= rtol * scale, f"max |diff| {(g - e).abs().max():.3g} vs scale {scale:.3g}"


def quant_linears(model) -> dict[str, QuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


# ----------------------------------------------------------------------------- registration, config
def test_import_registers_config_and_quantizer_idempotently():
    assert hf_quantizers.AUTO_QUANTIZATION_CONFIG_MAPPING["gptq_plugins"] is GPTQPluginsConfig
    assert hf_quantizers.AUTO_QUANTIZER_MAPPING["gptq_plugins"].__name__ == "GPTQPluginsHfQuantizer"
    plugin = importlib.import_module("gptq_plugins_transformers.plugin")
    importlib.reload(plugin)  # registers again: must not raise
    assert plugin.REGISTERED
    assert hf_quantizers.AUTO_QUANTIZATION_CONFIG_MAPPING["gptq_plugins"] is GPTQPluginsConfig


def test_config_round_trips_the_written_block_and_is_json_clean(artifacts):
    written = json.loads((artifacts[3, True] / "config.json").read_text())["quantization_config"]
    for config in (GPTQPluginsConfig(**written), GPTQPluginsConfig.from_dict(written)):
        assert config.to_dict() == written
        assert json.loads(config.to_json_string()) == written
        assert config.quantize_config == read_artifact(artifacts[3, True]).config
    user = GPTQPluginsConfig(bits=2, group_size=32, desc_act=True, dataset="calib.jsonl", num_samples=16, seq_len=32)
    assert user.quantize_config == QuantizeConfig(bits=2, group_size=32, desc_act=True, dataset="calib.jsonl",
                                                  num_samples=16, seq_len=32)
    assert GPTQPluginsConfig(**json.loads(user.to_json_string())).quantize_config == user.quantize_config
    user.bits = 8
    assert user.to_dict()["bits"] == 8 and user.quantize_config.bits == 8


@pytest.mark.parametrize("options", [{"bits": 5}, {"group_size": 0}, {"damp_percent": 2.0}, {"num_samples": 0},
                                     {"static_groups": True}])
def test_config_validation_is_the_cores(options):
    with pytest.raises(ConfigError) as core:
        QuantizeConfig(**options)
    with pytest.raises(ConfigError) as ours:
        GPTQPluginsConfig(**options)
    assert ours.value.option.endswith(core.value.option)
    assert str(core.value).split(": ", 1)[1] in str(ours.value)


def test_config_rejects_unknown_keys_and_other_methods():
    with pytest.raises(ConfigError, match="unknown keys \\['bitz'\\]"):
        GPTQPluginsConfig(bitz=4)
    with pytest.raises(ConfigError, match="gptq-plugins convert"):
        GPTQPluginsConfig(quant_method="gptq")
    config = GPTQPluginsConfig()
    with pytest.raises(ConfigError, match="bits"):
        config.bits = 7
    assert config.bits == 4


# ----------------------------------------------------------------------------- loading artifacts
@pytest.mark.parametrize("case", CASES + RAGGED_CASES,
                         ids=[f"{c[0]}bit{'-act' if c[1] else ''}{f'-g{c[2]}' if len(c) > 2 else ''}"
                              for c in CASES + RAGGED_CASES])
def test_loaded_artifact_matches_dequantized_reference(artifacts, model_dir, prompt_ids, case):
    path = artifacts[case]
    model = AutoModelForCausalLM.from_pretrained(path)
    layers = quant_linears(model)
    assert set(layers) == set(read_artifact(path).modules) and len(layers) == 14
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    reference = dequantized_reference(model_dir, path)
    expected = logits(reference, prompt_ids)
    # The kernel chosen by default (for 4 bits on CPU: PyTorch's int4 op, bfloat16 inside) ...
    assert_close_logits(logits(model, prompt_ids), expected, rtol=2e-2)
    # ... and the reference backend, to float tolerance.
    for layer in layers.values():
        layer.post_init(backend="dense")
    assert_close_logits(logits(model, prompt_ids), expected, rtol=1e-5)
    assert greedy_tokens(model, prompt_ids, NEW_TOKENS) == greedy_tokens(reference, prompt_ids, NEW_TOKENS)


def test_backend_option_chooses_the_kernel_and_is_never_saved(artifacts, model_dir, prompt_ids, tmp_path):
    """`backend=` reaches every layer of a loaded artifact: `dense` computes float32 exactly."""
    from gptq_plugins.cpu_features import native_bfloat16

    path = artifacts[4, False]
    expected = logits(dequantized_reference(model_dir, path), prompt_ids)
    exact = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQPluginsConfig(backend="dense"))
    assert {layer.backend.name for layer in quant_linears(exact).values()} == {"dense"}
    assert_close_logits(logits(exact, prompt_ids), expected, rtol=1e-5)
    default = AutoModelForCausalLM.from_pretrained(path)
    # float32 layers take the bfloat16 int4 kernel only where bfloat16 is native (see gptq-plugins doctor).
    chosen = {layer.backend.name for layer in quant_linears(default).values()}
    assert chosen == ({"cpu_int4"} if native_bfloat16("cpu") else {"dense"})
    forced = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQPluginsConfig(backend="cpu_int4"))
    assert {layer.backend.name for layer in quant_linears(forced).values()} == {"cpu_int4"}
    forced.save_pretrained(tmp_path / "saved")
    assert "backend" not in json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    with pytest.raises(ConfigError, match=r"backend: expected 'auto' or one of \[.*'dense'\], got 'fastest'"):
        GPTQPluginsConfig(backend="fastest")


def test_loading_needs_no_layout_for_the_family(artifacts, model_dir, prompt_ids, monkeypatch):
    """A converted stock GPTQ checkpoint may be of a family we cannot quantize: it still loads."""
    import gptq_plugins.plugins

    monkeypatch.setattr(gptq_plugins.plugins, "model_layouts", lambda: [])
    model = AutoModelForCausalLM.from_pretrained(artifacts[8, True])
    assert set(quant_linears(model)) == set(read_artifact(artifacts[8, True]).modules)
    assert greedy_tokens(model, prompt_ids, NEW_TOKENS) == greedy_tokens(
        dequantized_reference(model_dir, artifacts[8, True]), prompt_ids, NEW_TOKENS)


def test_greedy_tokens_helper_loads_through_transformers(artifacts, model_dir, prompt_ids):
    # 8 bits run on the float32 reference backend, so tokens must match exactly.
    reference = dequantized_reference(model_dir, artifacts[8, True])
    tokens = greedy_tokens_transformers(artifacts[8, True], prompt_ids, NEW_TOKENS)
    assert tokens == greedy_tokens(reference, prompt_ids, NEW_TOKENS)
    assert [len(t) for t in tokens] == [NEW_TOKENS] * len(prompt_ids)


def test_generate_and_text_generation_pipeline(artifacts, tokenizer):
    path = artifacts[4, False]
    model = AutoModelForCausalLM.from_pretrained(path)
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)
    generator = pipeline("text-generation", model=str(path))
    assert quant_linears(generator.model)
    text = generator(PROMPTS[1], max_new_tokens=5, min_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith(PROMPTS[1]) and len(text) > len(PROMPTS[1])


def test_device_map_auto_and_dtypes_on_cpu(artifacts, model_dir, prompt_ids):
    path = artifacts[4, True]
    reference = logits(dequantized_reference(model_dir, path), prompt_ids)
    plain = logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), prompt_ids)
    mapped = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.float32)
    assert {tensor.device.type for tensor in mapped.state_dict().values()} == {"cpu"}
    assert_close_logits(logits(mapped, prompt_ids), plain, rtol=1e-6)
    half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16 and quant_linears(half)
    assert all(layer.scales.dtype == torch.float16 for layer in quant_linears(half).values())
    assert_close_logits(logits(half, prompt_ids), reference, rtol=5e-2)


def test_dequantize_gives_a_plain_float_model(artifacts, model_dir, prompt_ids, tmp_path):
    path = artifacts[3, False]
    model = AutoModelForCausalLM.from_pretrained(path)
    model.dequantize()
    assert not quant_linears(model) and not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config")
    reference = dequantized_reference(model_dir, path)
    for name in read_artifact(path).modules:
        assert torch.equal(model.get_submodule(name).weight, reference.get_submodule(name).weight)
    model.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())


# ----------------------------------------------------------------------------- bad input
def edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_quantization_config_in_checkpoint_fails_clearly(artifacts, tmp_path):
    src = artifacts[4, False]
    with pytest.raises(ConfigError, match="bits: expected one of \\[2, 3, 4, 8\\], got 5"):
        AutoModelForCausalLM.from_pretrained(edited_copy(src, tmp_path / "bits5", lambda qc: qc.update(bits=5)))
    with pytest.raises(ConfigError, match="unknown keys \\['colour'\\]"):
        AutoModelForCausalLM.from_pretrained(edited_copy(src, tmp_path / "key", lambda qc: qc.update(colour=1)))
    # Valid options that do not describe the tensors: the artifact check names the tensor.
    with pytest.raises(ArtifactError, match=r"safetensors: tensor 'model\.layers\.\d\.[a-z_.]+\.qzeros' is I32"):
        AutoModelForCausalLM.from_pretrained(edited_copy(src, tmp_path / "bits8", lambda qc: qc.update(bits=8)))


def test_quantize_on_load_rejects_options_the_model_cannot_take(tmp_path):
    narrow = build_tiny_model(tmp_path / "narrow", hidden_size=80, intermediate_size=160, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ConfigError, match=r"bits: model\.layers\.0\.[a-z_.]+: input size 80 x 3 bits is not a whole "
                                          r"number of 32-bit words"):
        AutoModelForCausalLM.from_pretrained(narrow, quantization_config=GPTQPluginsConfig(bits=3))


# ----------------------------------------------------------------------------- quantize on load
def test_quantize_on_load_then_save_pretrained_equals_the_cli(model_dir, prompt_ids, tmp_path):
    options = {"bits": 4, "group_size": GROUP_SIZE, "desc_act": True, "sym": False, **CALIBRATION}
    assert gptq_plugins_cli(["quantize", str(model_dir), str(tmp_path / "cli"), "--bits", "4", "--group-size",
                             str(GROUP_SIZE), "--desc-act", "--asym", "--num-samples", "8", "--seq-len", "64"]) == 0
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=GPTQPluginsConfig(**options))
    assert len(quant_linears(model)) == 14
    model.save_pretrained(tmp_path / "on_load")

    cli, on_load = read_tensors(tmp_path / "cli"), read_tensors(tmp_path / "on_load")
    assert sorted(cli) == sorted(on_load)
    assert [name for name in cli if not same_bytes(cli[name], on_load[name])] == []
    config_of = lambda path: json.loads((path / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert config_of(tmp_path / "on_load") == config_of(tmp_path / "cli")
    read_artifact(tmp_path / "on_load")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    assert_close_logits(logits(model, prompt_ids), logits(reloaded, prompt_ids), rtol=1e-6)
    # Loading an artifact and saving it again (e.g. to push it) changes nothing either.
    reloaded.save_pretrained(tmp_path / "resaved")
    resaved = read_tensors(tmp_path / "resaved")
    assert sorted(resaved) == sorted(cli) and all(same_bytes(cli[name], resaved[name]) for name in cli)
    assert config_of(tmp_path / "resaved") == config_of(tmp_path / "cli")


# ----------------------------------------------------------------------------- convert
def test_convert_round_trip_links_tensors_and_keeps_them(artifacts, tmp_path, capsys):
    src = artifacts[4, True]
    assert gptq_plugins_cli(["convert", str(src), str(tmp_path / "gptq")]) == 0
    assert gptq_plugins_cli(["convert", str(tmp_path / "gptq"), str(tmp_path / "back")]) == 0
    assert "quant_method gptq -> gptq_plugins" in capsys.readouterr().out
    stock = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert stock["quantization_config"]["quant_method"] == "gptq"
    assert read_artifact(tmp_path / "gptq").config.format == "gptq"
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for file in src.glob("*.safetensors"):
        for out in (tmp_path / "gptq", tmp_path / "back"):
            assert os.path.samefile(file, out / file.name)  # hard link: the same bytes, never rewritten
    original, back = read_tensors(src), read_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back) and all(same_bytes(original[k], back[k]) for k in original)


def test_convert_takes_a_stock_transformers_gptq_checkpoint(artifacts, prompt_ids, tmp_path):
    """A Hub-style block (as Transformers' GPTQConfig writes it) converts and loads through our quantizer."""
    src = artifacts[4, True]
    gptq_plugins_cli(["convert", str(src), str(tmp_path / "gptq")])
    stock = GPTQConfig(bits=4, group_size=GROUP_SIZE, desc_act=True, sym=True, dataset="c4").to_dict()
    edited_copy(tmp_path / "gptq", tmp_path / "hub", lambda qc: (qc.clear(), qc.update(stock)))
    assert gptq_plugins_cli(["convert", str(tmp_path / "hub"), str(tmp_path / "ours")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert len(quant_linears(model)) == 14
    expected = logits(AutoModelForCausalLM.from_pretrained(src), prompt_ids)
    assert_close_logits(logits(model, prompt_ids), expected, rtol=1e-6)


def _writer_blocks() -> dict:
    """`quantization_config` as each common GPTQ writer emits it for this artifact's options
    (GPTQModel 7.x and AutoGPTQ 0.7 as their `to_dict` writes it; Transformers' from the real class)."""
    options = {"bits": 4, "group_size": GROUP_SIZE, "desc_act": True, "sym": True}
    return {
        "GPTQModel": {**options, "lm_head": False, "method": "gptq", "quant_method": "gptq", "format": "gptq",
                      "checkpoint_format": "gptq", "pack_dtype": "int32",
                      "meta": {"quantizer": ["gptqmodel:7.7.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                               "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": False,
                               "true_sequential": True, "mse": 0.0, "gptaq": None, "act_group_aware": False,
                               "fallback": None, "offload_to_disk": True, "pack_impl": "cpu",
                               "hessian": {"chunk_size": None, "chunk_bytes": None, "staging_dtype": "float32"}}},
        "AutoGPTQ": {**options, "damp_percent": 0.01, "static_groups": False, "true_sequential": True,
                     "model_name_or_path": None, "model_file_base_name": None, "is_marlin_format": False,
                     "quant_method": "gptq", "checkpoint_format": "gptq"},
        "Transformers": GPTQConfig(**options, dataset="c4").to_dict(),
    }


@pytest.mark.parametrize("writer", ["GPTQModel", "AutoGPTQ", "Transformers"])
def test_every_common_writers_checkpoint_converts_loads_and_keeps_its_keys(writer, artifacts, prompt_ids,
                                                                           tmp_path):
    src = artifacts[4, True]
    gptq_plugins_cli(["convert", str(src), str(tmp_path / "gptq")])
    stock = _writer_blocks()[writer]
    edited_copy(tmp_path / "gptq", tmp_path / "hub", lambda qc: (qc.clear(), qc.update(copy.deepcopy(stock))))
    assert gptq_plugins_cli(["convert", str(tmp_path / "hub"), str(tmp_path / "ours")]) == 0
    converted = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    kept = {key: value for key, value in stock.items() if key not in ("quant_method", "meta")}
    assert {key: converted[key] for key in kept} == kept  # every key of the writer, as it was
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert len(quant_linears(model)) == 14
    expected = logits(AutoModelForCausalLM.from_pretrained(src), prompt_ids)
    assert_close_logits(logits(model, prompt_ids), expected, rtol=1e-6)
    model.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert {key: resaved[key] for key in kept} == kept


def test_convert_refuses_corrupted_input_and_writes_nothing(artifacts, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(artifacts[2, False], corrupt)
    shard = next(corrupt.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert gptq_plugins_cli(["convert", str(corrupt), str(tmp_path / "out")]) == 2
    assert f"{shard}: unreadable safetensors file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt"]
