"""Every model family with a built-in layout, end to end on tiny random-weight models.

For each family: a 2-block model built from its Transformers config is quantized from its
directory (the CLI's streaming path); `from_pretrained(artifact)` through our adapter must give
the greedy tokens of the float model holding the dequantized weights, and vLLM (CPU, float32, our
method) must give the same tokens as Transformers. GPT-2's Conv1D layers are quantized as the
Linears they compute; mixture-of-experts models (experts fused in 3-D parameters by Transformers 5)
per expert, on the tokens routed to each.

All vLLM engines run in one subprocess (this file run as a script), in-process engine cores, so
vLLM is imported once and each engine starts in seconds.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 1, 32  # vLLM's CPU attention needs head_dim >= 32
SLIDING_WINDOW = 4  # shorter than the prompts, so Gemma's sliding and full attention layers differ
# model_type: config options, beyond the tiny widths, that make a faithful small model of the family
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": HEAD_DIM},
    # vLLM's Gemma 2 always ties lm_head to the embeddings, as every Gemma 2 checkpoint does.
    "gemma2": {"head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM, "sliding_window": SLIDING_WINDOW,
               "tie_word_embeddings": True},
    "gemma3_text": {"head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM, "sliding_window": SLIDING_WINDOW,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "opt": {"ffn_dim": INTERMEDIATE, "word_embed_proj_dim": HIDDEN, "num_key_value_heads": None},
    "gpt_neox": {"num_key_value_heads": None},
    # Tied like every GPT-2 checkpoint; weights wider than GPT-2's initialisation so that the blocks,
    # not the tied embedding echoing the last token, pick the next token.
    "gpt2": {"n_inner": INTERMEDIATE, "num_key_value_heads": None, "tie_word_embeddings": True,
             "initializer_range": 0.1},
}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": INTERMEDIATE // 2}
FAMILIES |= {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**MOE, "num_experts": 4, "shared_expert_intermediate_size": INTERMEDIATE},
    "qwen3_moe": {**MOE, "num_experts": 4, "head_dim": HEAD_DIM},
}
# Linears in the blocks that stay float by design (Qwen2-MoE's shared-expert gate, a [1, hidden] scalar gate).
FLOAT_IN_BLOCKS = {"qwen2_moe": ".mlp.shared_expert_gate"}
CALIBRATION = {"num_samples": 8, "seq_len": 32}
PROMPTS = [[5, 17, 42, 99, 7, 250, 311, 64], [300, 2, 81, 190, 45, 12]]
NEW_TOKENS = 6
VOCAB = 512
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------- engine side (script)
def run_engines(artifacts: dict[str, str]) -> dict:
    """Greedy tokens of each artifact in vLLM through our method; an error is recorded, not raised."""
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = {}
    for family, path in artifacts.items():
        llm = None
        try:
            llm = LLM(model=path, quantization="gptq_plugins", dtype="float32", max_model_len=128, seed=0,
                      enforce_eager=True, skip_tokenizer_init=True)
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS], params, use_tqdm=False)
            results[family] = {"tokens": [list(out.outputs[0].token_ids) for out in outputs],
                               "quantization": llm.model_config.quantization}
        except Exception as err:  # noqa: BLE001  (the test shows the message)
            results[family] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            del llm
            gc.collect()
    return results


# ----------------------------------------------------------------------------- test side
def family_options(model_type: str) -> dict:
    return {"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": 2,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
            **FAMILIES.get(model_type, {})}


def config_model(model_type: str):
    """A tiny model of `model_type` in memory (for checks that need no files)."""
    from transformers import AutoModelForCausalLM

    from gptq_plugins.testing import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **family_options(model_type))).eval()


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(3, VOCAB, (CALIBRATION["num_samples"], CALIBRATION["seq_len"]),
                         generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def families(tmp_path_factory, calibration):
    """{family: (model_dir, artifact_dir)}, each quantized from its directory like `gptq-plugins quantize`."""
    from gptq_plugins.config import QuantizeConfig
    from gptq_plugins.pipeline import quantize_model
    from gptq_plugins.testing import build_tiny_model

    root = tmp_path_factory.mktemp("families")
    config = QuantizeConfig(bits=4, group_size=32, desc_act=True, **CALIBRATION)
    built = {}
    for family in FAMILIES:
        model_dir = build_tiny_model(root / family / "model", model_type=family, with_tokenizer=False,
                                     **family_options(family))
        artifact = quantize_model(model_dir, root / family / "artifact", config, calibration, progress=False)
        built[family] = (model_dir, artifact)
    return built


@pytest.fixture(scope="module")
def transformers_tokens(families):
    from gptq_plugins.testing import greedy_tokens_transformers

    return {family: greedy_tokens_transformers(artifact, PROMPTS, NEW_TOKENS)
            for family, (_model_dir, artifact) in families.items()}


@pytest.fixture(scope="module")
def vllm_results(families, tmp_path_factory):
    if importlib.util.find_spec("gptq_plugins_vllm") is None:
        pytest.skip("the vLLM adapter (adapters/vllm) is not installed")
    scratch = tmp_path_factory.mktemp("vllm")
    jobs, out = scratch / "artifacts.json", scratch / "results.json"
    jobs.write_text(json.dumps({family: str(artifact) for family, (_m, artifact) in families.items()}))
    done = subprocess.run([sys.executable, __file__, str(jobs), str(out)], env={**os.environ, **ENGINE_ENV},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and out.is_file(), done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_names_every_linear_of_every_block(family):
    """Nothing in a block is left in float by omission, and nothing named is missing."""
    from gptq_plugins.linear_weights import is_quantizable
    from gptq_plugins.preparation import layout_for

    model = config_model(family)
    layout = layout_for(model)
    layout.prepare(model)
    in_blocks = {name for name, module in model.named_modules()
                 if is_quantizable(module) and name.startswith(layout.blocks + ".")
                 and not (family in FLOAT_IN_BLOCKS and name.endswith(FLOAT_IN_BLOCKS[family]))}
    blocks = layout.block_list(model)
    assert layout.name == family
    assert set(layout.linears(model)) == in_blocks
    assert len(in_blocks) == sum(len(layout.block_linear_names(i, block)) for i, block in enumerate(blocks))


def same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Masks are equal; None is the plain causal mask (SDPA's `is_causal`)."""
    return a is b if a is None or b is None else torch.equal(a, b)


def test_each_block_gets_the_arguments_the_model_gives_it():
    """Gemma 3's sliding and full attention blocks receive different masks and rotary tables."""
    from gptq_plugins.capture import capture_block_inputs
    from gptq_plugins.preparation import layout_for

    model = config_model("gemma3_text")
    blocks = layout_for(model).block_list(model)
    ids = torch.tensor([PROMPTS[0]])
    seen = []
    handles = [block.register_forward_pre_hook(lambda _m, _args, kwargs: seen.append(kwargs), with_kwargs=True)
               for block in blocks]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    for handle in handles:
        handle.remove()
    contexts = capture_block_inputs(model, blocks, ids)
    assert len(contexts) == len(blocks) == len(seen)
    for (context,), expected in zip(contexts, seen):
        assert same_mask(context.kwargs["attention_mask"], expected["attention_mask"])
        for got, want in zip(context.kwargs["position_embeddings"], expected["position_embeddings"]):
            assert torch.equal(got, want)
    sliding, full = (context.kwargs for (context,) in contexts)
    assert not same_mask(sliding["attention_mask"], full["attention_mask"])
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_the_artifact_as_its_dequantized_weights(families, transformers_tokens, family):
    from gptq_plugins.artifact import read_artifact
    from gptq_plugins.preparation import layout_for
    from gptq_plugins.testing import dequantized_reference, greedy_tokens

    model_dir, artifact = families[family]
    reference = dequantized_reference(model_dir, artifact)
    layout = layout_for(reference)
    assert set(read_artifact(artifact).modules) == set(map(layout.checkpoint_name, layout.linears(reference)))
    assert transformers_tokens[family] == greedy_tokens(reference, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_serves_the_tokens_of_transformers(vllm_results, transformers_tokens, family):
    result = vllm_results[family]
    assert "error" not in result, result.get("error")
    assert result["quantization"] == "gptq_plugins"
    assert result["tokens"] == transformers_tokens[family]


if __name__ == "__main__":
    artifacts_file, results_file = map(Path, sys.argv[1:3])
    Path(results_file).write_text(json.dumps(run_engines(json.loads(artifacts_file.read_text()))))
