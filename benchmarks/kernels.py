"""Kernel benchmarks: what QuantLinear buys at inference time, and what packing costs.

(a) CPU decode: greedy generation (prompt 64, 64 new tokens) with a ~300M-parameter Llama-shaped
    model of random weights (hidden 1024, 18 layers, intermediate 2816, vocab 32000) in float32,
    against the same model with every decoder Linear swapped for a 4-bit g128 `QuantLinear`
    (round-to-nearest codes: speed does not depend on how the codes were found), and with the
    opt-in bfloat16 prefill cache.
(b) Packing throughput in GB/s of int32 codes: the torch reference on CPU (and, with
    `--device cuda`, on the GPU beside the Triton kernel).
(c) One Linear at several batch sizes on CPU: the int4 kernel against float weights, which is
    what decides whether caching a dequantized copy for prefill would pay.
(d) `--device cuda`: the fused Triton matmul against float16 `torch.matmul` at batch 1 and 16.

    python benchmarks/kernels.py            # everything that runs on this machine
    python benchmarks/kernels.py --quick    # 4 layers, 16 new tokens, smaller packing matrices
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from gptq_plugins.config import QuantizeConfig
from gptq_plugins.packing import dequantize_packed, pack_rows, unpack_rows
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


def quantize_decoder_linears(model, config: QuantizeConfig) -> int:
    """Swap every decoder-block Linear for a QuantLinear in place; returns how many."""
    swapped = 0
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in DECODER_LINEARS:
                linear = getattr(parent, name, None)
                if linear is None:
                    continue
                layer = QuantLinear.from_quantized(rtn(linear.weight.data, config), bias=linear.bias,
                                                   dtype=linear.weight.dtype)
                layer.post_init()
                setattr(parent, name, layer)
                swapped += 1
    return swapped


def decode_tokens_per_second(model, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))

    def generate(n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    with torch.inference_mode():
        prefill = best_seconds(lambda: model(ids), repeats)
        total = best_seconds(lambda: generate(new_tokens), repeats, warmup=lambda: generate(2))
    return {"batch": batch, "prefill_ms": prefill * 1e3, "generate_s": total,
            "tokens_per_s": batch * new_tokens / total}


def bench_decode(args) -> dict:
    model = build_model(args.layers)
    params = sum(p.numel() for p in model.parameters())

    def run_all():
        return [decode_tokens_per_second(model, b, args.prompt, args.new_tokens, args.repeats)
                for b in args.batch_sizes]

    runs = {"float32": run_all()}
    start = time.perf_counter()
    swapped = quantize_decoder_linears(model, QuantizeConfig(bits=4, group_size=128))
    convert_s = time.perf_counter() - start
    backends = sorted({m.backend.name for m in model.modules() if isinstance(m, QuantLinear)})
    runs["int4_g128"] = run_all()
    for module in model.modules():  # opt-in: bfloat16 copy of each weight for prompt-sized batches
        if isinstance(module, QuantLinear):
            module.post_init(backend="cpu_int4_prefill_cache")
    runs["int4_g128_prefill_cache"] = run_all()
    speedup = {name: {str(f["batch"]): q["tokens_per_s"] / f["tokens_per_s"]
                      for f, q in zip(runs["float32"], quantized)}
               for name, quantized in runs.items() if name != "float32"}
    return {"model": {"parameters": params, "layers": args.layers, "hidden": 1024,
                      "intermediate": 2816, "vocab": 32000},
            "prompt": args.prompt, "new_tokens": args.new_tokens, "quantized_linears": swapped,
            "quantize_and_convert_s": convert_s, "backends": backends, "runs": runs,
            "speedup_tokens_per_s": speedup}


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
def bench_cpu_linear(args) -> list[dict]:
    rows = []
    for out_features, in_features in ((2816, 1024), (1024, 2816)):
        qw = rtn(torch.randn(out_features, in_features) * 0.02, QuantizeConfig(bits=4, group_size=128))
        layer = QuantLinear.from_quantized(qw, dtype=torch.float32)
        layer.post_init()
        weight = dequantize_packed(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4)
        weight_bf16 = weight.bfloat16()
        for m in (1, 8, 64, 512):
            x = torch.randn(m, in_features)
            with torch.inference_mode():
                rows.append({"shape": [out_features, in_features], "m": m, "backend": layer.backend.name,
                             "int4_ms": best_seconds(lambda: layer(x), args.repeats) * 1e3,
                             "float32_ms": best_seconds(lambda: x @ weight.T, args.repeats) * 1e3,
                             "bfloat16_cached_ms": best_seconds(lambda: (x.bfloat16() @ weight_bf16.T).float(),
                                                                args.repeats) * 1e3})
    return rows


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
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
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
                           "threads": torch.get_num_threads()}, "args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_decode:
        results["cpu_decode"] = bench_decode(args)
    if not args.skip_packing:
        results["packing"] = bench_packing(args, "cpu") + (bench_packing(args, "cuda") if args.device == "cuda" else [])
    if not args.skip_linear:
        results["cpu_linear"] = bench_cpu_linear(args)
    if args.device == "cuda":
        results["cuda_matmul"] = bench_cuda_matmul(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
