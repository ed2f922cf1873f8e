"""The whole-model case of `shared/anchors.md` where GPTQModel 7.7.0 was measured on this machine kind.

Llama(hidden 512, intermediate 1376, 4 blocks, 8 heads, vocab 4096), random weights (seed 0),
calibration 64 sequences x 256 random token ids, 4-bit, symmetric, no act-order. GPTQModel:
18.0 s wall, 1124 MiB peak RSS, logits relative error 0.348 on 8 held-out sequences (RTN 0.370).

Our artifact format needs a group size that divides every input size (stock GPTQ loaders such as
vLLM refuse partial groups), and 128 does not divide 1376, so the default here is group 32 and
`--group-size -1` is the other comparable point; GPTQModel's g128 sits between the two in
granularity. Wall time and peak RSS are those of the whole `gptq-plugins quantize` process.

    python benchmarks/peer_case.py [--group-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gptq_plugins.testing import write_token_dataset

RESULTS = Path(__file__).parent / "results" / "peer_case.json"
CACHE = Path(__file__).parent / "cache" / "peer_case"
GPTQMODEL = {"wall_seconds": 18.0, "peak_rss_mib": 1124, "logits_relative_error": 0.348, "rtn_logits_relative_error": 0.370}


def build_model(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                             num_attention_heads=8, vocab_size=4096)
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def logits_error(model_dir: Path, artifact: Path, held_out: torch.Tensor) -> float:
    """||logits(quantized) - logits(float)|| / ||logits(float)|| with the artifact's exact dequantized weights."""
    import gptq_plugins  # noqa: F401  (registers the Transformers adapter)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32)
    quantized.dequantize()
    with torch.no_grad():
        expected = reference(held_out).logits
        got = quantized(held_out).logits
    return float((got - expected).norm() / expected.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=32)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    model = build_model(CACHE / "model")
    dataset = write_token_dataset(CACHE / "tokens.jsonl", 64, 256, 4096)
    out = CACHE / f"artifact-g{args.group_size}"
    cmd = [sys.executable, "-m", "gptq_plugins.cli", "quantize", str(model), str(out), "--overwrite",
           "--bits", "4", "--group-size", str(args.group_size), "--dataset", str(dataset),
           "--num-samples", "64", "--seq-len", "256"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(proc.stderr.read()[-2000:])
    held_out = torch.randint(0, 4096, (8, 256), generator=torch.Generator().manual_seed(1))
    ours = {"wall_seconds": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "logits_relative_error": round(logits_error(model, out, held_out), 4), "group_size": args.group_size}
    result = {"ours": ours, "gptqmodel_anchor": GPTQMODEL,
              "speedup": round(GPTQMODEL["wall_seconds"] / ours["wall_seconds"], 2),
              "rss_ratio": round(ours["peak_rss_mib"] / GPTQMODEL["peak_rss_mib"], 2)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    path = RESULTS.with_name(f"peer_case_g{args.group_size}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
