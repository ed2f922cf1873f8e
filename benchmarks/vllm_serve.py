"""Offline vLLM throughput on CPU: the float32 model, our 4-bit artifact, and stock vLLM `gptq`.

One process, one engine after another, same prompts: 32 prompts of random token ids, 64 new
tokens each (greedy, EOS ignored), timed after a short warm-up so compilation is not counted.
- float32: the float model, no quantization;
- gptq_plugins float32: our 4-bit g128 artifact through `--quantization gptq_plugins`;
- gptq float16: the `--format gptq` export of the same tensors through stock vLLM (on CPU it
  takes only float16/bfloat16, and only symmetric 4/8-bit without act-order);
- gptq_plugins float16: that same export through our method, for a same-dtype comparison.

The model is random-weight (speed does not depend on the values), built and quantized once
under `benchmarks/cache/vllm_serve/`. Writes `benchmarks/results/vllm_serve.json`.
Run `python benchmarks/vllm_serve.py`.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process: no re-import per run

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE_DIR = HERE / "cache" / "vllm_serve"
RESULT_FILE = HERE / "results" / "vllm_serve.json"
MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
         "vocab_size": 4096, "max_position_embeddings": 512}
QUANTIZE = {"bits": 4, "group_size": 128, "num_samples": 32, "seq_len": 256}
NUM_PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 32, 64
MAX_MODEL_LEN = 256


def prepare_checkpoints() -> dict[str, Path]:
    """The float model, our artifact, and its stock-GPTQ export (built once, then reused)."""
    from gptq_plugins import QuantizeConfig, quantize_model
    from gptq_plugins.convert import convert_checkpoint
    from gptq_plugins.testing import build_tiny_model

    paths = {"float": CACHE_DIR / "model", "ours": CACHE_DIR / "gptq_plugins-4bit",
             "stock": CACHE_DIR / "gptq-4bit"}
    recipe_file = CACHE_DIR / "recipe.json"
    recipe = {"model": MODEL, "quantize": QUANTIZE}
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe and all(
            p.is_dir() for p in paths.values()):
        return paths
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    build_tiny_model(paths["float"], **MODEL)
    quantize_model(paths["float"], paths["ours"], QuantizeConfig(**QUANTIZE), overwrite=True, progress=False)
    convert_checkpoint(paths["ours"], paths["stock"], to="gptq", overwrite=True)
    recipe_file.write_text(json.dumps(recipe))
    return paths


def throughput(model: Path, quantization: str | None, dtype: str, prompts: list[list[int]]) -> dict:
    """Engine start-up and timed generation of one configuration."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=str(model), quantization=quantization, dtype=dtype, max_model_len=MAX_MODEL_LEN,
              seed=0, distributed_executor_backend="uni")
    startup = time.perf_counter() - start
    try:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        llm.generate([{"prompt_token_ids": ids} for ids in prompts[:2]],
                     SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        generated = sum(len(out.outputs[0].token_ids) for out in outputs)
        return {"quantization": llm.model_config.quantization, "dtype": dtype,
                "startup_seconds": round(startup, 1), "generate_seconds": round(seconds, 2),
                "output_tokens": generated, "output_tokens_per_second": round(generated / seconds, 1)}
    finally:
        del llm
        gc.collect()


def main() -> int:
    paths = prepare_checkpoints()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, MODEL["vocab_size"], (NUM_PROMPTS, PROMPT_LEN), generator=generator).tolist()
    runs = {
        "float32": (paths["float"], None, "float32"),
        "gptq_plugins float32": (paths["ours"], "gptq_plugins", "float32"),
        "stock gptq float16": (paths["stock"], None, "float16"),
        "gptq_plugins float16": (paths["stock"], "gptq_plugins", "float16"),
    }
    results = {}
    for label, (model, quantization, dtype) in runs.items():
        try:
            results[label] = throughput(model, quantization, dtype, prompts)
        except Exception as err:  # noqa: BLE001  (a host that cannot run a case is a result too)
            results[label] = {"error": f"{type(err).__name__}: {err}"}
        print(f"{label}: {results[label]}", flush=True)
    base = results["float32"].get("output_tokens_per_second")
    for result in results.values():
        if base and "output_tokens_per_second" in result:
            result["speed_vs_float32"] = round(result["output_tokens_per_second"] / base, 2)
    import vllm

    report = {
        "benchmark": "vLLM offline throughput (LLM.generate), one run per configuration",
        "workload": {"prompts": NUM_PROMPTS, "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS},
        "model": {"type": "llama (random weights)", **MODEL},
        "quantization": QUANTIZE,
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "vllm": vllm.__version__,
                    "load_average_1min": round(os.getloadavg()[0], 1)},
        "runs": results,
    }
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
