"""Model layouts: where a model's decoder blocks are and which Linears GPTQ quantizes, in order.

A layout is data, not code, so that adding an architecture is one declarative entry provided
through the ``gptq_plugins_model_layouts`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedModelError(ValueError):
    """No layout serves this model type."""


@dataclass(frozen=True)
class ModelLayout:
    """How to walk one family of models.

    ``sequential`` lists the Linear layers of one block (paths relative to the block) in groups;
    a group's layers see the same inputs and are quantized together, groups run in order
    (true-sequential: each group sees inputs produced by the already-quantized groups).
    ``keep_float`` names top-level modules that stay unquantized (recorded in the artifact).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    keep_float: tuple[str, ...] = ("lm_head",)

    def block_list(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        blocks = model.get_submodule(self.blocks)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise UnsupportedModelError(
                f"layout {self.name!r}: {self.blocks!r} is a {type(blocks).__name__}, expected the "
                "ModuleList of decoder blocks")
        return blocks

    def linear_names(self) -> list[str]:
        return [name for group in self.sequential for name in group]

    def block_linears(self, index: int, block: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        """The Linears of block `index` by module path; `UnsupportedModelError` if one is not."""
        linears = {}
        for name in self.linear_names():
            path = f"{self.blocks}.{index}.{name}"
            try:
                layer = block.get_submodule(name)
            except AttributeError:
                raise UnsupportedModelError(f"layout {self.name!r}: {path} does not exist") from None
            if not isinstance(layer, torch.nn.Linear):
                raise UnsupportedModelError(f"layout {self.name!r}: {path} is a {type(layer).__name__}, "
                                            "expected torch.nn.Linear")
            linears[path] = layer
        return linears

    def linears(self, model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        """Every Linear this layout quantizes in `model`, by module path."""
        return {path: layer for index, block in enumerate(self.block_list(model))
                for path, layer in self.block_linears(index, block).items()}


LLAMA = ModelLayout(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

BUILTIN_LAYOUTS = [LLAMA]


def find_layout(model_type: str, layouts: list[ModelLayout]) -> ModelLayout:
    """The last-registered layout serving ``model_type`` (plugins override the core)."""
    for layout in reversed(layouts):
        if model_type in layout.model_types:
            return layout
    known = sorted({t for layout in layouts for t in layout.model_types})
    raise UnsupportedModelError(
        f"model_type {model_type!r} has no GPTQ layout (supported: {', '.join(known)}). To add "
        "one, return a gptq_plugins.layouts.ModelLayout from a `gptq_plugins_model_layouts` "
        "hookimpl in a package exposing it under the 'gptq_plugins' entry-point group.")
