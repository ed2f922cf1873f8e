import json

import pytest

from gptq_plugins.foreign_keys import WRITER_KEYS
from gptq_plugins.config import ConfigError, QuantizeConfig, foreign_entries


def test_defaults_are_valid_and_documented():
    cfg = QuantizeConfig()
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.damp_percent) == (4, 128, True, False, 0.01)
    assert cfg.maxq == 15


@pytest.mark.parametrize("changes, option", [
    ({"bits": 5}, "bits"),
    ({"bits": True}, "bits"),
    ({"bits": "4"}, "bits"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": -2}, "group_size"),
    ({"damp_percent": -0.1}, "damp_percent"),
    ({"damp_percent": 1.5}, "damp_percent"),
    ({"sym": 1}, "sym"),
    ({"static_groups": True}, "static_groups"),
    ({"act_group_aware": True, "desc_act": True}, "act_group_aware"),
    ({"format": "awq"}, "format"),
    ({"num_samples": 0}, "num_samples"),
    ({"seq_len": -1}, "seq_len"),
    ({"dataset": ""}, "dataset"),
    ({"block_size": 0}, "block_size"),
    ({"hessian_dtype": "float16"}, "hessian_dtype"),
])
def test_bad_option_names_the_option(changes, option):
    with pytest.raises(ConfigError) as err:
        QuantizeConfig(**changes)
    assert err.value.option == option
    assert str(err.value).startswith(f"{option}:")


def test_layer_checks_name_the_layer():
    cfg = QuantizeConfig(group_size=128)
    cfg.check_layer(256, 64, name="x")
    cfg.check_layer(576, 64, name="x")  # a last, shorter group (576 = 4 x 128 + 64), as on the Hub
    with pytest.raises(ConfigError, match="model.layers.0.q: input size 100 x 4 bits is not a whole number"):
        cfg.check_layer(100, 64, name="model.layers.0.q")
    with pytest.raises(ConfigError, match="output size 40 x 3 bits"):
        QuantizeConfig(bits=3, group_size=-1).check_layer(64, 40, name="o")
    assert QuantizeConfig(group_size=-1).groups_for(96) == 1
    assert QuantizeConfig(group_size=32).groups_for(96) == 3
    assert QuantizeConfig(group_size=128).groups_for(576) == 5  # ceil, the Hub's GPTQ v1 count
    assert QuantizeConfig(group_size=128).groups_for(64) == 1


@pytest.mark.parametrize("cfg", [
    QuantizeConfig(),
    QuantizeConfig(bits=3, group_size=32, sym=False, desc_act=True, static_groups=True, mse_clip=True),
    QuantizeConfig(bits=8, group_size=-1, format="gptq", true_sequential=False, damp_percent=0.05),
    QuantizeConfig(hessian_dtype="bfloat16", seed=7, num_samples=3),
    QuantizeConfig(bits=3, act_group_aware=True, gptaq=True),
])
def test_quantization_config_round_trip_is_json_clean(cfg):
    qc = json.loads(json.dumps(cfg.to_quantization_config(version="9.9", modules_not_to_convert=["lm_head"])))
    assert qc["quant_method"] == ("gptq" if cfg.format == "gptq" else "gptq_plugins")
    assert qc["checkpoint_format"] == "gptq"
    assert qc["meta"]["quantizer"] == ["gptq-plugins:9.9"]
    assert QuantizeConfig.from_quantization_config(qc) == cfg


def test_unknown_keys_are_reported_for_our_artifacts():
    qc = QuantizeConfig().to_quantization_config(version="0")
    qc["bitz"] = 4
    with pytest.raises(ConfigError, match=r"unknown keys \['bitz'\]"):
        QuantizeConfig.from_quantization_config(qc)


def test_stock_gptq_config_is_parsed():
    hub = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "static_groups": False,
           "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None,
           "quant_method": "gptq"}
    cfg = QuantizeConfig.from_quantization_config(hub, strict=False)
    assert cfg.desc_act and cfg.format == "gptq" and cfg.bits == 4


def test_bad_values_in_a_file_name_the_key_path():
    with pytest.raises(ConfigError, match=r"^config.json: quantization_config.bits: expected one of"):
        QuantizeConfig.from_quantization_config({"quant_method": "gptq_plugins", "bits": 6},
                                                source="config.json: quantization_config")
    with pytest.raises(ConfigError, match="quant_method"):
        QuantizeConfig.from_quantization_config({"quant_method": "awq", "bits": 4})
    with pytest.raises(ConfigError, match="checkpoint_format"):
        QuantizeConfig.from_quantization_config({"quant_method": "gptq", "checkpoint_format": "gptq_v2"})


@pytest.mark.parametrize("key, value, culprit", [
    ("checkpoint_format", "gptq_v2", r"checkpoint_format: only the GPTQ v1 layout 'gptq' is supported, got 'gptq_v2' "
                                     r"\(GPTQ v2 stores zero points without the -1 offset"),
    ("format", "marlin", r"format: only the GPTQ v1 layout 'gptq' is supported, got 'marlin'"),
    ("is_marlin_format", True, r"is_marlin_format: Marlin-repacked tensors"),
    ("method", "awq", r"method: expected 'gptq', got 'awq'"),
    ("pack_dtype", "int16", r"pack_dtype: codes packed in 'int16' words; expected 'int32'"),
    ("lm_head", True, r"lm_head: a quantized lm_head is not supported"),
    ("dynamic", {r"+:.*down_proj": {"bits": 8}}, r"dynamic: per-module overrides"),
    ("rotation", "hadamard", r"rotation: rotated weights \('hadamard'\)"),
])
def test_foreign_keys_that_change_the_tensors_are_refused_by_name(key, value, culprit):
    block = {"quant_method": "gptq", "bits": 4, "group_size": 128, key: value}
    for strict in (True, False):
        with pytest.raises(ConfigError, match=culprit):
            QuantizeConfig.from_quantization_config(block, strict=strict)


@pytest.mark.parametrize("writer", sorted(WRITER_KEYS))
def test_each_writers_keys_are_accepted_even_by_the_strict_reader(writer):
    neutral = {"format": "gptq", "checkpoint_format": "gptq", "method": "gptq", "pack_dtype": "int32",
               "lm_head": False, "dynamic": None, "rotation": None, "is_marlin_format": False}
    block = {key: neutral.get(key, None) for key in WRITER_KEYS[writer]}
    block.update(quant_method="gptq_plugins", bits=3, group_size=64, desc_act=True, sym=False, meta={})
    config = QuantizeConfig.from_quantization_config(block, strict=True)
    assert (config.bits, config.group_size, config.desc_act, config.sym) == (3, 64, True, False)
    # Written back, the writer's keys plus ours hold every key of the block: nothing is lost.
    rewritten = {**foreign_entries(block), **config.to_quantization_config()}
    assert set(block) <= set(rewritten) and "bits" not in foreign_entries(block)
