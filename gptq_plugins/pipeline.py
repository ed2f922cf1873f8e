"""Layer-by-layer GPTQ over a whole model, as in the paper.

Capture what every decoder block receives (block 0's hidden states, each block's other
arguments); then, block after block, collect each Linear's Hessian with forward hooks, quantize
the Linears group by group (true-sequential), and feed the quantized block's outputs to the next
block. Model knowledge comes only from a `ModelLayout`.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gptq_plugins.calibration import CalibrationError, CalibrationSet
from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.hessian import AsymmetryAccumulator, HessianAccumulator
from gptq_plugins.layouts import ModelLayout
from gptq_plugins.linear_weights import features, read_weight, write_weight
from gptq_plugins.model_loading import calibration_for, given_calibration, open_source
from gptq_plugins.packing import pack_quantized
from gptq_plugins.preparation import layout_for, prepare_blocks, resolve_run_options
from gptq_plugins.report import summarize
from gptq_plugins.solver import QuantizedWeight, quantize_weight, rtn

log = logging.getLogger("gptq_plugins")
CALIBRATION_BATCH = 8
# An expert calibrated on fewer routed tokens than this fraction of its input width gets
# round-to-nearest: its Hessian spans too few directions for GPTQ's updates to generalise.
MIN_EXPERT_TOKENS_PER_INPUT = 0.1


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class BatchContext:
    """Everything a decoder block receives for one calibration batch except its hidden states."""

    rows: slice  # the batch's rows in the `[samples, seq, hidden]` activations
    args: tuple
    kwargs: dict


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T)."""
    delta, weight = (weight - approx).float(), weight.float()
    num = ((delta @ hessian) * delta).sum()
    den = ((weight @ hessian) * weight).sum()
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
                raise _StopForward
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
            except _StopForward:
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


def _run_block(block, hidden: torch.Tensor, context: BatchContext, dtype, device) -> torch.Tensor:
    out = block(hidden.to(device=device, dtype=dtype), *_move(context.args, device),
                **_move(context.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class InputStatistics:
    """What the solver needs of one Linear's calibration inputs."""

    hessian: HessianAccumulator
    asymmetry: AsymmetryAccumulator | None  # GPTAQ only


def _float_inputs(reference, names, context: BatchContext, dtype, device) -> dict[str, torch.Tensor]:
    """The inputs of Linears `names` when the float block `reference = (block, hidden)` runs the batch."""
    block, hidden = reference
    inputs: dict[str, torch.Tensor] = {}

    def keep(name, x):
        inputs[name] = x
        if len(inputs) == len(names):
            raise _StopForward

    handles = [block.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: keep(name, args[0]))
               for name in names]
    try:
        _run_block(block, hidden[context.rows], context, dtype, device)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def _collect_hessians(block, linears: dict[str, torch.nn.Module], hidden, contexts, dtype, device,
                      matmul_dtype: torch.dtype = torch.float32, routed: frozenset[str] = frozenset(),
                      reference=None) -> dict[str, InputStatistics]:
    """Forward every calibration batch through `block`, accumulating each Linear's Hessian.

    Linears fed the very same input tensor (q/k/v, gate/up) share one accumulator, so each
    distinct input costs one `X^T X`; once every Linear of the group has seen its input the
    forward stops, since the rest of the block cannot change these Hessians. The `routed` ones
    (experts) run only on the tokens routed to them, possibly none. With `reference = (float
    block, float hidden states)` (GPTAQ) each batch also runs through the float block, and the
    difference of its inputs to each Linear from the quantized model's is accumulated too.
    Returns `{name: statistics}` (shared ones appear under several names; a routed Linear that
    never ran has none).
    """
    accumulators: dict[str, InputStatistics] = {}
    owners: dict[int, tuple[torch.Tensor, InputStatistics]] = {}  # per batch; keeps inputs alive
    called: set[str] = set()
    float_inputs: dict[str, torch.Tensor] = {}

    def hook(name, layer, x):
        if name in called:
            raise RuntimeError(f"{name} ran twice in one block forward; a layout's Linears must run once")
        called.add(name)
        if id(x) in owners:
            accumulators.setdefault(name, owners[id(x)][1])
        else:
            in_features = features(layer).in_features
            stats = accumulators.setdefault(name, InputStatistics(
                HessianAccumulator(in_features, device=device, matmul_dtype=matmul_dtype),
                AsymmetryAccumulator(in_features, device=device) if reference is not None else None))
            stats.hessian.add(x)
            if stats.asymmetry is not None:
                stats.asymmetry.add(float_inputs[name], x)
            owners[id(x)] = (x, stats)
        if len(called) == len(linears):
            raise _StopForward

    handles = [layer.register_forward_pre_hook(lambda _m, args, name=name, layer=layer: hook(name, layer, args[0]))
               for name, layer in linears.items()]
    try:
        for context in contexts:
            owners.clear()
            called.clear()
            if reference is not None:
                float_inputs = _float_inputs(reference, list(linears), context, dtype, device)
            try:
                _run_block(block, hidden[context.rows], context, dtype, device)
            except _StopForward:
                pass
            missing = set(linears) - called - routed
            if missing:
                raise RuntimeError(f"{sorted(missing)} did not run in the block forward")
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


class LoadedBlocks:
    """Blocks of a model already in memory, moved to the solver's device while worked on."""

    def __init__(self, blocks: torch.nn.ModuleList, device: torch.device):
        self.blocks, self.device = blocks, device

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, index: int) -> torch.nn.Module:
        block = self.blocks[index]
        self._home = next(block.parameters()).device
        return block.to(self.device)

    def release(self, index: int, block: torch.nn.Module) -> None:
        block.to(self._home)


class StreamedBlocks:
    """Blocks of an empty skeleton, filled from the source safetensors only while worked on."""

    def __init__(self, blocks: torch.nn.ModuleList, layout: ModelLayout, checkpoint, device: torch.device):
        self.blocks, self.layout, self.checkpoint, self.device = blocks, layout, checkpoint, device

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, index: int) -> torch.nn.Module:
        from gptq_plugins.streaming import materialize

        materialize(self.blocks[index], f"{self.layout.blocks}.{index}.", self.checkpoint, self.device,
                    rename=self.layout.checkpoint_name)
        return self.blocks[index]

    def release(self, index: int, block: torch.nn.Module) -> None:
        from gptq_plugins.streaming import release

        release(block)


def _quantize_block(block, index: int, hidden, contexts, config: QuantizeConfig, layout: ModelLayout,
                    device, hook, reference=None) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """GPTQ on every Linear of one block, group by group; weights become their dequantized values.

    `reference = (float block, float hidden states)` for GPTAQ (see `_collect_hessians`)."""
    dtype = next(block.parameters()).dtype
    results: dict[str, QuantizedWeight] = {}
    rows: list[dict] = []
    groups = layout.block_sequential(index, block)
    if not config.true_sequential:
        groups = (tuple(name for group in groups for name in group),)
    for group in groups:
        linears = {name: block.get_submodule(name) for name in group}
        statistics = _collect_hessians(block, linears, hidden, contexts, dtype, device,
                                       getattr(torch, config.hessian_dtype),
                                       routed=frozenset(filter(layout.is_expert, group)), reference=reference)
        # One Hessian per distinct input (shared by q/k/v, gate/up); the running buffers go at once.
        by_input = {id(stats): (stats.hessian.hessian(), stats.hessian.num_tokens,
                                stats.asymmetry.asymmetry() if stats.asymmetry is not None else None)
                    for stats in statistics.values()}
        hessians = {name: by_input[id(stats)] for name, stats in statistics.items()}
        del statistics, by_input
        for name, layer in linears.items():
            start = time.perf_counter()
            path = f"{layout.blocks}.{index}.{name}"
            hessian, tokens, asymmetry = hessians.pop(name, (None, 0, None))
            weight = read_weight(layer).float()
            result = _solve_layer(path, weight, hessian, tokens, config, routed=layout.is_expert(name),
                                  asymmetry=asymmetry)
            if hessian is None:  # an expert no token reached: errors measured on the weights
                hessian = torch.eye(weight.shape[1], device=weight.device)
            approx = result.dequantize()
            row = {
                "name": path,
                "shape": list(weight.shape),
                "relative_error": relative_error(weight, approx, hessian),
                "rtn_relative_error": relative_error(weight, rtn(weight, config).dequantize(), hessian),
                "damp_percent": result.damp_percent,
                "damping_escalated": result.damp_percent > config.damp_percent,
                "fallback": result.fallback,
                "tokens": tokens,
                "seconds": round(time.perf_counter() - start, 4),
            }
            if result.fallback:
                log.warning("%s: %s", path, result.fallback)
            write_weight(layer, approx)
            results[path] = result
            rows.append(row)
            hook.gptq_plugins_layer_quantized(name=path, result=result, record=row)
    return results, rows


def _solve_layer(path: str, weight: torch.Tensor, hessian: torch.Tensor | None, tokens: int,
                 config: QuantizeConfig, *, routed: bool, asymmetry: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ for one Linear; round-to-nearest, reported as a fallback, for an expert routed too few tokens."""
    if routed and tokens < MIN_EXPERT_TOKENS_PER_INPUT * weight.shape[1]:
        reason = (f"expert routed {tokens} calibration tokens, fewer than {MIN_EXPERT_TOKENS_PER_INPUT:.0%} of "
                  f"its {weight.shape[1]} inputs; used round-to-nearest")
        return replace(rtn(weight, config, hessian), damp_percent=config.damp_percent, fallback=reason)
    if tokens == 0:
        raise RuntimeError(f"{path}: received no calibration tokens")
    if not hessian.diagonal().any():
        raise CalibrationError(f"{path}: every calibration input was zero, so GPTQ would zero "
                               "the weight; expected varied calibration text")
    try:
        return quantize_weight(weight, hessian, config, asymmetry)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _propagate(block, hidden, contexts, out: torch.Tensor, dtype, device) -> torch.Tensor:
    """`out` filled with `block`'s outputs for every calibration batch of `hidden`."""
    for context in contexts:
        out[context.rows] = _run_block(block, hidden[context.rows], context, dtype, device).float().to(out.device)
    return out


@torch.no_grad()
def run_blocks(model, source, layout: ModelLayout, config: QuantizeConfig, calibration: torch.Tensor,
               store, *, device, start: int = 0, progress: bool = True, on_block_done=None) -> None:
    """Quantize blocks `start..` of `source` in order, each fed the previous quantized block's outputs.

    The inputs of block `start` are `store.load(start)` when resuming (start > 0), else captured by
    running the model's embeddings. `on_block_done(index, results, rows, next_hidden)` is called
    while the block is still loaded (biases readable).
    """
    from gptq_plugins.plugins import get_plugin_manager

    hook = get_plugin_manager().hook
    hidden = None

    def keep(rows, batch_hidden):
        nonlocal hidden
        if hidden is None:
            hidden = store.new(0, (calibration.shape[0], *batch_hidden.shape[1:]))
        hidden[rows] = batch_hidden.to(hidden.device)

    blocks = layout.block_list(model)
    contexts = capture_block_inputs(model, blocks, calibration, sink=None if start else keep)
    # GPTAQ: the float model's hidden states at the current block boundary, in a store of their own
    # (block 0 receives the same inputs on both paths).
    float_store = store.sibling("float") if config.gptaq else None
    if start:
        hidden = store.load(start)
    float_hidden = None if float_store is None else float_store.load(start) if start else hidden
    per_block = [len(layout.block_linear_names(index, block)) for index, block in enumerate(blocks)]
    bar = tqdm(total=sum(per_block), initial=sum(per_block[:start]), desc="quantizing", unit="layer",
               disable=not progress)
    try:
        for index in range(start, len(source)):
            block_start = time.perf_counter()
            block = source.load(index)
            dtype = next(block.parameters()).dtype
            float_block = copy.deepcopy(block) if float_store is not None else None
            results, rows = _quantize_block(block, index, hidden, contexts[index], config, layout, device, hook,
                                            reference=None if float_block is None else (float_block, float_hidden))
            bar.update(len(rows))
            out = _propagate(block, hidden, contexts[index], store.new(index + 1, hidden.shape), dtype, device)
            if float_block is not None:
                float_hidden = _propagate(float_block, float_hidden, contexts[index],
                                          float_store.new(index + 1, hidden.shape), dtype, device)
                if float_store.scratch is not None:  # durable before the block's checkpoint
                    float_store.persist(index + 1, float_hidden)
                float_store.drop(index)
                del float_block
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
    from gptq_plugins.streaming import ActivationStore, materialize

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
        if checkpoint is not None:  # embeddings and the like; the head is never needed
            for name, module in model.named_children():
                materialize(module, f"{name}.", checkpoint, device, skip=(layout.blocks + ".", *layout.keep_float),
                            rename=layout.checkpoint_name)
            blocks_from = StreamedBlocks(blocks, layout, checkpoint, device)
        else:
            blocks_from = LoadedBlocks(blocks, device)
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
