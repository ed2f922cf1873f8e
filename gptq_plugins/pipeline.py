"""Layer-by-layer GPTQ over a whole model, as in the paper.

Capture the inputs of the first decoder block; then, block after block, collect each Linear's
Hessian with forward hooks, quantize the Linears group by group (true-sequential), and feed the
quantized block's outputs to the next block. Model knowledge comes only from a `ModelLayout`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gptq_plugins.config import QuantizeConfig
from gptq_plugins.hessian import HessianAccumulator
from gptq_plugins.layouts import ModelLayout, UnsupportedModelError, find_layout
from gptq_plugins.packing import pack_quantized
from gptq_plugins.report import summarize
from gptq_plugins.solver import QuantizedWeight, quantize_weight, rtn

log = logging.getLogger("gptq_plugins")
CALIBRATION_BATCH = 8


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class BlockInputs:
    """Inputs of one decoder block for one calibration batch: hidden states plus the rest."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def layout_for(model: torch.nn.Module) -> ModelLayout:
    from gptq_plugins.plugins import model_layouts

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config.model_type")
    return find_layout(model_type, model_layouts())


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T)."""
    delta = (weight - approx).float()
    num = torch.einsum("oi,ij,oj->", delta, hessian, delta)
    den = torch.einsum("oi,ij,oj->", weight.float(), hessian, weight.float())
    return float(num / den) if den > 0 else float(num)


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(model: torch.nn.Module, first_block: torch.nn.Module,
                         calibration: torch.Tensor, batch_size: int = CALIBRATION_BATCH) -> list[BlockInputs]:
    """Run the model up to its first decoder block on each calibration batch and keep the inputs."""
    captured: list[BlockInputs] = []

    def hook(_module, args, kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        captured.append(BlockInputs(hidden.float(), rest, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(first_block.parameters()).device
    try:
        for batch in calibration.split(batch_size):
            try:
                model(input_ids=batch.to(device), attention_mask=torch.ones_like(batch, device=device),
                      use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(calibration.split(batch_size)):
        raise RuntimeError(f"the first decoder block of {type(model).__name__} was not reached "
                           "during the calibration forward pass")
    return captured


def _run_block(block, inputs: BlockInputs, dtype, device) -> torch.Tensor:
    out = block(inputs.hidden.to(device=device, dtype=dtype), *_move(inputs.args, device),
                **_move(inputs.kwargs, device))
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.float().to(inputs.hidden.device)


def _collect_hessians(block, linears: dict[str, torch.nn.Linear], inputs, dtype, device):
    """Forward every calibration batch through `block`, accumulating each Linear's Hessian."""
    accumulators = {name: HessianAccumulator(layer.in_features, device=device) for name, layer in linears.items()}
    handles = [layer.register_forward_hook(lambda _m, args, _out, acc=accumulators[name]: acc.add(args[0]))
               for name, layer in linears.items()]
    try:
        for batch in inputs:
            _run_block(block, batch, dtype, device)
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


@torch.no_grad()
def quantize_modules(model: torch.nn.Module, config: QuantizeConfig, calibration: torch.Tensor, *,
                     layout: ModelLayout | None = None, device: str | torch.device | None = None,
                     progress: bool = True, on_block_done=None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize every Linear the layout names, in place (weights become their dequantized values).

    Returns the solver results by module path and the report. `on_block_done(index, results)` is
    called after each block with that block's results (the CLI streams them to the artifact).
    """
    from gptq_plugins.plugins import get_plugin_manager

    hook = get_plugin_manager().hook
    layout = layout or layout_for(model)
    blocks = layout.block_list(model)
    device = torch.device(device) if device else next(model.parameters()).device
    dtype = next(blocks[0].parameters()).dtype
    check_layers(blocks, layout, config)
    inputs = capture_block_inputs(model, blocks[0], calibration)
    results: dict[str, QuantizedWeight] = {}
    rows: list[dict] = []
    bar = tqdm(total=len(blocks) * len(layout.linear_names()), desc="quantizing", unit="layer",
               disable=not progress)
    for index, block in enumerate(blocks):
        block_start = time.perf_counter()
        home = next(block.parameters()).device
        block.to(device)
        block_results: dict[str, QuantizedWeight] = {}
        groups = layout.sequential if config.true_sequential else (tuple(layout.linear_names()),)
        for group in groups:
            linears = {name: block.get_submodule(name) for name in group}
            accumulators = _collect_hessians(block, linears, inputs, dtype, device)
            for name, layer in linears.items():
                start = time.perf_counter()
                path = f"{layout.blocks}.{index}.{name}"
                acc = accumulators[name]
                if acc.num_tokens == 0:
                    raise RuntimeError(f"{path}: received no calibration tokens")
                hessian = acc.hessian()
                weight = layer.weight.data.float()
                result = quantize_weight(weight, hessian, config)
                approx = result.dequantize()
                row = {
                    "name": path,
                    "shape": list(weight.shape),
                    "relative_error": relative_error(weight, approx, hessian),
                    "rtn_relative_error": relative_error(weight, rtn(weight, config).dequantize(), hessian),
                    "damp_percent": result.damp_percent,
                    "damping_escalated": result.damp_percent > config.damp_percent,
                    "fallback": result.fallback,
                    "tokens": acc.num_tokens,
                    "seconds": round(time.perf_counter() - start, 4),
                }
                if result.fallback:
                    log.warning("%s: %s", path, result.fallback)
                layer.weight.data = approx.to(layer.weight.dtype)
                block_results[path] = result
                rows.append(row)
                hook.gptq_plugins_layer_quantized(name=path, result=result, record=row)
                bar.update()
        inputs = [BlockInputs(_run_block(block, batch, dtype, device), batch.args, batch.kwargs) for batch in inputs]
        block.to(home)
        results.update(block_results)
        if progress:
            summary = summarize(rows[-len(block_results):])
            bar.write(f"block {index + 1}/{len(blocks)}: {summary['layers']} layers, mean relative error "
                      f"{summary['mean_relative_error']:.5f} (RTN {summary['mean_rtn_relative_error']:.5f}), "
                      f"{time.perf_counter() - block_start:.1f} s")
        if on_block_done is not None:
            on_block_done(index, block_results)
    bar.close()
    report = {"config": config.to_dict(), "layout": layout.name, "summary": summarize(rows), "layers": rows}
    return results, report


def check_layers(blocks, layout: ModelLayout, config: QuantizeConfig) -> None:
    """Fail before any heavy work if a Linear is missing or cannot be stored with these options."""
    for index, block in enumerate(blocks):
        for name in layout.linear_names():
            path = f"{layout.blocks}.{index}.{name}"
            try:
                layer = block.get_submodule(name)
            except AttributeError:
                raise UnsupportedModelError(f"layout {layout.name!r}: {path} does not exist") from None
            if not isinstance(layer, torch.nn.Linear):
                raise UnsupportedModelError(f"layout {layout.name!r}: {path} is a {type(layer).__name__}, "
                                            "expected torch.nn.Linear")
            config.check_layer(layer.in_features, layer.out_features, name=path)


def packed_tensors(path: str, result: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The artifact tensors of one quantized Linear, under its module path."""
    tensors = {f"{path}.{key}": value for key, value in pack_quantized(result).items()}
    if bias is not None:
        tensors[f"{path}.bias"] = bias.detach()
    return tensors


def float_tensors(model: torch.nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer not replaced by quantized tensors, tied ones once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized:
            continue
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def load_model(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The float model and its tokenizer (None when the directory has none) from a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def quantize_model(model_or_path, out_dir: str | os.PathLike, config: QuantizeConfig,
                   calibration: torch.Tensor | None = None, *, device: str | None = None,
                   trust_remote_code: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Quantize a model (a local directory or a loaded Transformers model) into an artifact at `out_dir`.

    `calibration` is a LongTensor of token ids `[num_samples, seq_len]`; when None it is drawn
    from `config.dataset` with the model's tokenizer.
    """
    from gptq_plugins.artifact import ArtifactWriter
    from gptq_plugins.calibration import load_calibration

    source_dir = None
    if isinstance(model_or_path, (str, os.PathLike)):
        source_dir = Path(model_or_path)
        model, tokenizer = load_model(source_dir, trust_remote_code=trust_remote_code)
    else:
        model, tokenizer = model_or_path, None
    layout = layout_for(model)
    check_layers(layout.block_list(model), layout, config)
    if calibration is None:
        seq_len = config.seq_len
        limit = context_length(model)
        if limit and seq_len > limit:
            log.warning("seq_len %d exceeds the model's context length %d: using %d", seq_len, limit, limit)
            seq_len = limit
        calibration = load_calibration(config, tokenizer, seq_len)
    with ArtifactWriter(out_dir, overwrite=overwrite) as writer:
        def write_block(_index, block_results):
            for path, result in block_results.items():
                writer.add(packed_tensors(path, result, model.get_submodule(path).bias))

        results, report = quantize_modules(model, config, calibration, layout=layout, device=device,
                                           progress=progress, on_block_done=write_block)
        writer.add(float_tensors(model, set(results)))
        model_config = model.config.to_dict()
        model_config.pop("quantization_config", None)
        quantization_config = config.to_quantization_config(
            modules_not_to_convert=list(layout.keep_float),
            extra_meta={"calibration_tokens": int(calibration.numel())})
        return writer.finish(model_config=model_config, quantization_config=quantization_config,
                             report=report, copy_from=source_dir)
