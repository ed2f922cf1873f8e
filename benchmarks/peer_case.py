"""Side by side with GPTQModel 7.7: the same model, token ids and settings, in alternating processes.

Each run is a whole process (`gptq-plugins quantize`, or `peer_gptqmodel.py` in GPTQModel's own
venv), timed from outside: wall seconds, CPU seconds (user + system, from `wait4`) and peak RSS.
Both artifacts are then read by one reader (`read_artifact` + `dequantize_packed`, the stock GPTQ
formula) into the float model, and scored by the logits' relative error on held-out token ids.
Settings: 4-bit, group 128, symmetric, damp 0.01, no act-order, true-sequential, float32.

Models (random weights, seed 0, vocab 4096): `peer` is the case of `shared/anchors.md` (Llama,
hidden 512, intermediate 1536, 4 blocks), `deep` a larger one (hidden 1024, intermediate 2816,
8 blocks). `--load busy` runs a CPU-bound process beside both, as on a shared machine.

    make bench-peer      # builds GPTQModel's venv once (about 6 GB), then runs this
    python benchmarks/peer_case.py --peer-python PATH [--models peer deep] [--threads 1 2]
                                   [--load idle busy] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptq_plugins.artifact import read_artifact
from gptq_plugins.cpu_features import cpu_features
from gptq_plugins.packing import dequantize_packed
from gptq_plugins.testing import write_token_dataset

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "peer_case.json"
CACHE = HERE / "cache" / "peer_case"
MODELS = {"peer": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8),
          "deep": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16)}
VOCAB, SAMPLES, SEQ_LEN = 4096, 64, 256
SETTINGS = {"bits": 4, "group_size": 128, "damp": 0.01}
HELD_OUT = (8, 256)


def build_model(name: str) -> Path:
    """The random float32 Llama `name`, saved once under the cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = CACHE / name
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **MODELS[name])).save_pretrained(path)
    return path


def ours_command(model: Path, tokens: Path, out: Path, threads: int) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "gptq_plugins.cli", "quantize", str(model), str(out), "--overwrite",
           "--bits", str(SETTINGS["bits"]), "--group-size", str(SETTINGS["group_size"]),
           "--damp", str(SETTINGS["damp"]), "--dataset", str(tokens), "--num-samples", str(SAMPLES),
           "--seq-len", str(SEQ_LEN)]
    return cmd, {"OMP_NUM_THREADS": str(threads)}


def peer_command(peer_python: str, model: Path, tokens: Path, out: Path, threads: int) -> tuple[list[str], dict]:
    cmd = [peer_python, str(HERE / "peer_gptqmodel.py"), str(model), str(tokens), str(out),
           "--bits", str(SETTINGS["bits"]), "--group-size", str(SETTINGS["group_size"]),
           "--damp", str(SETTINGS["damp"]), "--sym", "--threads", str(threads)]
    return cmd, {}


def timed(cmd: list[str], env: dict) -> dict:
    """Wall and CPU seconds and peak RSS of one whole process; its last stdout line if JSON."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # pipes could fill and block
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{stderr[-3000:]}")
    lines = stdout.strip().splitlines()
    inner = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), **({"inner": inner} if inner else {})}


def logits_error(model_dir: Path, artifact_dir: Path, held_out: torch.Tensor) -> float:
    """||logits(dequantized) - logits(float)|| / ||logits(float)||, each artifact read the same way."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = model(held_out).logits
    artifact = read_artifact(artifact_dir)
    bits = artifact.config.bits
    weights = {f"{name}.weight": dequantize_packed(*(artifact.tensor(f"{name}.{part}") for part in
                                                     ("qweight", "qzeros", "scales", "g_idx")), bits)
               for name in artifact.modules}
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing or len(weights) != 7 * model.config.num_hidden_layers:
        raise SystemExit(f"{artifact_dir}: {len(weights)} quantized Linears, unknown to the model: {missing[:3]}")
    with torch.no_grad():
        for name, weight in weights.items():
            params[name].copy_(weight)
        got = model(held_out).logits
    return round(float((got - expected).norm() / expected.norm()), 4)


class BusyNeighbour:
    """A CPU-bound process beside the runs (a loaded shared machine), or nothing."""

    def __init__(self, busy: bool):
        self.busy = busy

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if self.busy else None
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def median_of(runs: list[dict], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True, help="python of a venv with gptqmodel==7.7.0")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--load", nargs="+", choices=["idle", "busy"], default=["idle", "busy"])
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each (medians reported)")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    tokens = write_token_dataset(CACHE / "tokens.jsonl", SAMPLES, SEQ_LEN, VOCAB)
    held_out = torch.randint(0, VOCAB, HELD_OUT, generator=torch.Generator().manual_seed(1))
    cases = []
    with tempfile.TemporaryDirectory(prefix="peer_case_") as scratch:
        for name in args.models:
            model = build_model(name)
            for threads in args.threads:
                for load in args.load:
                    runs = {"ours": [], "gptqmodel": []}
                    errors = {}
                    for round_ in range(args.rounds):
                        for tool in ("ours", "gptqmodel"):
                            out = Path(scratch) / f"{tool}-{name}"
                            cmd, env = (ours_command(model, tokens, out, threads) if tool == "ours"
                                        else peer_command(args.peer_python, model, tokens, out, threads))
                            with BusyNeighbour(load == "busy"):
                                runs[tool].append(timed(cmd, env))
                            errors[tool] = logits_error(model, out, held_out)
                            print(f"{name} threads={threads} {load} round {round_}: {tool} {runs[tool][-1]}",
                                  flush=True)
                    summary = {tool: {key: median_of(tool_runs, key)
                                      for key in ("wall_seconds", "cpu_seconds", "peak_rss_mib")}
                               | {"logits_relative_error": errors[tool]} for tool, tool_runs in runs.items()}
                    ours, peer = summary["ours"], summary["gptqmodel"]
                    cases.append({"model": name, "threads": threads, "load": load, **summary,
                                  "speedup_wall": round(peer["wall_seconds"] / ours["wall_seconds"], 2),
                                  "speedup_cpu": round(peer["cpu_seconds"] / ours["cpu_seconds"], 2),
                                  "rss_ratio": round(ours["peak_rss_mib"] / peer["peak_rss_mib"], 2),
                                  "runs": runs})
                    print(json.dumps({k: v for k, v in cases[-1].items() if k != "runs"}), flush=True)
    result = {"machine": cpu_features().as_dict(), "cores": os.cpu_count(), "torch": torch.__version__, "settings": SETTINGS,
              "calibration": {"samples": SAMPLES, "seq_len": SEQ_LEN}, "models": MODELS, "cases": cases}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
