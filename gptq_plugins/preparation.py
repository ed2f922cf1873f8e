"""What a run settles before any heavy work: the model's layout, its blocks ready to quantize,
the options checked against every Linear, and the machine-dependent options made concrete."""

from __future__ import annotations

import torch

from gptq_plugins import plugins
from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.hessian import resolve_hessian_dtype
from gptq_plugins.layouts import ModelLayout, UnsupportedModelError, find_layout


def layout_for(model: torch.nn.Module) -> ModelLayout:
    """The layout of `model`'s architecture, from the layouts of every plugin."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config.model_type")
    return find_layout(model_type, plugins.model_layouts())


def check_layers(blocks, layout: ModelLayout, config: QuantizeConfig) -> None:
    """Fail before any heavy work if a Linear is missing or cannot be stored with these options."""
    if config.gptaq and layout.experts is not None:
        raise ConfigError("gptaq", f"not available for {layout.name} models: the float and the quantized "
                          "model route tokens to different experts, so their inputs cannot be paired")
    for index, block in enumerate(blocks):
        for path, shape in layout.block_shapes(index, block).items():
            config.check_layer(*shape, name=path)


def prepare_blocks(model: torch.nn.Module, config: QuantizeConfig,
                   layout: ModelLayout | None = None) -> tuple[ModelLayout, torch.nn.ModuleList]:
    """The model's layout (found when not given) and its decoder blocks, mixture-of-experts blocks
    unfused, every Linear checked against `config`."""
    layout = layout or layout_for(model)
    layout.prepare(model)
    blocks = layout.block_list(model)
    check_layers(blocks, layout, config)
    return layout, blocks


def resolve_run_options(config: QuantizeConfig, device: torch.device | str) -> QuantizeConfig:
    """`config` with the options that depend on the machine (`hessian_dtype=auto`) made concrete,
    so the run, its report and the artifact's metadata all say what actually ran."""
    return config.replace(hessian_dtype=resolve_hessian_dtype(config.hessian_dtype, device))
