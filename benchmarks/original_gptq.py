"""The original GPTQ, side by side: is a result ours or the algorithm's?

The algorithm of Frantar et al. exactly as their reference code runs it on Llama models: their
grid (`Quantizer.find_params`, symmetric, exact float32 scales), `fasterquant` (damping, upper
Cholesky factor of the inverse, lazy 128-column blocks, group parameters from the block-start
weights), and a layer-by-layer loop (block 0's inputs caught, then per block: q/k/v, o, gate/up,
down in turn, each group's Hessians from the block run with the groups before it quantized, the
block's quantized outputs feeding the next). Written here from the paper's algorithm, sharing
nothing with `gptq_plugins`' solver or pipeline: only the model, the calibration windows and the
perplexity windows come from our code, so both are scored on exactly the same tokens as
`benchmarks/quality.py`. Writes `benchmarks/results/original-gptq.json`.

    python benchmarks/original_gptq.py [--bits 4] [--group-size 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gptq_plugins.plugins import load_calibration
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.cpu_features import cpu_features

from quality import SUBJECTS, Bench

RESULTS = Path(__file__).resolve().parent / "results" / "original-gptq.json"
SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def grid(w: torch.Tensor, maxq: int):
    """The reference `Quantizer.find_params(weight=True)` for sym=True: per row, exact scale."""
    zero = torch.zeros(w.shape[0])
    xmax = torch.maximum(torch.minimum(w.min(1).values, zero).abs(), torch.maximum(w.max(1).values, zero))
    xmax[xmax == 0] = 1
    scale = 2 * xmax / maxq
    return scale[:, None], torch.full_like(scale, (maxq + 1) / 2)[:, None]


def fake_quantize(x, scale, zero, maxq):
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    maxq, out = (1 << bits) - 1, torch.empty_like(w)
    for i in range(0, w.shape[1], group):
        out[:, i:i + group] = fake_quantize(w[:, i:i + group], *grid(w[:, i:i + group], maxq), maxq)
    return out


def fasterquant(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, damp: float, block: int = 128):
    maxq, w, h = (1 << bits) - 1, w.clone(), h.clone()
    columns = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:
                scale, zero = grid(w[:, i1 + i:i1 + i + group], maxq)
            col = w1[:, i]
            q[:, i1 + i] = fake_quantize(col[:, None], scale, zero, maxq).flatten()
            err1[:, i] = (col - q[:, i1 + i]) / hinv1[i, i]
            w1[:, i:] -= err1[:, i:i + 1] @ hinv1[i:i + 1, i:]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q


class _Caught(Exception):
    pass


@torch.no_grad()
def quantize_layer_by_layer(model, ids: torch.Tensor, bits: int, group: int, damp: float) -> None:
    layers = model.model.layers
    caught = {}

    def catch(_module, args, kwargs):
        caught.update(hidden=args[0] if args else kwargs["hidden_states"],
                      kwargs={k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(ids, use_cache=False)
    except _Caught:
        pass
    finally:
        handle.remove()
    hidden, kwargs = caught["hidden"], caught["kwargs"]
    for layer in layers:
        for names in SEQUENTIAL_GROUPS:
            hessians = {}

            def accumulate(module, args, name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                hessians[name] = 2 * x.T @ x / x.shape[0]  # one batch holds every window

            handles = [layer.get_submodule(n).register_forward_pre_hook(
                lambda m, args, n=n: accumulate(m, args, n)) for n in names]
            layer(hidden, **kwargs)
            for h in handles:
                h.remove()
            for n in names:
                linear = layer.get_submodule(n)
                linear.weight.copy_(fasterquant(linear.weight.float(), hessians[n], bits, group, damp))
        out = layer(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bench = Bench(SUBJECTS["smollm2"], SUBJECTS["smollm2"].eval_tokens)
    config = bench.config({"bits": args.bits, "group_size": args.group_size})
    ids = load_calibration(config, bench.tokenizer, config.seq_len).token_ids
    result = {"model": bench.description, "eval": bench.evaluate(), "machine": cpu_features().as_dict(),
              "calibration": {"dataset": config.dataset, "num_samples": config.num_samples,
                              "seq_len": config.seq_len, "seed": config.seed},
              "bits": args.bits, "group_size": args.group_size, "damp_percent": config.damp_percent}
    linears = [m for layer in bench.model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear in linears:
            linear.weight.copy_(rtn(linear.weight.float(), args.bits, args.group_size))
    result["original_rtn_perplexity"] = bench.evaluate()["perplexity"]
    bench.model.load_state_dict(bench.float_state)
    start = time.perf_counter()
    quantize_layer_by_layer(bench.model, ids, args.bits, args.group_size, config.damp_percent)
    result["original_gptq_seconds"] = round(time.perf_counter() - start, 1)
    result["original_gptq_perplexity"] = bench.evaluate()["perplexity"]
    print(json.dumps(result, indent=2))
    runs = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    runs = [r for r in runs if (r["bits"], r["group_size"]) != (args.bits, args.group_size)] + [result]
    RESULTS.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
