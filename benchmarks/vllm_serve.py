"""vLLM on CPU: decode speed, throughput and resident weights, float against every bit width.

One random-weight Llama of the ~300M shape (hidden 1024, 18 layers, intermediate 2816, vocab
32000; speed does not depend on the values), quantized once per bit width (g128, the CLI's
defaults otherwise) under `benchmarks/cache/vllm_serve/`. Each configuration runs in its own
process (an engine that dies, as bfloat16 does on some CPUs, is a result too):
- batch 1: one prompt of 32 tokens, 64 new tokens, greedy, EOS ignored: decode tokens/s;
- 32 concurrent prompts of 32 tokens, 64 new tokens each: output tokens/s;
- resident memory: the process's RSS after start-up (freed memory returned to the OS first), and
  from it the decoder Linears' resident bytes as float32's decoder bytes plus this RSS minus
  float32's (vLLM's CPU GEMMs keep float weights in oneDNN handles no tensor walk sees); for
  `gptq_plugins` also the bytes of the storages its layers and core kernel states hold.
Configurations: float32 and bfloat16 (no quantization), `gptq_plugins` at 2/3/4/8 bits in
float32, and the 4-bit export as stock `gptq` (float16, the only CPU dtypes stock takes) beside
ours on it. Writes `benchmarks/results/vllm_serve.json` with the CPU model and flags.

    python benchmarks/vllm_serve.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from kernels import resident_bytes, tensors_in  # benchmarks/kernels.py: this script's folder leads sys.path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its model is ours to read

HERE = Path(__file__).resolve().parent
CACHE_DIR = HERE / "cache" / "vllm_serve"
RESULT_FILE = HERE / "results" / "vllm_serve.json"
MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 18, "num_attention_heads": 16,
         "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 512}
BITS = (2, 3, 4, 8)
QUANTIZE = {"group_size": 128, "num_samples": 16, "seq_len": 128}
CONCURRENT, PROMPT_LEN, NEW_TOKENS = 32, 32, 64
MAX_MODEL_LEN = 256
DECODER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def prepare_checkpoints() -> dict[str, Path]:
    """The float model, our artifact per bit width and the 4-bit stock-GPTQ export (built once)."""
    from gptq_plugins import QuantizeConfig, quantize_model
    from gptq_plugins.convert import convert_checkpoint
    from gptq_plugins.testing import build_tiny_model

    paths = {"float": CACHE_DIR / "model", **{f"{bits}-bit": CACHE_DIR / f"gptq_plugins-{bits}bit" for bits in BITS},
             "stock": CACHE_DIR / "gptq-4bit"}
    recipe_file = CACHE_DIR / "recipe.json"
    recipe = {"model": MODEL, "quantize": QUANTIZE, "bits": BITS}
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe and all(
            p.is_dir() for p in paths.values()):
        return paths
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    build_tiny_model(paths["float"], **MODEL)
    for bits in BITS:
        print(f"quantizing {bits}-bit", flush=True)
        quantize_model(paths["float"], paths[f"{bits}-bit"], QuantizeConfig(bits=bits, **QUANTIZE), overwrite=True,
                       progress=False)
    convert_checkpoint(paths["4-bit"], paths["stock"], to="gptq", overwrite=True)
    recipe_file.write_text(json.dumps(recipe))
    return paths


def decoder_weight_bytes(model) -> dict:
    """Bytes of the storages the decoder Linears hold (parameters, buffers, core kernel states)."""

    storages, kernels = {}, set()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in DECODER_LINEARS:
            continue
        held = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        core = getattr(getattr(module, "quant_method", None), "core_linear", None)
        if core is not None:
            kernels.add(core.backend.name)
            held += [*core.buffers(), *tensors_in(core.kernel_state)]
        for tensor in held:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return {"bytes": sum(storages.values()), "kernels": sorted(kernels)}


def float32_decoder_bytes() -> int:
    """Bytes of the float32 model's decoder Linears (q, k, v, o, gate, up, down of every layer)."""
    hidden, inter, heads, kv = (MODEL[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_key_value_heads"))
    per_layer = hidden * hidden * (2 + 2 * kv // heads) + 3 * hidden * inter
    return 4 * per_layer * MODEL["num_hidden_layers"]


def run_one(model: str, quantization: str | None, dtype: str) -> dict:
    """One engine: start-up, decode at batch 1, throughput at `CONCURRENT` prompts, weight bytes."""
    import torch
    from vllm import LLM, SamplingParams

    prompts = torch.randint(3, MODEL["vocab_size"], (CONCURRENT, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    llm = LLM(model=model, quantization=quantization, dtype=dtype, max_model_len=MAX_MODEL_LEN, seed=0,
              distributed_executor_backend="uni")
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate([{"prompt_token_ids": ids} for ids in prompts[:2]], SamplingParams(temperature=0, max_tokens=4),
                 use_tqdm=False)  # warm-up

    def timed(batch):
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
        return sum(len(out.outputs[0].token_ids) for out in outputs) / (time.perf_counter() - start)

    batch_one = max(timed(prompts[:1]) for _ in range(2))
    concurrent = timed(prompts)
    weights = llm.apply_model(decoder_weight_bytes)[0]
    rss = resident_bytes()
    return {"quantization": llm.model_config.quantization, "dtype": dtype, "startup_seconds": round(startup, 1),
            "rss_after_startup_bytes": rss,
            "batch1_tokens_per_second": round(batch_one, 2),
            f"concurrent{CONCURRENT}_tokens_per_second": round(concurrent, 1),
            "core_decoder_tensor_bytes": weights["bytes"], "kernels": weights["kernels"],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> int:
    from gptq_plugins.cpu_features import cpu_features

    paths = prepare_checkpoints()
    runs = {"float32": (paths["float"], None, "float32"), "bfloat16": (paths["float"], None, "bfloat16"),
            **{f"gptq_plugins {bits}-bit float32": (paths[f"{bits}-bit"], "gptq_plugins", "float32") for bits in BITS},
            "stock gptq 4-bit float16": (paths["stock"], None, "float16"),
            "gptq_plugins 4-bit float16 (stock export)": (paths["stock"], "gptq_plugins", "float16")}
    results = {}
    for label, (model, quantization, dtype) in runs.items():
        done = subprocess.run([sys.executable, __file__, "--one", str(model), str(quantization), dtype],
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode == 0:
            results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            last = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
            results[label] = {"error": f"exit status {done.returncode}: {' | '.join(last)[-600:]}"}
        print(f"{label}: {results[label]}", flush=True)
    base, float_bytes = results["float32"], float32_decoder_bytes()
    for result in results.values():
        # only at float32: another dtype also changes the bytes of the embedding and lm_head
        if "rss_after_startup_bytes" in result and "rss_after_startup_bytes" in base and result["dtype"] == "float32":
            result["decoder_rss_bytes"] = float_bytes + result["rss_after_startup_bytes"] - base["rss_after_startup_bytes"]
            result["decoder_rss_vs_float32"] = round(result["decoder_rss_bytes"] / float_bytes, 3)
        if result.get("core_decoder_tensor_bytes"):
            result["core_decoder_tensor_vs_float32"] = round(result["core_decoder_tensor_bytes"] / float_bytes, 3)
        for key in ("batch1_tokens_per_second", f"concurrent{CONCURRENT}_tokens_per_second"):
            if key in result and key in base:
                result[f"{key.removesuffix('_per_second')}_vs_float32"] = round(result[key] / base[key], 3)
    import torch
    import vllm

    report = {
        "benchmark": "vLLM offline (LLM.generate), one process per configuration, one run each",
        "workload": {"batch1": f"1 prompt x {PROMPT_LEN} tokens, {NEW_TOKENS} new (best of 2)",
                     "concurrent": f"{CONCURRENT} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new each"},
        "model": {"type": "llama (random weights)", **MODEL}, "quantization": QUANTIZE,
        "float32_decoder_bytes": float_bytes,
        "machine": {"cpu": cpu_features().as_dict(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "vllm": vllm.__version__, "load_average_at_end": os.getloadavg()},
        "runs": results,
    }
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULT_FILE}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        _, _, model, quantization, dtype = sys.argv
        print(json.dumps(run_one(model, None if quantization == "None" else quantization, dtype)))
        sys.exit(0)
    sys.exit(main())
