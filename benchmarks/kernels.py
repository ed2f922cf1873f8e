"""Kernel benchmarks: what QuantLinear buys at inference time, and what packing costs.

(a) CPU decode: greedy generation (prompt 64, 32 new tokens, batch 1 and 32) with a
    ~300M-parameter Llama-shaped model of random weights (hidden 1024, 18 layers, intermediate
    2816, vocab 32000) in float32 and in bfloat16, against the float32 model with every decoder
    Linear swapped for a 2/3/4/8-bit g128 `QuantLinear` (round-to-nearest codes: speed does not
    depend on how the codes were found; backend `auto`). The decoder Linears' memory is measured
    twice: the bytes of the storages they hold (checkpoint buffers and kernel state), and the
    float32 Linears' bytes plus how much converting changed the process's RSS.
(b) Packing throughput in GB/s of int32 codes: the torch reference on CPU (and, with
    `--device cuda`, on the GPU beside the Triton kernel).
(c) One Linear at growing batches on CPU: the int4 op (4-bit; nibble pairs for 8-bit) against
    tile-wise dequantization + bfloat16 GEMM and float weights: the crossover `cpu_dispatch` uses.
    Every timing records the load average: another job on a small machine shows there.
(d) `--device cuda`: the fused Triton matmul against float16 `torch.matmul` at batch 1 and 16.
(e) The CPU's roofline: memory read bandwidth and float32/bfloat16 GEMM throughput.

    python benchmarks/kernels.py            # everything that runs on this machine
    python benchmarks/kernels.py --quick    # 4 layers, 16 new tokens, smaller packing matrices
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/kernels.py --skip-decode --skip-packing \
        --out benchmarks/results/kernels-avx2.json    # the AVX2 crossover, on an AVX-512 machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from gptq_plugins.config import QuantizeConfig
from gptq_plugins.cpu_features import cpu_features
from gptq_plugins.kernels.cpu_dispatch import tiled_from_rows
from gptq_plugins.kernels.cpu_int4 import convert_to_int4pack, int4pack_matmul
from gptq_plugins.kernels.cpu_int8 import convert_to_nibble_pairs, nibble_pairs_matmul
from gptq_plugins.kernels.tiled_dequant import tiled_dequant_matmul
from gptq_plugins.packing import dequantize_packed, pack_quantized, pack_rows, unpack_rows
from gptq_plugins.quant_linear import QuantLinear
from gptq_plugins.solver import rtn

RESULTS = Path(__file__).parent / "results" / "kernels.json"
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def best_seconds(fn, repeats: int, sync=lambda: None, warmup=None) -> float:
    """Fastest of `repeats` timed calls after a warm-up (`fn` itself unless given): the run
    least disturbed by other load on a shared machine."""
    (warmup or fn)()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


# --------------------------------------------------------------------------------- (a) decode
def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def decoder_linears(model):
    """(parent, name, layer) of every decoder-block Linear (or its QuantLinear)."""
    return [(parent, name, getattr(parent, name)) for block in model.model.layers
            for parent in (block.self_attn, block.mlp) for name in DECODER_LINEARS
            if getattr(parent, name, None) is not None]


def quantize_decoder_linears(model, config: QuantizeConfig) -> int:
    """Swap every decoder-block Linear for a QuantLinear in place; returns how many."""
    linears = decoder_linears(model)
    for parent, name, linear in linears:
        layer = QuantLinear.from_quantized(rtn(linear.weight.data, config), bias=linear.bias,
                                           dtype=linear.weight.dtype)
        layer.post_init()
        setattr(parent, name, layer)
    return len(linears)


def tensors_in(value):
    """Every tensor in a kernel state (a tensor, a dataclass, a tuple of those)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif hasattr(value, "__dataclass_fields__"):
        for field in value.__dataclass_fields__:
            yield from tensors_in(getattr(value, field))


def weight_bytes(model) -> int:
    """Bytes of the storages the decoder Linears hold: parameters, buffers and kernel state."""
    storages = {}
    for _, _, layer in decoder_linears(model):
        held = [*layer.parameters(), *layer.buffers(), *tensors_in(getattr(layer, "kernel_state", None))]
        for t in held:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def resident_bytes() -> int:
    """This process's RSS (Linux) after returning freed memory to the OS (glibc's malloc_trim)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def decode_tokens_per_second(model, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))

    def generate(n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    with torch.inference_mode():
        prefill = best_seconds(lambda: model(ids), repeats)
        total = best_seconds(lambda: generate(new_tokens), repeats, warmup=lambda: generate(2))
    # generate() runs the prefill, which gives the first token, then new_tokens - 1 decode steps
    return {"batch": batch, "prefill_ms": prefill * 1e3, "generate_s": total,
            "tokens_per_s": batch * new_tokens / total,
            "decode_tokens_per_s": batch * (new_tokens - 1) / (total - prefill),
            "load_average_1min": os.getloadavg()[0]}


def bench_decode(args) -> dict:
    """float32, bfloat16 and each bit width (g128, backend `auto`), one fresh model each."""
    runs, memory, backends, quantized = {}, {}, {}, 0
    float_bytes = None
    for name in ("float32", "bfloat16", *(f"int{bits}_g128" for bits in args.bits)):
        model = build_model(args.layers)
        params = sum(p.numel() for p in model.parameters())
        before = resident_bytes()
        if name == "bfloat16":
            model.to(torch.bfloat16)
        elif name != "float32":
            quantized = quantize_decoder_linears(model, QuantizeConfig(bits=int(name[3]), group_size=128))
            backends[name] = sorted({m.backend.name for m in model.modules() if isinstance(m, QuantLinear)})
        held = weight_bytes(model)
        float_bytes = float_bytes or held
        memory[name] = {"tensor_bytes": held, "tensor_vs_float32": held / float_bytes,
                        # the float32 Linears' bytes plus what converting changed the RSS by
                        "rss_bytes": float_bytes + resident_bytes() - before}
        memory[name]["rss_vs_float32"] = memory[name]["rss_bytes"] / float_bytes
        runs[name] = [decode_tokens_per_second(model, b, args.prompt, args.new_tokens, args.repeats)
                      for b in args.batch_sizes]
        print(name, memory[name], runs[name], flush=True)
        del model
    speedup = {name: {str(f["batch"]): {"generate": q["tokens_per_s"] / f["tokens_per_s"],
                                        "decode": q["decode_tokens_per_s"] / f["decode_tokens_per_s"]}
                      for f, q in zip(runs["float32"], rows)}
               for name, rows in runs.items() if name != "float32"}
    return {"model": {"parameters": params, "layers": args.layers, "hidden": 1024,
                      "intermediate": 2816, "vocab": 32000},
            "prompt": args.prompt, "new_tokens": args.new_tokens,
            "quantized_linears": quantized,
            "backends": backends, "runs": runs, "speedup_tokens_per_s": speedup,
            "decoder_linear_memory": memory}


# --------------------------------------------------------------------------------- (b) packing
def bench_packing(args, device: str) -> list[dict]:
    rows = []
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 1 << bits, (args.pack_size, args.pack_size), dtype=torch.int32, device=device)
        gigabytes = codes.numel() * codes.element_size() / 1e9
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        packed = pack_rows(codes, bits)
        timings = {
            "torch_pack": best_seconds(lambda: pack_rows(codes, bits), args.repeats, sync),
            "torch_unpack": best_seconds(lambda: unpack_rows(packed, bits, args.pack_size), args.repeats, sync),
        }
        if device == "cuda":
            from gptq_plugins.kernels.triton_layout import pack_rows_triton

            timings["triton_pack"] = best_seconds(lambda: pack_rows_triton(codes, bits), args.repeats, sync)
        rows.append({"device": device, "bits": bits, "shape": list(codes.shape),
                     **{f"{k}_gb_per_s": gigabytes / v for k, v in timings.items()}})
    return rows


# --------------------------------------------------------------------------------- (c) one Linear
CROSSOVER_ROWS = (1, 8, 16, 24, 32, 48, 64, 96, 128, 256)


def bench_cpu_linear(args) -> dict:
    """The op path and the tiled path of one Linear at growing batches, against float weights:
    the first batch from which tiled wins on both shapes is `cpu_dispatch`'s crossover."""
    rows, crossover = [], {}
    for bits in (4, 8):
        wins_from = []
        for out_features, in_features in ((2816, 1024), (1024, 2816)):
            qw = rtn(torch.randn(out_features, in_features) * 0.02, QuantizeConfig(bits=bits, group_size=128))
            packed = {name: t for name, t in pack_quantized(qw).items()}
            if bits == 8:
                op_weight, op, halves = convert_to_nibble_pairs(**packed), nibble_pairs_matmul, 2
            else:
                op_weight, op, halves = convert_to_int4pack(**packed, bits=bits), int4pack_matmul, 1
            weight = dequantize_packed(**packed, bits=bits)
            weight_bf16 = weight.bfloat16()
            first_win = None
            for m in CROSSOVER_ROWS:
                x = torch.randn(m, in_features)
                with torch.inference_mode():
                    row = {"bits": bits, "shape": [out_features, in_features], "m": m,
                           "op_ms": best_seconds(lambda: op(x, op_weight), args.repeats) * 1e3,
                           "tiled_ms": best_seconds(lambda: tiled_dequant_matmul(x, op_weight, halves=halves),
                                                    args.repeats) * 1e3,
                           "float32_ms": best_seconds(lambda: x @ weight.T, args.repeats) * 1e3,
                           "bfloat16_cached_ms": best_seconds(lambda: (x.bfloat16() @ weight_bf16.T).float(),
                                                              args.repeats) * 1e3,
                           "load_average_1min": os.getloadavg()[0]}
                rows.append(row)
                if row["tiled_ms"] >= row["op_ms"]:
                    first_win = None
                elif first_win is None:
                    first_win = m
            wins_from.append(first_win)
        crossover[f"{bits}-bit"] = None if None in wins_from else max(wins_from)
    return {"rows": rows, "tiled_wins_from_rows": crossover,
            "in_use": {"4-bit": tiled_from_rows(1), "8-bit": tiled_from_rows(2)}}


# --------------------------------------------------------------------------------- (e) CPU roofline
def bench_roofline(args) -> dict:
    """What this CPU can do at best, on all threads: memory read bandwidth (a sum over 1 GiB, far
    beyond the caches) and GEMM throughput (2048^3 in float32 and in bfloat16)."""
    big = torch.ones(1 << 28)  # 1 GiB of float32
    read_s = best_seconds(lambda: big.sum(), args.repeats)
    del big
    gemm = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        gemm[str(dtype).removeprefix("torch.")] = 2 * 2048 ** 3 / best_seconds(lambda: a @ b, args.repeats) / 1e9
    return {"read_gb_per_s": (1 << 30) / read_s / 1e9, "gemm_gflop_per_s": gemm}


# --------------------------------------------------------------------------------- (d) CUDA matmul
def bench_cuda_matmul(args) -> list[dict]:
    from triton.testing import do_bench

    from gptq_plugins.kernels.triton_matmul import fused_matmul

    rows = []
    for in_features, out_features in ((4096, 4096), (4096, 14336)):
        qw = rtn(torch.randn(out_features, in_features, device="cuda") * 0.02,
                 QuantizeConfig(bits=4, group_size=128))
        layer = QuantLinear.from_quantized(qw, dtype=torch.float16)
        weight = layer.dequantize().half()
        for m in (1, 16):
            x = torch.randn(m, in_features, device="cuda", dtype=torch.float16)
            packed = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4)
            rows.append({"shape": [out_features, in_features], "m": m,
                         "triton_fused_ms": do_bench(lambda: fused_matmul(x, *packed)),
                         "torch_fp16_ms": do_bench(lambda: torch.matmul(x, weight.T))})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda adds Triton packing and the fused matmul (needs a GPU)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-packing", action="store_true")
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--layers", type=int, default=18, help="decoder layers (18: ~300M parameters)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--pack-size", type=int, default=4096, help="side of the packed code matrix")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (1 is steadier on an oversubscribed machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.new_tokens, args.pack_size, args.repeats = 4, 16, 1024, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    torch.set_num_threads(args.threads)

    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "cpu": cpu_features().as_dict(),
                           "cores": os.cpu_count(), "load_average_at_start": os.getloadavg()},
               "args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_decode:
        results["cpu_decode"] = bench_decode(args)
    if not args.skip_packing:
        results["packing"] = bench_packing(args, "cpu") + (bench_packing(args, "cuda") if args.device == "cuda" else [])
    if not args.skip_linear:
        results["cpu_linear"] = bench_cpu_linear(args)
    results["cpu_roofline"] = bench_roofline(args)
    if args.device == "cuda":
        results["cuda_matmul"] = bench_cuda_matmul(args)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
