"""The artifact of a run, assembled through `ArtifactWriter` block by block.

After each block its packed tensors are written and the run is checkpointed (options, next block,
report rows, calibration source) inside the partial output, so a killed run resumes there and
gives the same bytes; at the end the float tensors, `quantization_config` and report complete it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptq_plugins.artifact import ArtifactWriter
from gptq_plugins.calibration import CalibrationSet
from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.distributed import SINGLE
from gptq_plugins.layouts import ModelLayout
from gptq_plugins.model_loading import SourceModel
from gptq_plugins.packing import pack_quantized
from gptq_plugins.preparation import layout_for
from gptq_plugins.report import run_report
from gptq_plugins.solver import QuantizedWeight
from gptq_plugins.streaming import ActivationStore

CALIBRATION_FILE = "calibration.npy"


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


def quantized_paths(layout: ModelLayout, blocks: torch.nn.ModuleList) -> set[str]:
    """Module paths of every Linear the layout quantizes (after `prepare`)."""
    return {f"{layout.blocks}.{i}.{name}" for i, block in enumerate(blocks)
            for name in layout.block_linear_names(i, block)}


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


class ArtifactAssembly:
    """One run's artifact in the making, resumed from the partial output's checkpoint when there is one."""

    def __init__(self, writer: ArtifactWriter, model: torch.nn.Module, layout: ModelLayout, config: QuantizeConfig,
                 *, progress: bool = True, ranks=SINGLE):
        self.writer, self.model, self.layout, self.config = writer, model, layout, config
        self.progress, self.ranks = progress, ranks
        self.state = writer.state
        if self.state is not None and self.state["config"] != config.to_dict():
            raise ConfigError("resume", f"the interrupted run used other options: {self.state['config']}")
        if self.state is not None and self.state.get("world_size", 1) != ranks.world_size:
            raise ConfigError("resume", f"the interrupted run had {self.state.get('world_size', 1)} ranks, this one "
                              f"has {ranks.world_size}; resume it with as many processes")
        self.rows: list[dict] = self.state["rows"] if self.state else []
        self.next_block: int = self.state["next_block"] if self.state else 0

    def resumed_calibration(self) -> CalibrationSet | None:
        """The calibration the interrupted run used, or None for a fresh run."""
        if self.state is None:
            return None
        ids = torch.from_numpy(np.load(self.writer.scratch / CALIBRATION_FILE, allow_pickle=False))
        return CalibrationSet(ids, **self.state["calibration"])

    def begin(self, calibration: CalibrationSet, store: ActivationStore) -> None:
        """Run on `calibration`, block boundaries kept in `store`; a fresh run saves the windows for resume."""
        self.calibration, self.store = calibration, store
        if self.state is None:
            self.writer.scratch.mkdir(exist_ok=True)
            np.save(self.writer.scratch / CALIBRATION_FILE, calibration.token_ids.numpy(), allow_pickle=False)

    def add_block(self, index: int, results: dict[str, QuantizedWeight], rows: list[dict],
                  next_hidden: torch.Tensor) -> None:
        """Write block `index`'s packed tensors and checkpoint the run after it (`run_blocks`' `on_block_done`)."""
        for path, result in results.items():
            self.writer.add(self.layer_tensors(self.layout.checkpoint_name(path), result,
                                               self.model.get_submodule(path).bias))
        self.rows.extend(rows)
        self.store.persist(index + 1, next_hidden)
        # Every rank's hidden states are durable before the checkpoint names this block finished.
        self.ranks.after_all(lambda: self.writer.checkpoint({
            "config": self.config.to_dict(), "next_block": index + 1, "rows": self.rows,
            "world_size": self.ranks.world_size,
            "calibration": {"dataset": self.calibration.dataset, "seed": self.calibration.seed}}))

    layer_tensors = staticmethod(packed_tensors)  # what one quantized Linear becomes in this format

    def float_tensors(self, source: SourceModel, blocks: torch.nn.ModuleList) -> dict[str, torch.Tensor]:
        """Checkpoint name -> every tensor that stays float (read from the checkpoint when streaming)."""
        layout, checkpoint = self.layout, source.checkpoint
        quantized = quantized_paths(layout, blocks)
        if checkpoint is not None:
            quantized = {layout.checkpoint_name(path) for path in quantized}
            return checkpoint.tensors(name for name in checkpoint.weight_map
                                      if name.rsplit(".", 1)[0] not in quantized)
        return {layout.checkpoint_name(name): tensor for name, tensor in float_tensors(self.model, quantized).items()}

    def finish(self, source: SourceModel, blocks: torch.nn.ModuleList, device) -> Path:
        """Add the float tensors, config and report; returns the artifact."""
        self.writer.add(dict(sorted(self.float_tensors(source, blocks).items())))
        model_config = self.model.config.to_dict()
        model_config.pop("quantization_config", None)
        return self.writer.finish(model_config=model_config,
                                  quantization_config=quantization_config_for(self.model, self.config,
                                                                              self.calibration),
                                  report=run_report(self.config, self.layout, self.rows, device),
                                  copy_from=source.directory)


class RankShare:
    """What a rank other than the writer does for the artifact: it keeps its share of the hidden
    states at each block boundary (for `--resume`) in its own scratch directory, and writes nothing."""

    def __init__(self, ranks, out_dir: Path, next_block: int):
        self.ranks, self.out_dir, self.next_block = ranks, out_dir, next_block

    def begin(self, calibration, store: ActivationStore) -> None:
        self.store = store

    def add_block(self, index: int, results, rows, next_hidden: torch.Tensor) -> None:
        self.store.persist(index + 1, next_hidden)
        self.ranks.after_all()

    def finish(self, source, blocks, device) -> Path:
        return self.out_dir
