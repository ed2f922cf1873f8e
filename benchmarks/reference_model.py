"""The reference model of the quality benchmark: a small Llama trained here, reproducibly.

Random-weight models cannot show what quantization costs, and nothing can be downloaded, so we
train one on text every CPython ships: the calibration split of the builtin corpus (pydoc topics
and standard-library sources), with a byte-level BPE tokenizer trained on the same split. The
held-out split (`builtin_documents("eval")`) is never seen by the tokenizer, the training or the
GPTQ calibration; perplexity is measured on it.

Training is deterministic (fixed seeds, deterministic algorithms, a fixed thread count and data
order) and sized to finish in under 15 minutes on 2 idle cores (0.62 s a step with AMX: about
12 minutes). The result is cached under `benchmarks/cache/reference_model/` together with the
recipe that built it; a cache whose recipe differs from `RECIPE` is rebuilt. Run `python benchmarks/reference_model.py [--force]`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

CACHE_DIR = Path(__file__).resolve().parent / "cache" / "reference_model"
RECIPE_FILE = "recipe.json"
# Bitwise reproducibility of CPU matmuls depends on the thread count, so it is part of the recipe.
RECIPE = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "context_length": 256,
    "batch_size": 16,
    "steps": 1100,
    "peak_lr": 3e-3,
    "final_lr_fraction": 0.1,
    "warmup_steps": 20,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "seed": 0,
    "threads": 2,
    # Mixed precision (float32 master weights, bfloat16 matmuls) is ~1.5x faster on CPUs with AMX;
    # the saved model is float32.
    "autocast_dtype": "bfloat16",
}
LOG_EVERY = 25


def cached_recipe(path: Path) -> dict | None:
    try:
        return json.loads((path / RECIPE_FILE).read_text())["recipe"]
    except (OSError, ValueError, KeyError):
        return None


def learning_rate(step: int, recipe: dict) -> float:
    """Linear warm-up, then cosine decay to `final_lr_fraction` of the peak."""
    peak = recipe["peak_lr"]
    if step < recipe["warmup_steps"]:
        return peak * (step + 1) / recipe["warmup_steps"]
    progress = (step - recipe["warmup_steps"]) / max(1, recipe["steps"] - recipe["warmup_steps"])
    floor = recipe["final_lr_fraction"]
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batches(stream: torch.Tensor, recipe: dict):
    """`steps` batches of non-overlapping windows, reshuffled (seeded) at each pass over the text."""
    seq, batch = recipe["context_length"], recipe["batch_size"]
    chunks = stream[: stream.numel() // seq * seq].view(-1, seq)
    generator = torch.Generator().manual_seed(recipe["seed"])
    order = torch.empty(0, dtype=torch.long)
    for _ in range(recipe["steps"]):
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(len(chunks), generator=generator)])
        yield chunks[order[:batch]]
        order = order[batch:]


def train(out_dir: Path, recipe: dict) -> dict:
    """Build the tokenizer and the initial model, train it, save both at `out_dir`; return stats."""
    from gptq_plugins.calibration import builtin_documents, tokenize_documents
    from gptq_plugins.model_loading import load_model
    from gptq_plugins.testing import build_tiny_model

    torch.set_num_threads(recipe["threads"])
    torch.use_deterministic_algorithms(True)
    start, cpu_start = time.perf_counter(), time.process_time()
    build_tiny_model(out_dir, hidden_size=recipe["hidden_size"], intermediate_size=recipe["intermediate_size"],
                     num_hidden_layers=recipe["num_hidden_layers"],
                     num_attention_heads=recipe["num_attention_heads"], vocab_size=recipe["vocab_size"],
                     max_position_embeddings=recipe["context_length"], seed=recipe["seed"])
    model, tokenizer = load_model(out_dir)
    stream = tokenize_documents(builtin_documents("calibration"), tokenizer)
    print(f"training text: {stream.numel()} tokens; {recipe['steps']} steps of "
          f"{recipe['batch_size']}x{recipe['context_length']} tokens", flush=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["peak_lr"], betas=(0.9, 0.95),
                                  weight_decay=recipe["weight_decay"])
    losses = []
    for step, batch in enumerate(training_batches(stream, recipe)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        with torch.autocast("cpu", dtype=getattr(torch, recipe["autocast_dtype"])):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == recipe["steps"]:
            recent = sum(losses[-LOG_EVERY:]) / len(losses[-LOG_EVERY:])
            print(f"step {step + 1}/{recipe['steps']}: loss {recent:.3f}, "
                  f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU",
                  flush=True)
    model.eval()
    model.save_pretrained(out_dir)
    return {"training_tokens": recipe["steps"] * recipe["batch_size"] * recipe["context_length"],
            "corpus_tokens": int(stream.numel()),
            "final_loss": sum(losses[-LOG_EVERY:]) / len(losses[-LOG_EVERY:]),
            "wall_seconds": round(time.perf_counter() - start, 1),
            # CPU seconds over the thread count: the wall time on otherwise idle cores.
            "cpu_seconds": round(time.process_time() - cpu_start, 1)}


def ensure_reference_model(cache_dir: Path = CACHE_DIR, *, force: bool = False) -> Path:
    """The cached reference model directory, trained first when missing or built by another recipe."""
    if not force and cached_recipe(cache_dir) == RECIPE:
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".reference_model.tmp-", dir=cache_dir.parent))
    try:
        stats = train(tmp, RECIPE)
        (tmp / RECIPE_FILE).write_text(json.dumps({"recipe": RECIPE, "training": stats}, indent=2) + "\n")
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        tmp.rename(cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return cache_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="retrain even if the cache is current")
    args = parser.parse_args(argv)
    path = ensure_reference_model(force=args.force)
    print(f"reference model: {path}")
    print(json.dumps(json.loads((path / RECIPE_FILE).read_text())["training"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
