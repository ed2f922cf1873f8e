"""Layer-by-layer GPTQ over a whole model: the public entry points.

`quantize_model` writes an artifact, `quantize_modules` quantizes a model in memory; both run the
block loop of `run_loop`. Model knowledge comes only from a `ModelLayout`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from gptq_plugins.artifact import ArtifactWriter, partial_dir
from gptq_plugins.assembly import ArtifactAssembly, RankShare
from gptq_plugins.block_sources import LoadedBlocks, block_source
from gptq_plugins.calibration import CalibrationSet
from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.distributed import DistributedError, options_digest, process_ranks
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

    Called on every rank of an initialised torch.distributed group (e.g. under `torchrun`), the
    ranks share the work (see `gptq_plugins.distributed`): rank 0 draws the calibration and writes
    the artifact, every rank must be given the same arguments, and the output must be on a
    filesystem all ranks see (each keeps its hidden states in the partial output's scratch).
    """
    ranks = process_ranks()
    ranks.check_same("options", options_digest({
        "model": str(Path(model_or_path).resolve()) if isinstance(model_or_path, (str, os.PathLike))
        else type(model_or_path).__name__, "out_dir": str(Path(out_dir).resolve()), "config": config.to_dict(),
        "device": device, "overwrite": overwrite, "streaming": streaming,
        "offload_activations": offload_activations, "resume": resume}))
    source = open_source(model_or_path, streaming=streaming, trust_remote_code=trust_remote_code)
    model = source.model
    layout, blocks = prepare_blocks(model, config)
    device = (torch.device(device) if device else torch.device("cpu") if source.checkpoint
              else next(model.parameters()).device)
    config = resolve_run_options(config, device)
    output_format = export_format(config.format)
    assembly_class = output_format.assembly_class()
    if ranks.world_size > 1 and assembly_class is not ArtifactAssembly:
        raise ConfigError("format", f"{config.format!r} is written by one process only; with several ranks "
                          "use gptq_plugins or gptq")
    with contextlib.ExitStack() as stack:
        failure, assembly, calibration_ids = None, None, None
        try:
            if ranks.is_writer:
                writer = stack.enter_context(ArtifactWriter(out_dir, source=source.origin(), overwrite=overwrite,
                                                            resume=resume, file_output=output_format.single_file))
                assembly = assembly_class(writer, model, layout, config, progress=progress,
                                          **({"ranks": ranks} if ranks.world_size > 1 else {}))
                resumed = assembly.resumed_calibration()
                if resumed is not None:
                    calibration = resumed
                elif calibration is None:
                    calibration = calibration_for(model, config, source.tokenizer)
                else:
                    calibration = given_calibration(calibration, model)
                calibration_ids = calibration.token_ids
        except Exception as err:  # raised on every rank, so none waits for the others
            failure = err
        ranks.agree(failure)
        shared, started = ranks.share(0, {"calibration": calibration_ids}, {"next_block": assembly.next_block}
                                      if ranks.is_writer else None)
        partial = partial_dir(Path(out_dir).resolve())
        ranks.agree(None if partial.is_dir() else DistributedError(
            f"cannot see {partial}, which rank 0 created: the output must be on a filesystem every rank shares"))
        if not ranks.is_writer:
            assembly = RankShare(ranks, Path(out_dir).resolve(), started["next_block"])
        store = ActivationStore(ranks.scratch_in(partial / "scratch"), offload=offload_activations, device=device)
        blocks_from = block_source(model, blocks, layout, source.checkpoint, device)
        assembly.begin(calibration, store)
        run_blocks(model, blocks_from, layout, config, shared["calibration"], store, device=device,
                   start=assembly.next_block, progress=progress, on_block_done=assembly.add_block, ranks=ranks)
        failure = path = None
        try:
            path = assembly.finish(source, blocks, device)
        except Exception as err:
            failure = err
        ranks.agree(failure)
        return path
