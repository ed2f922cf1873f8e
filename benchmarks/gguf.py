"""GGUF files of SmolLM2-135M: ours (GPTQ on each type's exact block grid) against llama.cpp's own
quantizer on the same float model, plain and with an importance matrix computed from the same
calibration tokens, all scored by llama.cpp itself on the same held-out text.

The float model goes to llama.cpp as an F32 GGUF we write (`write_float_gguf`); llama.cpp's
quantizer gets the token embedding as Q8_0, as ours is, so only the decoder Linears differ.
The importance matrix is what llama.cpp's `llama-imatrix` accumulates: per Linear, the mean
square of each input column over the calibration tokens (the Hessian's diagonal). Perplexity:
non-overlapping windows of 512 tokens of Debian's license texts (as benchmarks/quality.py),
the next-token NLL of every predicted token, from llama.cpp's logits.

Writes benchmarks/results/gguf.json and the README table between its markers.
Run: .venv/bin/python benchmarks/gguf.py [--types Q4_0,Q8_0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCHMARKS = Path(__file__).resolve().parent
# This file's name would shadow the `gguf` package: the benchmarks folder goes after site-packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS] + [str(BENCHMARKS)]
from quality import LICENSES, README, REAL_EVAL_TEXTS, RESULTS_DIR  # noqa: E402

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K")
SEQ_LEN = 512
NUM_SAMPLES = 64  # the calibration of benchmarks/quality.py's SmolLM2 runs
MARKERS = ("<!-- gguf-table:start -->", "<!-- gguf-table:end -->")


def llama_cpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """exp(mean next-token NLL) of llama.cpp's logits over `windows [n, SEQ_LEN]`."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=SEQ_LEN, n_batch=SEQ_LEN, logits_all=True, verbose=False, n_threads=threads)
    total, count = 0.0, 0
    try:
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[:len(window) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            total += float((log_norm - logits[np.arange(len(window) - 1), window[1:]]).sum())
            count += len(window) - 1
    finally:
        llm.close()
    return math.exp(total / count)


@torch.no_grad()
def importance_matrix(model, layout, token_ids: torch.Tensor) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean square of each input column of that Linear over the calibration."""
    from gptq_plugins.gguf_file import gguf_name

    sums, counts, hooks = {}, {}, []
    for index, block in enumerate(layout.block_list(model)):
        for name in layout.block_linear_names(index, block):
            path = f"{layout.blocks}.{index}.{name}"
            key = gguf_name(layout.checkpoint_name(path) + ".weight", model.config)

            def hook(_module, inputs, _output, key=key):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.square().sum(dim=0)
                counts[key] = counts.get(key, 0) + x.shape[0]

            hooks.append(block.get_submodule(name).register_forward_hook(hook))
    try:
        for batch in token_ids.split(8):
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return {key: (sums[key] / counts[key]).float().numpy() for key in sums}


def markdown(report: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct as GGUF; perplexity by llama.cpp on {report['eval']} "
             f"(float: {report['float_perplexity_llama_cpp']:.3f} in llama.cpp, "
             f"{report['float_perplexity_transformers']:.3f} in Transformers). Calibration and importance "
             f"matrix: {report['calibration']}. {report['machine']['model']}, {report['threads']} threads.",
             "", "| type | llama.cpp | llama.cpp + imatrix | ours (GPTQ) | ours vs best llama.cpp | MiB (ours / theirs) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in report["rows"]:
        best = min(row["llama_cpp"], row["llama_cpp_imatrix"])
        lines.append(f"| {row['type']} | {row['llama_cpp']:.3f} | {row['llama_cpp_imatrix']:.3f} | "
                     f"{row['ours']:.3f} | {row['ours'] / best - 1:+.2%} | "
                     f"{row['ours_mib']:.1f} / {row['llama_cpp_mib']:.1f} |")
    return "\n".join(lines)


def update_readme(table: str) -> bool:
    text = README.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    README.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, from {','.join(TYPES)}")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per text (default: all)")
    args = parser.parse_args(argv)
    types = args.types.split(",")

    from gptq_plugins.calibration import added_bos, prepend_bos
    from gptq_plugins.config import QuantizeConfig
    from gptq_plugins.cpu_features import cpu_features
    from gptq_plugins.evaluate import heldout_tokens, perplexity
    from gptq_plugins.gguf_export import write_float_gguf
    from gptq_plugins.model_loading import load_model
    from gptq_plugins.pipeline import quantize_model
    from gptq_plugins.plugins import load_calibration
    from gptq_plugins.preparation import layout_for
    from gptq_plugins.real_models import SMOLLM2_135M, float_model_dir
    from gptq_plugins.testing import llama_cpp_quantize

    threads = torch.get_num_threads()
    model_dir = float_model_dir(SMOLLM2_135M, Path(__file__).resolve().parent / "cache")
    model, tokenizer = load_model(model_dir)
    bos = added_bos(tokenizer)
    texts = [LICENSES / name for name in REAL_EVAL_TEXTS if (LICENSES / name).is_file()]
    heldout = torch.cat([heldout_tokens(str(text), tokenizer, args.eval_tokens) for text in texts])
    width = SEQ_LEN - (bos is not None)
    windows = heldout[: heldout.numel() // width * width].view(-1, width)
    if bos is not None:
        windows = prepend_bos(windows, bos)
    base = QuantizeConfig.from_options(gguf_type="Q4_0", num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
    calibration = load_calibration(base, tokenizer, SEQ_LEN)
    report = {"model": SMOLLM2_135M.name, "eval": ", ".join(t.name for t in texts) + f" ({windows.numel()} tokens)",
              "calibration": f"{NUM_SAMPLES} x {SEQ_LEN} tokens of the builtin set, seed 0",
              "machine": cpu_features().as_dict(), "threads": threads,
              "float_perplexity_transformers": perplexity(model, heldout, SEQ_LEN, bos)["perplexity"], "rows": []}
    imatrix = importance_matrix(model, layout_for(model), calibration.token_ids)
    del model
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as work:
        work = Path(work)
        float_file = write_float_gguf(model_dir, work / "float-F32.gguf")
        report["float_perplexity_llama_cpp"] = llama_cpp_perplexity(float_file, windows, threads)
        print(f"float: Transformers {report['float_perplexity_transformers']:.3f}, "
              f"llama.cpp {report['float_perplexity_llama_cpp']:.3f}", flush=True)
        for type_name in types:
            row = {"type": type_name}
            for label, matrix in (("llama_cpp", None), ("llama_cpp_imatrix", imatrix)):
                out = work / f"{label}-{type_name}.gguf"
                llama_cpp_quantize(float_file, out, type_name, matrix, threads)
                row[label] = llama_cpp_perplexity(out, windows, threads)
                row["llama_cpp_mib"] = out.stat().st_size / 2**20
            start = time.perf_counter()
            config = QuantizeConfig.from_options(gguf_type=type_name, num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
            ours = quantize_model(model_dir, work / f"ours-{type_name}.gguf", config, calibration=calibration,
                                  progress=False)
            row["ours_seconds"] = round(time.perf_counter() - start, 1)
            row["ours"] = llama_cpp_perplexity(ours, windows, threads)
            row["ours_mib"] = ours.stat().st_size / 2**20
            print(json.dumps(row), flush=True)
            report["rows"].append(row)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "gguf.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    print(table)
    print("README table " + ("updated" if update_readme(table) else f"not updated: markers {MARKERS} missing"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
