"""Peak memory of `gptq-plugins quantize` as models get deeper, and a model larger than that peak.

Llama-shaped models of one width and 2, 8 and 32 blocks (random weights) are quantized by the CLI
in a child process; the child's peak RSS comes from `os.wait4`. Goals: peak RSS at 32 blocks at
most 1.25x that at 2 blocks, and a model whose safetensors are at least 3x the peak quantizes.

    python benchmarks/memory.py                  # hidden 2048 (32 blocks: ~6.4 GB of safetensors)
    python benchmarks/memory.py --hidden 512     # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gptq_plugins.testing import write_token_dataset

RESULTS = Path(__file__).parent / "results" / "memory.json"
CACHE = Path(__file__).parent / "cache" / "memory"


def run_cli(model: Path, out: Path, dataset: Path, args) -> dict:
    cmd = [sys.executable, "-m", "gptq_plugins.cli", "quantize", str(model), str(out), "--overwrite",
           "--dataset", str(dataset), "--num-samples", str(args.samples), "--seq-len", str(args.seq_len),
           *(["--offload-activations"] if args.offload else [])]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"quantize failed for {model}: {proc.stderr.read()[-2000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--offload", action="store_true", help="pass --offload-activations")
    parser.add_argument("--keep", action="store_true", help="keep the built models in benchmarks/cache")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    vocab = 4096
    dataset = write_token_dataset(CACHE / "tokens.jsonl", args.samples, args.seq_len, vocab)
    rows = []
    for blocks in args.blocks:
        model = CACHE / f"llama-h{args.hidden}-b{blocks}"
        if not (model / "config.json").is_file():
            # In a child process: a child forked from a parent that holds the built model would
            # count the parent's pages in its own peak RSS until it execs.
            build = (f"from gptq_plugins.testing import build_tiny_model\n"
                     f"build_tiny_model({str(model)!r}, hidden_size={args.hidden}, "
                     f"intermediate_size={args.hidden * 3}, num_hidden_layers={blocks}, "
                     f"num_attention_heads={args.hidden // 64}, vocab_size={vocab}, "
                     f"max_position_embeddings={args.seq_len}, with_tokenizer=False)\n")
            subprocess.run([sys.executable, "-c", build], check=True, stderr=subprocess.DEVNULL)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        row = {"blocks": blocks, "safetensors_mib": round(size / 2**20, 1),
               **run_cli(model, CACHE / "out", dataset, args)}
        row["safetensors_over_peak_rss"] = round(row["safetensors_mib"] / row["peak_rss_mib"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(CACHE / "out", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(model)
    by_blocks = {r["blocks"]: r for r in rows}
    result = {"hidden": args.hidden, "samples": args.samples, "seq_len": args.seq_len, "offload": args.offload,
              "runs": rows}
    if min(by_blocks) != max(by_blocks):
        growth = by_blocks[max(by_blocks)]["peak_rss_mib"] / by_blocks[min(by_blocks)]["peak_rss_mib"]
        result["peak_rss_growth"] = round(growth, 3)
        result["goal_growth_at_most_1.25"] = growth <= 1.25
    result["goal_model_3x_peak_rss"] = any(r["safetensors_over_peak_rss"] >= 3 for r in rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
