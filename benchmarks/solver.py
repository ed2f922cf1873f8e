"""One-layer benchmark: our Hessian accumulation and GPTQ solve against the original GPTQ code.

The layer is the synthetic one of `/work/shared/anchors.md`: W ~ N(0, 0.02), calibration inputs
X = Z A with a decaying spectrum and 8 outlier input channels x20, held-out inputs drawn the same
way. Both implementations run in this process on the same data, so their timings compare; the
error is `||W X' - Wq X'||^2 / ||W X'||^2` on the held-out X'.

    python benchmarks/solver.py                 # 4096 x 4096, 128 samples x 512 tokens
    python benchmarks/solver.py --size 1024     # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from gptq_plugins.config import QuantizeConfig
from gptq_plugins.hessian import HessianAccumulator
from gptq_plugins.solver import quantize_weight, rtn

RESULTS = Path(__file__).parent / "results" / "solver.json"
OUTLIER_CHANNELS = 8
OUTLIER_SCALE = 20.0


def synthetic_layer(size: int, samples: int, tokens: int, held_out_tokens: int, seed: int):
    """Weight, calibration samples `[tokens, size]` and held-out inputs, all seeded."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.exp(-torch.arange(size) / size)
    mixing = spectrum[:, None] * torch.randn(size, size, generator=g) / size ** 0.5
    mixing[:, torch.randperm(size, generator=g)[:OUTLIER_CHANNELS]] *= OUTLIER_SCALE
    weight = torch.randn(size, size, generator=g) * 0.02
    calibration = [torch.randn(tokens, size, generator=g) @ mixing for _ in range(samples)]
    held_out = torch.randn(held_out_tokens, size, generator=g) @ mixing
    return weight, calibration, held_out


def held_out_error_of(weight, held_out):
    """`error(approx)`: relative output error of `approx` against `weight` on `held_out` inputs."""
    reference = weight @ held_out.T
    energy = reference.square().sum()
    return lambda approx: float((reference - approx @ held_out.T).square().sum() / energy)


def warm_up():
    """Run both solvers once on a small layer so one-time library set-up is not timed."""
    weight, hessian = torch.randn(256, 256), torch.eye(256)
    quantize_weight(weight, hessian, QuantizeConfig(group_size=128))
    original_fasterquant(weight, hessian, 15, True, groupsize=128)


# ---------------------------------------------------------------------------------------------
# The original implementation (IST-DASLab/gptq: gptq.py `GPTQ.add_batch`/`fasterquant` and
# quant.py `Quantizer`), kept as published apart from dropping the layer object.

def original_hessian(samples):
    columns = samples[0].shape[1]
    hessian, nsamples = torch.zeros(columns, columns), 0
    for inp in samples:
        inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        hessian *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = math.sqrt(2 / nsamples) * inp.float()
        hessian += inp.matmul(inp.t())
    return hessian


def original_find_params(x, maxq, sym):
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def original_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def original_fasterquant(W, H, maxq, sym, blocksize=128, percdamp=.01, groupsize=-1,
                         actorder=False, static_groups=False):
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    scale, zero = original_find_params(W, maxq, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [original_find_params(W[:, i:(i + groupsize)], maxq, sym)
                  for i in range(0, columns, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = original_find_params(W[:, (i1 + i):(i1 + i + groupsize)], maxq, sym)
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[idx // groupsize]
            q = original_quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q, torch.sum(Losses).item()


# ---------------------------------------------------------------------------------------------

def timed(fn):
    """`(value, {wall_s, cpu_s})`: CPU seconds of this process are less disturbed than wall
    seconds when other jobs share the cores (but include idle-spinning worker threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, {"wall_s": round(time.perf_counter() - wall, 3),
                   "cpu_s": round(time.process_time() - cpu, 3)}


def ours_hessian(samples, matmul_dtype=torch.float32):
    acc = HessianAccumulator(samples[0].shape[1], matmul_dtype=matmul_dtype)
    for sample in samples:  # one call per sample, as a calibration loop makes them
        acc.add(sample)
    return acc.hessian()


def run(size: int, samples: int, tokens: int, held_out_samples: int, seed: int) -> dict:
    weight, calibration, held_out = synthetic_layer(size, samples, tokens, held_out_samples * tokens, seed)
    held_out_error = held_out_error_of(weight, held_out)
    warm_up()
    base = QuantizeConfig(bits=4, group_size=128, sym=False)
    configs = {"4-bit g128 asym": base, "+ act-order": base.replace(desc_act=True),
               "+ act-order + static groups": base.replace(desc_act=True, static_groups=True)}

    def ours(matmul_dtype):
        hessian, hessian_time = timed(lambda: ours_hessian(calibration, matmul_dtype))
        row = {"hessian": hessian_time}
        for name, config in configs.items():
            qw, solve_time = timed(lambda: quantize_weight(weight, hessian, config))
            row[name] = {"solve": solve_time, "error": held_out_error(qw.dequantize())}
        return row, hessian

    def original():
        hessian, hessian_time = timed(lambda: original_hessian(calibration))
        row = {"hessian": hessian_time}
        for name, config in configs.items():
            (dequantized, _), solve_time = timed(lambda: original_fasterquant(
                weight, hessian, config.maxq, config.sym, config.block_size, config.damp_percent,
                config.group_size, config.desc_act, config.static_groups))
            row[name] = {"solve": solve_time, "error": held_out_error(dequantized)}
        return row, hessian

    results = {"layer": f"{size}x{size}", "calibration": f"{samples} samples x {tokens} tokens",
               "held_out_tokens": held_out.shape[0], "threads": torch.get_num_threads(),
               "torch": torch.__version__,
               "rtn_error": held_out_error(rtn(weight, base).dequantize())}
    results["ours"], hessian = ours(torch.float32)
    results["ours_bfloat16_hessian"], hessian_bf16 = ours(torch.bfloat16)
    results["original"], hessian_original = original()
    # The original normalises by the number of samples, not tokens: same H up to that factor.
    hessian_original /= tokens
    for key, h in (("ours", hessian), ("ours_bfloat16_hessian", hessian_bf16)):
        results[key]["hessian_relative_difference_to_original"] = float(
            (h - hessian_original).norm() / hessian_original.norm())
    for clock in ("wall_s", "cpu_s"):
        results[f"speedup_end_to_end_{clock}"] = {
            key: {name: round(_end_to_end(results["original"], name, clock)
                              / _end_to_end(results[key], name, clock), 2) for name in configs}
            for key in ("ours", "ours_bfloat16_hessian")}
    return results


def _end_to_end(row, name, clock):
    return row["hessian"][clock] + row[name]["solve"][clock]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="in = out features of the layer")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per calibration sample")
    parser.add_argument("--held-out-samples", type=int, default=8, help="held-out samples")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.size, args.samples, args.tokens, args.held_out_samples, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
