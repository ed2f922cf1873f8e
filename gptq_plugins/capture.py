"""Forward passes over the calibration batches: what each decoder block receives, a block run on
its inputs, and the inputs of chosen Linears read with hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_plugins.finished_outputs import NO_REUSE
from gptq_plugins.heap import release_free_memory

CALIBRATION_BATCH = 8


class StopForward(Exception):
    """Raised by a hook once it has what it needs, so the rest of the forward is skipped."""


@dataclass
class BatchContext:
    """Everything a decoder block receives for one calibration batch except its hidden states."""

    rows: slice  # the batch's rows in the `[samples, seq, hidden]` activations
    args: tuple
    kwargs: dict


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
def capture_block_inputs(model: torch.nn.Module, blocks: torch.nn.ModuleList, calibration: torch.Tensor,
                         sink=None, batch_size: int = CALIBRATION_BATCH) -> list[list[BatchContext]]:
    """Run the model on each calibration batch with every decoder block replaced by a recorder.

    A recorder keeps what its block receives and passes the hidden states on unchanged, so each
    block gets its own context (Gemma 2/3 give sliding and full attention layers different masks
    and rotary tables) without running any block, and skeleton blocks need not be loaded.
    Returns `contexts[block][batch]`; block 0's hidden states go to `sink(rows, hidden)` (float32).
    """
    contexts: list[list[BatchContext]] = [[] for _ in blocks]
    rows = slice(0, 0)

    def recorder(index):
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            contexts[index].append(BatchContext(rows, rest, kwargs))
            if index == 0 and sink is not None:
                sink(rows, hidden.float())
            if index == len(blocks) - 1:
                raise StopForward
            return hidden
        return forward

    # An instance `forward` (accelerate's device hooks install one) is put back afterwards.
    own_forwards = [block.__dict__.get("forward") for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = recorder(index)
    device = model.get_input_embeddings().weight.device
    try:
        for start in range(0, calibration.shape[0], batch_size):
            rows = slice(start, min(start + batch_size, calibration.shape[0]))
            batch = calibration[rows].to(device)
            try:
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            except StopForward:
                pass
            for index, block_contexts in enumerate(contexts):
                if not block_contexts or block_contexts[-1].rows != rows:
                    raise RuntimeError(f"decoder block {index} of {type(model).__name__} was not reached "
                                       "during the calibration forward pass")
    finally:
        for block, own in zip(blocks, own_forwards):
            del block.forward
            if own is not None:
                block.forward = own
    return contexts


def run_block(block, hidden: torch.Tensor, context: BatchContext, dtype, device) -> torch.Tensor:
    """`block`'s output hidden states for one batch of `hidden` (that batch's rows only)."""
    out = block(hidden.to(device=device, dtype=dtype), *_move(context.args, device),
                **_move(context.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


def propagate(block, hidden, contexts, out: torch.Tensor, dtype, device, reuse=NO_REUSE) -> torch.Tensor:
    """`out` filled with `block`'s outputs for every calibration batch of `hidden`; with `reuse`
    (a `FinishedOutputs`), what finished parts of the block computed before is taken from it."""
    for batch, context in enumerate(contexts):
        with reuse.batch(batch, keep=False):
            out[context.rows] = run_block(block, hidden[context.rows], context, dtype, device).float().to(out.device)
    release_free_memory()
    return out


def linear_inputs(block, names, hidden, context: BatchContext, dtype, device) -> dict[str, torch.Tensor]:
    """The inputs of `block`'s Linears `names` when it runs one batch of `hidden`; the forward
    stops once all have run."""
    inputs: dict[str, torch.Tensor] = {}

    def keep(name, x):
        inputs[name] = x
        if len(inputs) == len(names):
            raise StopForward

    handles = [block.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: keep(name, args[0]))
               for name in names]
    try:
        run_block(block, hidden[context.rows], context, dtype, device)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs
