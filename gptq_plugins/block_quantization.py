"""GPTQ on one decoder block: each Linear's Hessian from forward hooks, group by group
(true-sequential), each Linear solved and its weight replaced by the dequantized values, and a
report row per Linear."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from gptq_plugins.calibration import CalibrationError
from gptq_plugins.capture import BatchContext, StopForward, run_block
from gptq_plugins.config import QuantizeConfig
from gptq_plugins.gptaq import UNPAIRED, FloatBlock, Unpaired
from gptq_plugins.heap import release_free_memory
from gptq_plugins.hessian import HessianAccumulator, asymmetry_from_sum, hessian_from_sum
from gptq_plugins.layouts import ModelLayout
from gptq_plugins.linear_weights import features, read_weight, write_weight
from gptq_plugins.distributed import SINGLE, solve_cost
from gptq_plugins.finished_outputs import NO_REUSE, FinishedOutputs, NoReuse
from gptq_plugins.solver import QuantizedWeight, grid_for, quantize_weight, rtn

log = logging.getLogger("gptq_plugins")
# An expert calibrated on fewer routed tokens than this fraction of its input width gets
# round-to-nearest: its Hessian spans too few directions for GPTQ's updates to generalise.
MIN_EXPERT_TOKENS_PER_INPUT = 0.1


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T)."""
    delta, weight = (weight - approx).float(), weight.float()
    num = ((delta @ hessian) * delta).sum()
    den = ((weight @ hessian) * weight).sum()
    return float(num / den) if den > 0 else float(num)


@dataclass
class InputStatistics:
    """One distinct Linear input's Hessian, and the Linear first fed it (its name pairs it for GPTAQ)."""

    hessian: HessianAccumulator
    owner: str


def _collect_hessians(block, linears: dict[str, torch.nn.Module], hidden, contexts: list[BatchContext], dtype,
                      device, matmul_dtype: torch.dtype = torch.float32, routed: frozenset[str] = frozenset(),
                      reference: FloatBlock | Unpaired = UNPAIRED,
                      reuse: FinishedOutputs | NoReuse = NO_REUSE) -> dict[str, InputStatistics]:
    """Forward every calibration batch through `block`, accumulating each Linear's Hessian.

    Linears fed the very same input tensor (q/k/v, gate/up) share one accumulator, so each
    distinct input costs one `X^T X`; once every Linear of the group has seen its input the
    forward stops, since the rest of the block cannot change these Hessians (when the first batch
    shows one input for the whole group, later batches stop at its first Linear). The `routed` ones
    (experts) run only on the tokens routed to them, possibly none. Each distinct input is also
    paired with the `reference` block's (GPTAQ). Returns `{name: statistics}` (shared ones appear
    under several names; a routed Linear that never ran has none).
    """
    accumulators: dict[str, InputStatistics] = {}
    owners: dict[int, tuple[torch.Tensor, InputStatistics]] = {}  # per batch; keeps inputs alive
    called: set[str] = set()
    stop_at = None  # the Linear whose input is the whole group's, once the first batch showed it

    def hook(name, layer, x):
        if name in called:
            raise RuntimeError(f"{name} ran twice in one block forward; a layout's Linears must run once")
        called.add(name)
        if id(x) in owners:
            accumulators.setdefault(name, owners[id(x)][1])
        else:
            stats = accumulators.setdefault(name, InputStatistics(
                HessianAccumulator(features(layer).in_features, device=device, matmul_dtype=matmul_dtype), name))
            stats.hessian.add(x)
            reference.pair(stats.owner, x)
            owners[id(x)] = (x, stats)
        if name == stop_at:
            called.update(linears)
        if len(called) == len(linears):
            raise StopForward

    handles = [layer.register_forward_pre_hook(lambda _m, args, name=name, layer=layer: hook(name, layer, args[0]))
               for name, layer in linears.items()]
    try:
        for batch, context in enumerate(contexts):
            owners.clear()
            called.clear()
            reference.record_inputs(list(linears), context)
            try:
                with reuse.batch(batch, keep=True):
                    run_block(block, hidden[context.rows], context, dtype, device)
            except StopForward:
                pass
            missing = set(linears) - called - routed
            if missing:
                raise RuntimeError(f"{sorted(missing)} did not run in the block forward")
            if batch == 0 and len(owners) == 1 and not routed:
                stop_at = next(iter(owners.values()))[1].owner
    finally:
        for handle in handles:
            handle.remove()
        release_free_memory()
    return accumulators


def _combined_statistics(statistics: dict[str, InputStatistics], linears: dict[str, torch.nn.Module],
                         owners: dict[str, int], reference: FloatBlock | Unpaired, ranks) -> dict[str, tuple]:
    """`{name: (hessian, tokens, asymmetry)}` over every rank's samples, for the Linears this rank solves.

    One Hessian per distinct input (shared by q/k/v, gate/up): the ranks' partial sums are added
    up on each rank that owns a Linear fed it. Which Linear first took an input is agreed over
    the ranks, since an expert may run on one rank's tokens and not another's.
    """
    names = list(linears)
    fed_by = ranks.union_max([names.index(statistics[name].owner) if name in statistics else -1
                              for name in names])
    combined = {}
    for first in sorted(set(fed_by) - {-1}):
        sharing = [name for name, feeder in zip(names, fed_by) if feeder == first]
        stats = statistics.get(names[first])
        parts, tokens = None, 0
        if stats is not None:
            asymmetry = reference.asymmetry(stats.owner)
            parts = [stats.hessian.partial_sum()] + ([] if asymmetry is None else [asymmetry.partial_sum()])
            tokens = stats.hessian.num_tokens
        in_features = features(linears[names[first]]).in_features
        sums, tokens = ranks.sum_on([owners[name] for name in sharing], parts, tokens, (in_features, in_features))
        if sums is not None:
            hessian = hessian_from_sum(sums[0], tokens)
            asymmetry = asymmetry_from_sum(sums[1], tokens) if len(sums) > 1 else None
            combined.update(dict.fromkeys(sharing, (hessian, tokens, asymmetry)))
    return combined


def _result_record(result: QuantizedWeight, row: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"codes": result.codes, "scales": result.scales, "zeros": result.zeros, "g_idx": result.g_idx}
    return tensors, {"damp_percent": result.damp_percent, "loss": result.loss, "fallback": result.fallback,
                     "row": row}


def _result_from_record(tensors: dict[str, torch.Tensor], meta: dict, config: QuantizeConfig) -> QuantizedWeight:
    return QuantizedWeight(tensors["codes"], tensors["scales"], tensors["zeros"], tensors["g_idx"], config.bits,
                           config.group_size, meta["damp_percent"], meta["loss"], meta["fallback"],
                           grid=grid_for(config))


def quantize_block(block, index: int, hidden, contexts: list[BatchContext], config: QuantizeConfig,
                   layout: ModelLayout, device, hook, reference: FloatBlock | Unpaired = UNPAIRED,
                   n_blocks: int = 1, ranks=SINGLE, reuse: FinishedOutputs | NoReuse = NO_REUSE
                   ) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """GPTQ on every Linear of one block (`index` of `n_blocks`), group by group; weights become
    their dequantized values.

    `reference` is the block's float copy for GPTAQ (see `gptaq`). With several `ranks` each
    collects Hessians on its own samples, each Linear is solved by its owner (balanced by solve
    cost) and the result sent to every rank. `reuse` learns which Linears are done, so that later
    forwards reuse what finished parts of the block computed. Returns the solver results by
    module path and the report rows.
    """
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
                                       routed=frozenset(filter(layout.is_expert, group)), reference=reference,
                                       reuse=reuse)
        owners = ranks.owners({name: solve_cost(features(layer).in_features, features(layer).out_features)
                               for name, layer in linears.items()})
        hessians = _combined_statistics(statistics, linears, owners, reference, ranks)
        del statistics
        solved = {}
        for name, layer in linears.items():
            if owners[name] != ranks.rank:
                continue
            start = time.perf_counter()
            path = f"{layout.blocks}.{index}.{name}"
            hessian, tokens, asymmetry = hessians.pop(name, (None, 0, None))
            weight = read_weight(layer).float()
            layer_config = config.for_layer(name, index, n_blocks, weight.shape[1])
            result = _solve_layer(path, weight, hessian, tokens, layer_config, routed=layout.is_expert(name),
                                  asymmetry=asymmetry)
            if hessian is None:  # an expert no token reached: errors measured on the weights
                hessian = torch.eye(weight.shape[1], device=weight.device)
            approx = result.dequantize()
            solved[name] = (result, _report_row(path, weight, approx, hessian, result, tokens, layer_config, start),
                            approx)
        for name, layer in linears.items():
            path = f"{layout.blocks}.{index}.{name}"
            if name in solved:
                result, row, approx = solved.pop(name)
                ranks.share(owners[name], *_result_record(result, row))
            else:
                tensors, meta = ranks.share(owners[name], None, None)
                result = _result_from_record(tensors, meta, config.for_layer(name, index, n_blocks,
                                                                             features(layer).in_features))
                row, approx = meta["row"], result.dequantize()
            if result.fallback:
                log.warning("%s: %s", path, result.fallback)
            write_weight(layer, approx)
            reuse.finish(name)
            results[path] = result
            rows.append(row)
            hook.gptq_plugins_layer_quantized(name=path, result=result, record=row)
    return results, rows


def _report_row(path: str, weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor,
                result: QuantizedWeight, tokens: int, config: QuantizeConfig, start: float) -> dict:
    """One Linear's row of the report: its error against round-to-nearest's, damping, fallback, time."""
    return {
        "name": path,
        "shape": list(weight.shape),
        "relative_error": relative_error(weight, approx, hessian),
        "rtn_relative_error": relative_error(weight, rtn(weight, config).dequantize(), hessian),
        "damp_percent": result.damp_percent,
        "damping_escalated": result.damp_percent > config.damp_percent,
        "fallback": result.fallback,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 4),
        **({"gguf_type": config.gguf_type} if config.gguf_type else {}),
    }


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
