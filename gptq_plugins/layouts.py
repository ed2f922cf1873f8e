"""Model layouts: where a model's decoder blocks are and which Linears GPTQ quantizes, in order.

A layout is data, not code, so that adding an architecture is one declarative entry provided
through the ``gptq_plugins_model_layouts`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_plugins.linear_weights import QUANTIZABLE, features, is_quantizable


class UnsupportedModelError(ValueError):
    """No layout serves this model type."""


# In a Linear name of a layout's `sequential`: that Linear of every expert of the block.
EXPERT = "*"


@dataclass(frozen=True)
class ExpertsLayout:
    """Where a mixture-of-experts block keeps its routed experts, and how one expert's
    projections are named in checkpoints (gate, up, down: `w1, w3, w2` for Mixtral)."""

    path: str
    projections: tuple[str, str, str]


@dataclass(frozen=True)
class ModelLayout:
    """How to walk one family of models.

    ``sequential`` lists the Linear layers of one block (paths relative to the block) in groups;
    a group's layers see the same inputs and are quantized together, groups run in order
    (true-sequential: each group sees inputs produced by the already-quantized groups).
    ``keep_float`` names modules that stay unquantized (recorded in the artifact).
    ``experts`` marks a mixture-of-experts family: `*` in a name stands for each expert, and
    `prepare` turns the fused experts Transformers builds into one Linear per expert projection.
    ``checkpoint_renames`` are `(in the model, in the checkpoint)` substrings of tensor names
    where Transformers renames a checkpoint's modules (Mixtral's `block_sparse_moe` is `mlp`).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    keep_float: tuple[str, ...] = ("lm_head",)
    experts: ExpertsLayout | None = None
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def block_list(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        blocks = model.get_submodule(self.blocks)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise UnsupportedModelError(
                f"layout {self.name!r}: {self.blocks!r} is a {type(blocks).__name__}, expected the "
                "ModuleList of decoder blocks")
        return blocks

    def _experts_module(self, index: int, block: torch.nn.Module) -> torch.nn.Module:
        try:
            return block.get_submodule(self.experts.path)
        except AttributeError:
            raise UnsupportedModelError(f"layout {self.name!r}: {self.blocks}.{index}.{self.experts.path} "
                                        "does not exist; every block must be a mixture-of-experts block") from None

    def block_sequential(self, index: int, block: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
        """`sequential` for block `index`, with `*` expanded to each of its experts."""
        if self.experts is None:
            return self.sequential
        from gptq_plugins.experts import expert_count

        count = expert_count(self._experts_module(index, block))
        return tuple(
            (*(name for name in group if EXPERT not in name),
             *(name.replace(EXPERT, str(e)) for e in range(count) for name in group if EXPERT in name))
            for group in self.sequential)

    def block_linear_names(self, index: int, block: torch.nn.Module) -> list[str]:
        return [name for group in self.block_sequential(index, block) for name in group]

    def is_expert(self, name: str) -> bool:
        """Whether Linear `name` (relative to its block) belongs to a routed expert."""
        return self.experts is not None and name.startswith(self.experts.path + ".")

    def prepare(self, model: torch.nn.Module) -> None:
        """Unfuse every block's fused experts into per-expert Linears (weights kept; meta stays meta)."""
        if self.experts is None:
            return
        from gptq_plugins.experts import is_fused, unfuse

        for index, block in enumerate(self.block_list(model)):
            module = self._experts_module(index, block)
            if is_fused(module):
                parent, _, child = self.experts.path.rpartition(".")
                path = f"{self.blocks}.{index}.{self.experts.path}"
                block.get_submodule(parent).register_module(child, unfuse(module, self.experts.projections, path))

    def _linear(self, index: int, parent: torch.nn.Module, name: str) -> torch.nn.Module:
        path = f"{self.blocks}.{index}.{name}"
        try:
            layer = parent.get_submodule(name)
        except AttributeError:
            raise UnsupportedModelError(f"layout {self.name!r}: {path} does not exist") from None
        if not is_quantizable(layer):
            raise UnsupportedModelError(f"layout {self.name!r}: {path} is a {type(layer).__name__}, "
                                        f"expected {QUANTIZABLE}")
        return layer

    def block_linears(self, index: int, block: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The Linears of block `index` by module path; `UnsupportedModelError` if one is not."""
        return {f"{self.blocks}.{index}.{name}": self._linear(index, block, name)
                for name in self.block_linear_names(index, block)}

    def block_shapes(self, index: int, block: torch.nn.Module) -> dict[str, tuple[int, int]]:
        """`(in, out)` of each Linear of block `index` by module path, also before `prepare`
        (fused experts are read through an empty stand-in, so the weights need not be loaded)."""
        from gptq_plugins.experts import is_fused, unfuse

        stand_in = None
        if self.experts is not None and is_fused(experts := self._experts_module(index, block)):
            stand_in = unfuse(experts, self.experts.projections, f"{self.blocks}.{index}.{self.experts.path}",
                              empty=True)
        shapes = {}
        for name in self.block_linear_names(index, block):
            if stand_in is not None and self.is_expert(name):
                layer = self._linear(index, stand_in, name.removeprefix(self.experts.path + "."))
            else:
                layer = self._linear(index, block, name)
            shapes[f"{self.blocks}.{index}.{name}"] = tuple(features(layer))
        return shapes

    def linears(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Every Linear this layout quantizes in `model` (after `prepare`), by module path."""
        return {path: layer for index, block in enumerate(self.block_list(model))
                for path, layer in self.block_linears(index, block).items()}

    def checkpoint_name(self, name: str) -> str:
        """A model tensor or module name as the checkpoint (and the artifact) spells it."""
        for in_model, in_checkpoint in self.checkpoint_renames:
            name = name.replace(in_model, in_checkpoint)
        return name

    def module_name(self, name: str) -> str:
        """A checkpoint tensor or module name as the model built by Transformers spells it."""
        for in_model, in_checkpoint in self.checkpoint_renames:
            name = name.replace(in_checkpoint, in_model)
        return name


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
# GPT-2's Linears are Transformers' Conv1D (weight stored [in, out]); `linear_weights` reads them
# as [out, in] like every other Linear, so the artifact holds the same tensors as any family.
GPT2 = ModelLayout(
    name="gpt2", model_types=("gpt2",), blocks="transformer.h",
    sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
)

# Mixture-of-experts blocks: attention as in Llama; then the gate/up projections of every expert,
# each calibrated on the tokens routed to it (and of the shared expert, on every token), then the
# down projections. The routers stay float.
MIXTRAL = ModelLayout(
    name="mixtral", model_types=("mixtral",), blocks="model.layers",
    sequential=(*_LLAMA_SEQUENTIAL[:2], ("mlp.experts.*.w1", "mlp.experts.*.w3"), ("mlp.experts.*.w2",)),
    experts=ExpertsLayout("mlp.experts", ("w1", "w3", "w2")),
    checkpoint_renames=((".mlp.", ".block_sparse_moe."),),
)
QWEN2_MOE = ModelLayout(
    name="qwen2_moe", model_types=("qwen2_moe",), blocks="model.layers",
    sequential=(*_LLAMA_SEQUENTIAL[:2],
                ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                 "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
                ("mlp.shared_expert.down_proj", "mlp.experts.*.down_proj")),
    experts=ExpertsLayout("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
)
QWEN3_MOE = ModelLayout(
    name="qwen3_moe", model_types=("qwen3_moe",), blocks="model.layers",
    sequential=(*_LLAMA_SEQUENTIAL[:2], ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
                ("mlp.experts.*.down_proj",)),
    experts=ExpertsLayout("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
)

BUILTIN_LAYOUTS = [LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3_TEXT, PHI3, OPT, GPT_NEOX, GPT2,
                   MIXTRAL, QWEN2_MOE, QWEN3_MOE]


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
