"""Layer-by-layer GPTQ over a whole model: the public entry points.

`quantize_model` writes an artifact, `quantize_modules` quantizes a model in memory; both run the
block loop of `run_loop`. Model knowledge comes only from a `ModelLayout`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gptq_plugins.artifact import ArtifactWriter
from gptq_plugins.block_sources import LoadedBlocks, block_source
from gptq_plugins.calibration import CalibrationSet
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.layouts import ModelLayout
from gptq_plugins.model_loading import calibration_for, given_calibration, open_source
from gptq_plugins.plugins import export_format
from gptq_plugins.preparation import prepare_blocks, resolve_run_options
from gptq_plugins.report import run_report
from gptq_plugins.run_loop import run_blocks
from gptq_plugins.solver import QuantizedWeight
from gptq_plugins.streaming import ActivationStore


def quantize_modules(model: torch.nn.Module, config: QuantizeConfig, calibration: CalibrationSet | torch.Tensor, *,
                     layout: ModelLayout | None = None, device: str | torch.device | None = None,
                     progress: bool = True, on_block_done=None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize every Linear the layout names of an in-memory model, in place.

    Weights become their dequantized values. Returns the solver results by module path and the
    report. `on_block_done(index, results)` is called after each block.
    """
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
    return results, run_report(config, layout, rows, device)


def quantize_model(model_or_path, out_dir: str | os.PathLike, config: QuantizeConfig,
                   calibration: CalibrationSet | torch.Tensor | None = None, *, device: str | None = None,
                   trust_remote_code: bool = False, overwrite: bool = False, progress: bool = True,
                   streaming: bool = True, offload_activations: bool = False, resume: bool = False) -> Path:
    """Quantize a model (a local directory or a loaded Transformers model) into an artifact at `out_dir`
    (a directory, or one file for a single-file format such as `gguf`).

    A directory is streamed (`streaming=True`): only the current decoder block is in memory, read
    from the source safetensors. With `offload_activations` the hidden states between blocks live
    in a scratch file instead of memory. After every block the progress is checkpointed inside
    the partial output, so a killed run continues with `resume=True` and gives the same bytes.
    `calibration` is a LongTensor of token ids `[num_samples, seq_len]` (recorded in the artifact
    as `dataset: token_ids`) or a `CalibrationSet`; when None it is drawn from `config.dataset`
    with the model's tokenizer.
    """
    source = open_source(model_or_path, streaming=streaming, trust_remote_code=trust_remote_code)
    model = source.model
    layout, blocks = prepare_blocks(model, config)
    device = (torch.device(device) if device else torch.device("cpu") if source.checkpoint
              else next(model.parameters()).device)
    config = resolve_run_options(config, device)
    output_format = export_format(config.format)
    with ArtifactWriter(out_dir, source=source.origin(), overwrite=overwrite, resume=resume,
                        file_output=output_format.single_file) as writer:
        assembly = output_format.assembly_class()(writer, model, layout, config, progress=progress)
        resumed = assembly.resumed_calibration()
        if resumed is not None:
            calibration = resumed
        elif calibration is None:
            calibration = calibration_for(model, config, source.tokenizer)
        else:
            calibration = given_calibration(calibration, model)
        store = ActivationStore(writer.scratch, offload=offload_activations, device=device)
        blocks_from = block_source(model, blocks, layout, source.checkpoint, device)
        assembly.begin(calibration, store)
        run_blocks(model, blocks_from, layout, config, calibration.token_ids, store, device=device,
                   start=assembly.next_block, progress=progress, on_block_done=assembly.add_block)
        return assembly.finish(source, blocks, device)
