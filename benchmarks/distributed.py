"""Quantizing on 1 and 2 ranks (torchrun, gloo on CPU): wall time, per-rank peak RSS, time in collectives.

One random Llama-shaped model, quantized three ways: one process on every core, one process on
one thread, and two ranks of one thread each (`torchrun --standalone --nproc-per-node 2`). Each
rank reports its own peak RSS (`ru_maxrss`) and the seconds it spent inside torch.distributed
calls (sends, receives, broadcasts, gathers, barriers; barriers include waiting for the slower
rank). The cost model's expectation (forwards and Hessians 1/N, solves by the owners' largest
load per group) is computed from the model's shapes beside the measurement.

    python benchmarks/distributed.py                 # hidden 512, 4 blocks, 64 x 512 tokens
    python benchmarks/distributed.py --hidden 256    # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "distributed.json"
CACHE = Path(__file__).parent / "cache" / "distributed"
TIMED = ("send", "recv", "broadcast", "all_gather", "barrier")


def worker(report: Path, argv: list[str]) -> int:
    """One rank: run the CLI with torch.distributed's calls timed, then write this rank's figures."""
    import torch.distributed as dist

    from gptq_plugins.cli import main as cli

    seconds = dict.fromkeys(TIMED, 0.0)

    def timed(name, call):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
        return wrapper

    for name in TIMED:
        setattr(dist, name, timed(name, getattr(dist, name)))
    start = time.perf_counter()
    status = cli(argv)
    rank = int(os.environ.get("RANK", "0"))
    figures = {"rank": rank, "seconds": round(time.perf_counter() - start, 2),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "collective_seconds": {name: round(value, 3) for name, value in seconds.items()}}
    (report / f"rank-{rank}.json").write_text(json.dumps(figures))
    return status


def cost_model(hidden: int, intermediate: int, heads: int, kv_heads: int, ranks: int) -> dict:
    """Expected speed-ups of one block at `ranks` ranks: forwards and Hessians share the samples,
    solves go to owners (`assign_owners`) group by group, so a group takes its busiest owner's time."""
    from gptq_plugins.distributed import assign_owners, solve_cost

    kv = hidden // heads * kv_heads
    groups = [{"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv)}, {"o": (hidden, hidden)},
              {"gate": (hidden, intermediate), "up": (hidden, intermediate)}, {"down": (intermediate, hidden)}]
    whole = busiest = 0
    for group in groups:
        costs = {name: solve_cost(*shape) for name, shape in group.items()}
        owners = assign_owners(costs, ranks)
        whole += sum(costs.values())
        busiest += max(sum(c for n, c in costs.items() if owners[n] == r) for r in range(ranks))
    return {"forwards_and_hessians_speedup": ranks, "solve_speedup": round(whole / busiest, 2)}


def launch(label: str, command: list[str], threads: int, report: Path) -> dict:
    shutil.rmtree(report, ignore_errors=True)
    report.mkdir(parents=True)
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed: {done.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(report.glob("rank-*.json"))]
    row = {"run": label, "threads_per_rank": threads, "wall_seconds": round(time.perf_counter() - start, 1),
           "ranks": ranks}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    from gptq_plugins.cpu_features import cpu_features
    from gptq_plugins.testing import write_token_dataset

    CACHE.mkdir(parents=True, exist_ok=True)
    heads, kv_heads, intermediate, vocab = args.hidden // 64, args.hidden // 128, args.hidden * 3, 1024
    model = CACHE / f"llama-h{args.hidden}-b{args.blocks}"
    if not (model / "config.json").is_file():
        build = (f"from gptq_plugins.testing import build_tiny_model\n"
                 f"build_tiny_model({str(model)!r}, hidden_size={args.hidden}, intermediate_size={intermediate}, "
                 f"num_hidden_layers={args.blocks}, num_attention_heads={heads}, num_key_value_heads={kv_heads}, "
                 f"vocab_size={vocab}, max_position_embeddings={args.seq_len}, with_tokenizer=False)\n")
        subprocess.run([sys.executable, "-c", build], check=True)
    dataset = write_token_dataset(CACHE / "tokens.jsonl", args.samples, args.seq_len, vocab)
    quantize = ["quantize", str(model), str(CACHE / "out"), "--overwrite", "--dataset", str(dataset),
                "--num-samples", str(args.samples), "--seq-len", str(args.seq_len)]
    me = [str(Path(__file__).resolve()), "--worker", str(CACHE / "report"), "--"]
    runs = [launch("1 process, 2 threads", [sys.executable, *me, *quantize], 2, CACHE / "report"),
            launch("1 process, 1 thread", [sys.executable, *me, *quantize], 1, CACHE / "report"),
            launch("2 ranks (torchrun --standalone --nproc-per-node 2)",
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    *me, *quantize], 1, CACHE / "report")]
    shutil.rmtree(CACHE / "out", ignore_errors=True)
    one, two = runs[1], runs[2]
    activations = {n: 2 * 4 * (args.samples // n) * args.seq_len * args.hidden / 2**20 for n in (1, 2)}
    result = {
        "model": {"hidden": args.hidden, "intermediate": intermediate, "blocks": args.blocks, "heads": heads,
                  "kv_heads": kv_heads},
        "calibration": f"{args.samples} samples x {args.seq_len} tokens",
        "machine": cpu_features().as_dict(), "cores": os.cpu_count(),
        "runs": runs,
        "hidden_states_per_rank_mib": {f"{n} rank{'s' if n > 1 else ''}": round(mib, 1)
                                       for n, mib in activations.items()},
        "speedup_two_ranks_over_one_thread": round(one["wall_seconds"] / two["wall_seconds"], 2),
        "speedup_two_ranks_over_two_threads": round(runs[0]["wall_seconds"] / two["wall_seconds"], 2),
        "peak_rss_mib_per_rank": {"1 rank": one["ranks"][0]["peak_rss_mib"],
                                  "2 ranks": [r["peak_rss_mib"] for r in two["ranks"]]},
        "collective_seconds_per_block": [round(sum(r["collective_seconds"].values()) / args.blocks, 3)
                                         for r in two["ranks"]],
        "cost_model_two_ranks": cost_model(args.hidden, intermediate, heads, kv_heads, 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker(Path(sys.argv[2]), sys.argv[4:]))
    main()
