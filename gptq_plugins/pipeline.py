"""Layer-by-layer GPTQ over a whole model: the public entry points and the artifact they write.

`quantize_model` writes an artifact, `quantize_modules` quantizes a model in memory; both run the
block loop of `run_loop`. Model knowledge comes only from a `ModelLayout`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gptq_plugins.block_sources import LoadedBlocks, block_source
from gptq_plugins.calibration import CalibrationSet
from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.layouts import ModelLayout
from gptq_plugins.model_loading import calibration_for, given_calibration, open_source
from gptq_plugins.packing import pack_quantized
from gptq_plugins.preparation import layout_for, prepare_blocks, resolve_run_options
from gptq_plugins.report import summarize
from gptq_plugins.run_loop import run_blocks
from gptq_plugins.solver import QuantizedWeight


def _report(config: QuantizeConfig, layout: ModelLayout, rows: list[dict], device: torch.device) -> dict:
    """The report: options (machine-dependent ones as they ran), where it ran, summary, per-layer rows."""
    from gptq_plugins.cpu_features import cpu_features

    machine = {"device": str(device), "cpu": cpu_features().as_dict()}
    return {"config": config.to_dict(), "layout": layout.name, "machine": machine, "summary": summarize(rows),
            "layers": rows}


def quantize_modules(model: torch.nn.Module, config: QuantizeConfig, calibration: CalibrationSet | torch.Tensor, *,
                     layout: ModelLayout | None = None, device: str | torch.device | None = None,
                     progress: bool = True, on_block_done=None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize every Linear the layout names of an in-memory model, in place.

    Weights become their dequantized values. Returns the solver results by module path and the
    report. `on_block_done(index, results)` is called after each block.
    """
    from gptq_plugins.streaming import ActivationStore

    layout, blocks = prepare_blocks(model, config, layout)
    device = torch.device(device) if device else next(model.parameters()).device
    config = resolve_run_options(config, device)
    results: dict[str, QuantizedWeight] = {}
    rows: list[dict] = []

    def done(index, block_results, block_rows, _next_hidden):
        results.update(block_results)
        rows.extend(block_rows)
        if on_block_done is not None:
            on_block_done(index, block_results)

    run_blocks(model, LoadedBlocks(blocks, device), layout, config, CalibrationSet.of(calibration).token_ids,
               ActivationStore(None, device=device),
               device=device, progress=progress, on_block_done=done)
    return results, _report(config, layout, rows, device)


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


def quantization_config_for(model, config: QuantizeConfig, calibration: CalibrationSet | torch.Tensor) -> dict:
    """The `quantization_config` block of the artifact of `model` quantized on `calibration`.

    `meta.calibration` says what was used: the windows' actual shape (capped at the context
    length) and source, not merely what the options asked for.
    """
    calibration = CalibrationSet.of(calibration)
    block = config.to_quantization_config(
        modules_not_to_convert=list(layout_for(model).keep_float),
        extra_meta={"calibration_tokens": int(calibration.token_ids.numel())})
    recorded = block["meta"]["calibration"]
    recorded.pop("seed")
    recorded.update(calibration.meta())
    return block


def quantized_paths(layout: ModelLayout, blocks: torch.nn.ModuleList) -> set[str]:
    """Module paths of every Linear the layout quantizes (after `prepare`)."""
    return {f"{layout.blocks}.{i}.{name}" for i, block in enumerate(blocks)
            for name in layout.block_linear_names(i, block)}


def quantize_model(model_or_path, out_dir: str | os.PathLike, config: QuantizeConfig,
                   calibration: CalibrationSet | torch.Tensor | None = None, *, device: str | None = None,
                   trust_remote_code: bool = False, overwrite: bool = False, progress: bool = True,
                   streaming: bool = True, offload_activations: bool = False, resume: bool = False) -> Path:
    """Quantize a model (a local directory or a loaded Transformers model) into an artifact at `out_dir`.

    A directory is streamed (`streaming=True`): only the current decoder block is in memory, read
    from the source safetensors. With `offload_activations` the hidden states between blocks live
    in a scratch file instead of memory. After every block the progress is checkpointed inside
    the partial output, so a killed run continues with `resume=True` and gives the same bytes.
    `calibration` is a LongTensor of token ids `[num_samples, seq_len]` (recorded in the artifact
    as `dataset: token_ids`) or a `CalibrationSet`; when None it is drawn from `config.dataset`
    with the model's tokenizer.
    """
    from gptq_plugins.artifact import ArtifactWriter
    from gptq_plugins.streaming import ActivationStore

    source = open_source(model_or_path, streaming=streaming, trust_remote_code=trust_remote_code)
    model, tokenizer, source_dir, checkpoint = source.model, source.tokenizer, source.directory, source.checkpoint
    layout, blocks = prepare_blocks(model, config)
    device = torch.device(device) if device else torch.device("cpu") if checkpoint else next(model.parameters()).device
    config = resolve_run_options(config, device)
    with ArtifactWriter(out_dir, source=source.origin(), overwrite=overwrite, resume=resume) as writer:
        state = writer.state
        if state is not None:
            if state["config"] != config.to_dict():
                raise ConfigError("resume", f"the interrupted run used other options: {state['config']}")
            ids = torch.from_numpy(np.load(writer.scratch / "calibration.npy", allow_pickle=False))
            calibration = CalibrationSet(ids, **state["calibration"])
        elif calibration is None:
            calibration = calibration_for(model, config, tokenizer)
        else:
            calibration = given_calibration(calibration, model)
        rows: list[dict] = state["rows"] if state else []
        store = ActivationStore(writer.scratch, offload=offload_activations, device=device)
        blocks_from = block_source(model, blocks, layout, checkpoint, device)
        if state is None:
            writer.scratch.mkdir(exist_ok=True)
            np.save(writer.scratch / "calibration.npy", calibration.token_ids.numpy(), allow_pickle=False)

        def checkpoint_block(index, block_results, block_rows, next_hidden):
            for path, result in block_results.items():
                writer.add(packed_tensors(layout.checkpoint_name(path), result, model.get_submodule(path).bias))
            rows.extend(block_rows)
            store.persist(index + 1, next_hidden)
            writer.checkpoint({"config": config.to_dict(), "next_block": index + 1, "rows": rows,
                               "calibration": {"dataset": calibration.dataset, "seed": calibration.seed}})

        run_blocks(model, blocks_from, layout, config, calibration.token_ids, store, device=device,
                   start=state["next_block"] if state else 0, progress=progress, on_block_done=checkpoint_block)
        quantized = quantized_paths(layout, blocks)
        if checkpoint is not None:
            quantized = {layout.checkpoint_name(path) for path in quantized}
            floats = checkpoint.tensors(name for name in checkpoint.weight_map
                                        if name.rsplit(".", 1)[0] not in quantized)
        else:
            floats = {layout.checkpoint_name(name): tensor for name, tensor in float_tensors(model, quantized).items()}
        writer.add(dict(sorted(floats.items())))
        model_config = model.config.to_dict()
        model_config.pop("quantization_config", None)
        return writer.finish(model_config=model_config,
                             quantization_config=quantization_config_for(model, config, calibration),
                             report=_report(config, layout, rows, device), copy_from=source_dir)
