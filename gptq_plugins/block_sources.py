"""Where the block loop gets each decoder block from: a model already in memory, or (streaming)
an empty skeleton filled from the source safetensors one block at a time."""

from __future__ import annotations

import torch

from gptq_plugins.layouts import ModelLayout
from gptq_plugins.streaming import SourceCheckpoint, materialize, release


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

    def __init__(self, blocks: torch.nn.ModuleList, layout: ModelLayout, checkpoint: SourceCheckpoint,
                 device: torch.device):
        self.blocks, self.layout, self.checkpoint, self.device = blocks, layout, checkpoint, device

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, index: int) -> torch.nn.Module:
        materialize(self.blocks[index], f"{self.layout.blocks}.{index}.", self.checkpoint, self.device,
                    rename=self.layout.checkpoint_name)
        return self.blocks[index]

    def release(self, index: int, block: torch.nn.Module) -> None:
        release(block)


def block_source(model: torch.nn.Module, blocks: torch.nn.ModuleList, layout: ModelLayout,
                 checkpoint: SourceCheckpoint | None, device: torch.device) -> LoadedBlocks | StreamedBlocks:
    """The blocks of `model`, streamed from `checkpoint` when given; then the modules outside the
    blocks (embeddings and the like; the head is never needed) are filled from it first."""
    if checkpoint is None:
        return LoadedBlocks(blocks, device)
    for name, module in model.named_children():
        materialize(module, f"{name}.", checkpoint, device, skip=(layout.blocks + ".", *layout.keep_float),
                    rename=layout.checkpoint_name)
    return StreamedBlocks(blocks, layout, checkpoint, device)
