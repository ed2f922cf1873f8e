"""Quantize a float32 Llama with GPTQModel on CPU, as the peer side of `benchmarks/peer_case.py`.

It runs in a separate venv that has GPTQModel (so it imports only gptqmodel, torch, transformers
and the standard library, never gptq_plugins); `peer_case.py` calls it in a subprocess:

    /tmp/gm/bin/python benchmarks/peer_gptqmodel.py MODEL_DIR TOKENS_JSONL OUT_DIR \
        --bits 4 --group-size 128 --damp 0.01 [--sym] [--desc-act] [--act-group-aware] [--threads N]

The settings are those of a plain GPTQ: GPTQModel's own defaults that differ (act_group_aware on,
damp 0.05, RTN fallback for weakly calibrated modules, bfloat16 loading, auto device) are set
explicitly. Calibration is token ids (no tokenizer needed). It writes a standard GPTQ checkpoint
(`quant_method` gptq, `checkpoint_format` gptq) to OUT_DIR and prints one JSON line:
{"quantize_seconds", "gptqmodel", "torch", "settings"}; `quantize_seconds` times `quantize()` only.
Threads: torch.set_num_threads(N), and OMP_NUM_THREADS, MKL_NUM_THREADS = N set before import;
GPTQMODEL_CPU_WORKERS = max(N, 2) (its own default is half the cores, and 7.7.0 refuses 1: its
model-loader pool asks for 2 workers), so at N = 1 its compute still runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# This folder holds kernels.py and gguf.py, which would shadow the `kernels` and `gguf` packages
# that transformers/GPTQModel import: take it off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("tokens_jsonl")
    parser.add_argument("out_dir")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric (default)")
    parser.add_argument("--desc-act", action="store_true")
    parser.add_argument("--act-group-aware", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads and GPTQMODEL_CPU_WORKERS (default: all cores)")
    return parser.parse_args()


def read_calibration(path: str) -> list[dict]:
    """`{"input_ids", "attention_mask"}` rows (lists of ints) from a `{"input_ids": [...]}` jsonl."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                ids = json.loads(line)["input_ids"]
                rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows


def main() -> None:
    """Load, quantize (timed), save, print the JSON line."""
    args = parse_args()
    model_dir, tokens, out_dir = (os.path.abspath(p) for p in (args.model_dir, args.tokens_jsonl, args.out_dir))
    # GPTQModel writes a ./logs/gptq_log_*.log per run: run in a scratch folder, not the caller's.
    scratch = tempfile.TemporaryDirectory(prefix="peer_gptqmodel_")
    os.chdir(scratch.name)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(args.threads, 2))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    # GPTQModel prints its banner, logs and progress bars on stdout: send them to stderr so that
    # stdout carries only the final JSON line.
    json_stdout = os.dup(1)
    os.dup2(2, 1)

    import torch
    import gptqmodel
    import gptqmodel.models.loader
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.utils.cpp import load_pack_block_extension

    # 7.7.0's from_pretrained always loads a tokenizer and fails on a model dir without one;
    # calibration here is token ids, so none is needed (quantize() only tokenizes raw text).
    gptqmodel.models.loader.load_hf_tokenizer = lambda *args, **kwargs: None

    torch.set_num_threads(args.threads)

    requested = dict(
        bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=args.desc_act,
        act_group_aware=args.act_group_aware, damp_percent=args.damp, damp_auto_increment=0.0,
        mse=0.0, static_groups=False, true_sequential=True, lm_head=False, fallback=None,
        method="gptq", format="gptq", device="cpu", offload_to_disk=False)
    calibration = read_calibration(tokens)

    model = GPTQModel.load(model_dir, QuantizeConfig(**requested), dtype=torch.float32)
    model_dtype = str(model.model.dtype).removeprefix("torch.")
    # Packing uses a C++ extension that is JIT-compiled (~30 s, cached under ~/.cache/gptqmodel)
    # on first use; build it here so that one-time compile stays out of the timed region.
    pack_extension = load_pack_block_extension() is not None

    start = time.perf_counter()
    model.quantize(calibration, batch_size=1, calibration_sort=None)
    seconds = time.perf_counter() - start
    model.save(out_dir)
    sys.stdout.flush()
    os.dup2(json_stdout, 1)

    used = model.quantize_config
    settings = {name: plain(getattr(used, name)) for name in requested}
    settings.update(model_dtype=model_dtype, calibration_rows=len(calibration), batch_size=1,
                    torch_threads=torch.get_num_threads(),
                    GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS"),
                    pack_extension=pack_extension)
    print(json.dumps({"quantize_seconds": round(seconds, 3), "gptqmodel": gptqmodel.__version__,
                      "torch": torch.__version__, "settings": settings}), flush=True)


def plain(value):
    """A config value as JSON (enums by value, devices and dtypes as strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "value", str(value))


if __name__ == "__main__":
    main()
