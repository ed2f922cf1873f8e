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


# The attention and MLP Linears of a Llama-style block: q/k/v read the same normed input, so do
# gate/up. Module names checked against Transformers 5.19's modeling files.
_LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

LLAMA = ModelLayout(name="llama", model_types=("llama",), blocks="model.layers", sequential=_LLAMA_SEQUENTIAL)
MISTRAL = ModelLayout(name="mistral", model_types=("mistral",), blocks="model.layers", sequential=_LLAMA_SEQUENTIAL)
QWEN2 = ModelLayout(name="qwen2", model_types=("qwen2",), blocks="model.layers", sequential=_LLAMA_SEQUENTIAL)
QWEN3 = ModelLayout(name="qwen3", model_types=("qwen3",), blocks="model.layers", sequential=_LLAMA_SEQUENTIAL)
GEMMA2 = ModelLayout(name="gemma2", model_types=("gemma2",), blocks="model.layers", sequential=_LLAMA_SEQUENTIAL)
GEMMA3_TEXT = ModelLayout(name="gemma3_text", model_types=("gemma3_text",), blocks="model.layers",
                          sequential=_LLAMA_SEQUENTIAL)
PHI3 = ModelLayout(
    name="phi3", model_types=("phi3",), blocks="model.layers",
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
)
OPT = ModelLayout(
    name="opt", model_types=("opt",), blocks="model.decoder.layers",
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                ("fc1",), ("fc2",)),
)
GPT_NEOX = ModelLayout(
    name="gpt_neox", model_types=("gpt_neox",), blocks="gpt_neox.layers",
    sequential=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",)),
)

BUILTIN_LAYOUTS = [LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3_TEXT, PHI3, OPT, GPT_NEOX]

# Families whose Linears Transformers 5 does not hold as `nn.Linear`, with what stands in the way.
# An error that says so beats quantizing half a block or a layout that fails halfway.
NOT_SUPPORTED = {
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe"), (
        "Transformers 5 fuses the experts into 3-D parameters (`mlp.experts.gate_up_proj` "
        "[experts, 2 x intermediate, hidden], `mlp.experts.down_proj`) instead of one nn.Linear per "
        "expert; per-expert GPTQ on the tokens routed to each expert, per-expert artifact tensors and "
        "quantized-experts modules in the host adapters are not implemented yet")),
    "gpt2": ("GPT-2 uses Transformers' Conv1D (weight stored [in, out]) instead of nn.Linear; the "
             "pipeline and the host adapters quantize and load nn.Linear only"),
}


def find_layout(model_type: str, layouts: list[ModelLayout]) -> ModelLayout:
    """The last-registered layout serving ``model_type`` (plugins override the core)."""
    for layout in reversed(layouts):
        if model_type in layout.model_types:
            return layout
    known = sorted({t for layout in layouts for t in layout.model_types})
    why = f" because {NOT_SUPPORTED[model_type]}" if model_type in NOT_SUPPORTED else ""
    raise UnsupportedModelError(
        f"model_type {model_type!r} has no GPTQ layout (supported: {', '.join(known)}){why}. To add "
        "one, return a gptq_plugins.layouts.ModelLayout from a `gptq_plugins_model_layouts` "
        "hookimpl in a package exposing it under the 'gptq_plugins' entry-point group.")
