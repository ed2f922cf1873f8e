"""GGUF export: the solver's codes on each type's exact grid, packed so that `gguf`'s own
dequantizer (the reference for what llama.cpp reads) gives back our dequantized weights bit for
bit; a complete file with llama.cpp's names, row order and metadata; the output-path rules."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from gptq_plugins.artifact import read_report
from gptq_plugins.cli import main
from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.gguf_file import gguf_name, row_order
from gptq_plugins.gguf_grid import block_grid
from gptq_plugins.gguf_packing import pack_blocks
from gptq_plugins.gguf_types import GGUF_TYPES, layer_type
from gptq_plugins.solver import quantize_weight, rtn
from gptq_plugins.testing import build_tiny_model, tree_digest

torch.set_num_threads(1)
TYPES = sorted(GGUF_TYPES)


def _layer(seed=0, out_features=48, in_features=512, samples=4096, input_seed=None):
    """A weight with outlier columns, and correlated inputs (as real activations are: what GPTQ
    exploits); `input_seed` draws other inputs from the same distribution (held-out data)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    weight[:, ::37] *= 6
    mixing = torch.randn(in_features // 4, in_features, generator=generator) * torch.linspace(0.2, 2, in_features)
    if input_seed is not None:
        generator = torch.Generator().manual_seed(input_seed)
    inputs = torch.randn(samples, in_features // 4, generator=generator) @ mixing
    inputs += 0.1 * torch.randn(samples, in_features, generator=generator)
    return weight, inputs, inputs.T @ inputs / samples


def _output_error(weight, approx, inputs):
    return float(((approx - weight) @ inputs.T).square().mean())


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("mse_clip", [False, True])
def test_packed_blocks_read_back_by_gguf_equal_our_dequantized_weights(type_name, mse_clip):
    weight, _, hessian = _layer()
    config = QuantizeConfig.from_options(gguf_type=type_name, mse_clip=mse_clip)
    for result in (quantize_weight(weight, hessian, config), rtn(weight, config), rtn(weight, config, hessian)):
        packed = pack_blocks(result)
        read_back = dequantize(packed, GGMLQuantizationType[type_name])
        assert read_back.shape == tuple(weight.shape)
        assert np.array_equal(read_back, result.dequantize().numpy())


@pytest.mark.parametrize("type_name", TYPES)
def test_importance_weighted_fit_is_never_worse_than_the_full_range(type_name):
    weight, _, hessian = _layer(seed=3)
    weight[:4, :64] = 0  # all-equal blocks: a refit has nothing to fit and must keep its grid
    weight[4:8, :64] = 0.02
    importance = hessian.diagonal()
    grid = block_grid(type_name).bind(weight)
    totals = torch.zeros(2)
    for group, start in enumerate(range(0, weight.shape[1], grid.type.block_size)):
        block, weights = weight[:, start:start + grid.type.block_size], importance[start:start + grid.type.block_size]

        def weighted_error(params):
            assert all(torch.isfinite(p).all() for p in params)
            return ((grid.values(grid.codes(block, *params), *params) - block).square() * weights).sum(dim=1)

        plain, weighted = weighted_error(grid.fit(block, group)), weighted_error(grid.fit(block, group, weights))
        assert (weighted <= plain).all()
        totals += torch.stack([plain.sum(), weighted.sum()])
    assert totals[1] < 0.97 * totals[0]  # measured 0.86 (Q8_0) to 0.95 (Q5_0) on this layer


@pytest.mark.parametrize("type_name", TYPES)
def test_gptq_on_the_block_grid_beats_rounding_and_llama_cpp_reference_quantizer(type_name):
    weight, inputs, hessian = _layer(seed=1)
    held_out = _layer(seed=1, input_seed=99)[1]
    config = QuantizeConfig.from_options(gguf_type=type_name)
    gptq = _output_error(weight, quantize_weight(weight, hessian, config).dequantize(), held_out)
    ours_rtn = _output_error(weight, rtn(weight, config).dequantize(), held_out)
    assert gptq < 0.85 * ours_rtn
    if GGUF_TYPES[type_name].super_block:
        return  # `gguf` has no K-quant quantizer to compare with (benchmarks/gguf.py runs llama.cpp's)
    qtype = GGMLQuantizationType[type_name]
    reference = _output_error(weight, torch.from_numpy(dequantize(quantize(weight.numpy(), qtype), qtype)), held_out)
    assert gptq < 0.85 * reference
    # Our rounding onto the grid is llama.cpp's reference rounding, up to float16 ties.
    assert ours_rtn == pytest.approx(reference, rel=0.03)


def test_group_aware_order_keeps_blocks_positional():
    weight, _, hessian = _layer(seed=2)
    for type_name in ("Q4_0", "Q4_K"):
        config = QuantizeConfig.from_options(gguf_type=type_name, act_group_aware=True)
        result = quantize_weight(weight, hessian, config)
        packed = pack_blocks(result)
        assert np.array_equal(dequantize(packed, GGMLQuantizationType[type_name]), result.dequantize().numpy())


def test_type_fixes_bits_group_and_symmetry():
    assert QuantizeConfig.from_options(gguf_type="Q5_1") == \
        QuantizeConfig(format="gguf", gguf_type="Q5_1", bits=5, group_size=32, sym=False)
    with pytest.raises(ConfigError, match="bits: GGUF Q4_0 stores 4-bit codes"):
        QuantizeConfig.from_options(gguf_type="Q4_0", bits=3)
    with pytest.raises(ConfigError, match="group_size"):
        QuantizeConfig.from_options(gguf_type="Q8_0", group_size=128)
    with pytest.raises(ConfigError, match="desc_act: GGUF has no g_idx"):
        QuantizeConfig.from_options(gguf_type="Q4_0", desc_act=True)
    with pytest.raises(ConfigError, match="gguf_type: --format gguf needs a block type"):
        QuantizeConfig(format="gguf")
    with pytest.raises(ConfigError, match="gguf_type: expected one of"):
        QuantizeConfig.from_options(gguf_type="Q3_K")
    assert QuantizeConfig.from_options(gguf_type="Q6_K").group_size == 16
    with pytest.raises(ConfigError, match="q_proj: input size 100 is not a multiple of 32"):
        QuantizeConfig.from_options(gguf_type="Q4_0").check_layer(100, 64, "q_proj")


def test_packing_refuses_codes_of_the_v1_grid():
    weight, _, _ = _layer()
    with pytest.raises(ValueError, match="GPTQ v1 grid, not on a GGUF type's grid"):
        pack_blocks(rtn(weight, QuantizeConfig(group_size=32)))


def test_mixtures_and_fallbacks_choose_types_as_llama_quantize():
    # Q4_K_M: Q6_K for v_proj/down_proj of the first and last eighth and every third layer between.
    chosen = [layer_type("Q4_K_M", "mlp.down_proj", i, 16, 4096) for i in range(16)]
    assert [i for i, t in enumerate(chosen) if t == "Q6_K"] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert set(chosen) == {"Q4_K", "Q6_K"}
    assert layer_type("Q4_K_M", "self_attn.q_proj", 0, 16, 4096) == "Q4_K"
    # A row that is not whole super-blocks (SmolLM2's 576 inputs) takes llama.cpp's fallback type.
    assert [layer_type(t, "self_attn.q_proj", 3, 30, 576) for t in ("Q4_K", "Q5_K", "Q6_K")] == ["Q5_0", "Q5_1", "Q8_0"]
    assert layer_type("Q4_K_M", "mlp.down_proj", 0, 30, 576) == "Q8_0"
    config = QuantizeConfig.from_options(gguf_type="Q4_K_M")
    assert (config.bits, config.group_size, config.sym) == (4, 32, False)
    assert config.for_layer("self_attn.v_proj", 0, 30, 576).gguf_type == "Q8_0"
    assert config.for_layer("self_attn.v_proj", 1, 30, 1536).gguf_type == "Q6_K"
    assert config.for_layer("self_attn.v_proj", 4, 30, 1536).gguf_type == "Q4_K"


def test_query_and_key_rows_interleave_each_heads_halves():
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    head = [0, 4, 1, 5, 2, 6, 3, 7]
    assert row_order("model.layers.0.self_attn.q_proj.weight", config).tolist() == head + [8 + i for i in head]
    assert row_order("model.layers.0.self_attn.k_proj.weight", config).tolist() == head
    assert row_order("model.layers.0.self_attn.v_proj.weight", config) is None
    assert gguf_name("model.layers.3.mlp.down_proj.weight", config) == "blk.3.ffn_down.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gguf") / "llama", hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


CLI = ["--num-samples", "4", "--seq-len", "64"]


def test_cli_writes_a_complete_gguf_file(tiny, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert main(["quantize", str(tiny), str(out), "--gguf-type", "Q4_1", *CLI]) == 0
    assert "GGUF Q4_1" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no partial directory left
    reader = GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("tokenizer.ggml.") or name.endswith(("model", "pre", "_id"))}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["general.quantized_by"].startswith("gptq-plugins:")
    vocab_size = json.loads((tiny / "config.json").read_text())["vocab_size"]
    assert len(reader.get_field("tokenizer.ggml.tokens").data) == vocab_size == fields["llama.vocab_size"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_1"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "Q8_0"
    assert types["output.weight"] == "Q8_0" and len(types) == 2 * 9 + 3
    report = read_report(out)
    assert report["config"]["gguf_type"] == "Q4_1" and report["summary"]["layers"] == 14
    assert report["summary"]["mean_relative_error"] < report["summary"]["mean_rtn_relative_error"]
    assert main(["inspect", str(out)]) == 0
    assert "GGUF llama, 21 tensors (5 F32, 14 Q4_1, 2 Q8_0)" in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err


def test_gguf_output_never_replaces_what_is_not_ours(tiny, tmp_path):
    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"GGUF not ours")
    before = tree_digest(tmp_path)
    assert main(["quantize", str(tiny), str(foreign), "--gguf-type", "Q8_0", "--overwrite", *CLI]) == 2
    assert tree_digest(tmp_path) == before
    (tmp_path / "dir.gguf").mkdir()
    assert main(["quantize", str(tiny), str(tmp_path / "dir.gguf"), "--gguf-type", "Q8_0", "--overwrite", *CLI]) == 2
    ours = tmp_path / "ours.gguf"
    assert main(["quantize", str(tiny), str(ours), "--gguf-type", "Q8_0", *CLI]) == 0
    assert main(["quantize", str(tiny), str(ours), "--gguf-type", "Q8_0", *CLI]) == 2  # exists, no --overwrite
    assert main(["quantize", str(tiny), str(ours), "--gguf-type", "Q5_0", "--overwrite", *CLI]) == 0
    assert read_report(ours)["config"]["gguf_type"] == "Q5_0"
