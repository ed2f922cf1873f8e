"""The loop over decoder blocks, as in the GPTQ paper: capture what every block receives, then
quantize block after block, each fed the previous quantized block's outputs; a run resumes at any
block boundary from the hidden states stored there."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from gptq_plugins.block_quantization import quantize_block
from gptq_plugins.capture import CALIBRATION_BATCH, capture_block_inputs, propagate
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.distributed import SINGLE
from gptq_plugins.finished_outputs import NO_REUSE, FinishedOutputs
from gptq_plugins.gptaq import reference_for
from gptq_plugins.layouts import ModelLayout
from gptq_plugins.plugins import get_plugin_manager
from gptq_plugins.report import summarize


@torch.no_grad()
def run_blocks(model, source, layout: ModelLayout, config: QuantizeConfig, calibration: torch.Tensor,
               store, *, device, start: int = 0, progress: bool = True, on_block_done=None, ranks=SINGLE) -> None:
    """Quantize blocks `start..` of `source` in order, each fed the previous quantized block's outputs.

    With several `ranks` each runs only its own share of the `calibration` samples (and keeps only
    their hidden states); the writer rank shows the progress.

    The inputs of block `start` are `store.load(start)` when resuming (start > 0), else captured by
    running the model's embeddings. `on_block_done(index, results, rows, next_hidden)` is called
    while the block is still loaded (biases readable).
    """
    hook = get_plugin_manager().hook
    hidden = None
    calibration = calibration[ranks.samples(calibration.shape[0], CALIBRATION_BATCH)]
    progress = progress and ranks.is_writer

    def keep(rows, batch_hidden):
        nonlocal hidden
        if hidden is None:
            hidden = store.new(0, (calibration.shape[0], *batch_hidden.shape[1:]))
        hidden[rows] = batch_hidden.to(hidden.device)

    blocks = layout.block_list(model)
    contexts = capture_block_inputs(model, blocks, calibration, sink=None if start else keep)
    if start:
        hidden = store.load(start)
    reference = reference_for(config, store, start, hidden, device)
    per_block = [len(layout.block_linear_names(index, block)) for index, block in enumerate(blocks)]
    bar = tqdm(total=sum(per_block), initial=sum(per_block[:start]), desc="quantizing", unit="layer",
               disable=not progress)
    try:
        for index in range(start, len(source)):
            block_start = time.perf_counter()
            block = source.load(index)
            dtype = next(block.parameters()).dtype
            followed = reference.follow(block)
            reuse = (FinishedOutputs(block, layout.block_linear_names(index, block))
                     if config.true_sequential and not store.offload else NO_REUSE)
            with reuse.installed():
                results, rows = quantize_block(block, index, hidden, contexts[index], config, layout, device, hook,
                                               reference=followed, n_blocks=len(source), ranks=ranks, reuse=reuse)
                bar.update(len(rows))
                out = propagate(block, hidden, contexts[index], store.new(index + 1, hidden.shape), dtype, device,
                                reuse)
            reference.advance(index, followed, contexts[index])
            del followed  # GPTAQ's float copy of the block
            if on_block_done is not None:
                on_block_done(index, results, rows, out)
            source.release(index, block)
            store.drop(index)
            hidden = out
            if progress:
                summary = summarize(rows)
                bar.write(f"block {index + 1}/{len(source)}: {summary['layers']} layers, mean relative error "
                          f"{summary['mean_relative_error']:.5f} (RTN {summary['mean_rtn_relative_error']:.5f}), "
                          f"{time.perf_counter() - block_start:.1f} s")
    finally:
        bar.close()
