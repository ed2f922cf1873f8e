"""`GPTQPluginsHfQuantizer`: how `from_pretrained` loads an artifact or GPTQ-quantizes on load.

Pre-quantized: the artifact is validated up front (`read_artifact`), each Linear that has a
`.qweight` in it becomes the core `QuantLinear` on the meta device, so the checkpoint's
`qweight/qzeros/scales/g_idx` load into it by name; `post_init()` then picks the kernel.

Quantize on load: the float weights load as usual; then the core pipeline runs on the model in
memory and each quantized Linear becomes `QuantLinear.from_quantized(...)`, so `save_pretrained`
writes the same tensors as `gptq-plugins quantize`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers.quantizers import HfQuantizer

from gptq_plugins.artifact import ArtifactError, read_artifact
from gptq_plugins.config import QUANT_METHOD
from gptq_plugins.linear_weights import features, is_quantizable, write_weight
from gptq_plugins_transformers.config import GPTQPluginsConfig

log = logging.getLogger("gptq_plugins")


def _replace_module(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    model.get_submodule(parent).register_module(child, module)


def _quant_linears(model: torch.nn.Module):
    from gptq_plugins.quant_linear import QuantLinear

    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantLinear)]


class GPTQPluginsHfQuantizer(HfQuantizer):
    """The `HfQuantizer` of `quant_method: gptq_plugins`."""

    requires_calibration = False
    quantization_config: GPTQPluginsConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        # The float layer each QuantLinear replaced, on the meta device (no memory), by module
        # path: `dequantize` puts the same class back, so GPT-2 gets its Conv1D ([in, out]) again
        # and a dequantized model saves a checkpoint its own class loads.
        self._float_layers: dict[str, torch.nn.Module] = {}

    def _replace_float_layer(self, model, path: str, quant: torch.nn.Module) -> None:
        self._float_layers[path] = model.get_submodule(path).to("meta")
        _replace_module(model, path, quant)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            if not checkpoint_files:
                raise ArtifactError(f"{model.name_or_path}: a gptq_plugins model needs its safetensors files")
            self._swap_in_quant_linears(model, read_artifact(Path(checkpoint_files[0]).parent))
        else:
            # Fail before the float weights load when the model cannot be quantized with these options.
            from gptq_plugins.preparation import check_layers, layout_for

            layout = layout_for(model)
            check_layers(layout.block_list(model), layout, self.quantization_config.quantize_config)

    def _swap_in_quant_linears(self, model, artifact) -> None:
        from gptq_plugins.layouts import UnsupportedModelError
        from gptq_plugins.preparation import layout_for
        from gptq_plugins.quant_linear import QuantLinear

        config = artifact.config
        try:
            layout = layout_for(model)
        except UnsupportedModelError:  # a converted stock GPTQ checkpoint of a family we do not quantize
            module_name = lambda name: name  # noqa: E731
        else:
            layout.prepare(model)  # fused experts become per-expert Linears, named as in the artifact
            module_name = layout.module_name
        for name, shape in artifact.modules.items():
            path = self._module_path(model, module_name(name))
            linear = model.get_submodule(path) if path is not None else None
            if linear is None or not is_quantizable(linear) or features(linear) != (
                    shape.in_features, shape.out_features):
                raise ArtifactError(
                    f"{artifact.path}: tensor {name}.qweight is for a Linear {shape.in_features} -> "
                    f"{shape.out_features}, but {type(model).__name__} has "
                    f"{type(linear).__name__ if linear is not None else 'no module'} at {name!r}")
            quant = QuantLinear(shape.in_features, shape.out_features, config.bits, config.group_size,
                                bias=shape.has_bias, dtype=model.dtype)
            self._replace_float_layer(model, path, quant)
            # After loading, Transformers runs `_init_weights` on every module not marked initialised;
            # GPT-2's reaches into its children (`module.c_proj.weight`), which a QuantLinear lacks.
            # The parent's tensors all come from the artifact: there is nothing to initialise.
            model.get_submodule(path.rpartition(".")[0])._is_hf_initialized = True

    @staticmethod
    def _module_path(model, name: str) -> str | None:
        """Where checkpoint module `name` lives in `model` (a base model lacks the `model.` prefix)."""
        prefix = f"{model.base_model_prefix}."
        for path in (name, name.removeprefix(prefix)):
            try:
                model.get_submodule(path)
                return path
            except AttributeError:
                continue
        return None

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            for _name, module in _quant_linears(model):
                module.post_init(backend=self.quantization_config.backend)
        else:
            self._quantize(model)
        return model

    def _quantize(self, model) -> None:
        """Run the core pipeline on the loaded float model and swap in the quantized Linears."""
        from gptq_plugins.assembly import quantization_config_for
        from gptq_plugins.model_loading import calibration_for, load_tokenizer
        from gptq_plugins.pipeline import quantize_modules
        from gptq_plugins.preparation import resolve_run_options
        from gptq_plugins.quant_linear import QuantLinear

        config = resolve_run_options(self.quantization_config.quantize_config, model.device)
        calibration = calibration_for(model, config, load_tokenizer(model.name_or_path))
        results, report = quantize_modules(model, config, calibration)
        for path, result in results.items():
            linear = model.get_submodule(path)
            quant = QuantLinear.from_quantized(result, bias=linear.bias, dtype=linear.weight.dtype)
            quant.post_init(backend=self.quantization_config.backend)
            self._replace_float_layer(model, path, quant)
        summary = report["summary"]
        log.info("quantized %d layers on load, mean relative error %.5f (round-to-nearest %.5f)",
                 summary["layers"], summary["mean_relative_error"], summary["mean_rtn_relative_error"])
        # What save_pretrained writes: the same block as `gptq-plugins quantize`.
        backend = self.quantization_config.backend
        self.quantization_config = GPTQPluginsConfig.from_dict(quantization_config_for(model, config, calibration))
        self.quantization_config.backend = backend
        model.config.quantization_config = self.quantization_config

    def _dequantize(self, model, dtype=None):
        """Replace every `QuantLinear` by the float layer it replaced, holding its dequantized weight."""
        if isinstance(dtype, str):  # `model.config.dtype`, which `save_pretrained` turns into a name
            dtype = getattr(torch, dtype)
        for name, module in _quant_linears(model):
            weight = module.dequantize()
            layer = self._float_layers.pop(name).to_empty(device=weight.device).to(dtype or weight.dtype)
            write_weight(layer, weight)
            layer.bias = None if module.bias is None else torch.nn.Parameter(module.bias.to(layer.weight.dtype))
            _replace_module(model, name, layer)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make `quant_method: gptq_plugins` known to Transformers; a second call changes nothing."""
    from transformers.quantizers import auto, register_quantization_config, register_quantizer

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(GPTQPluginsConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(GPTQPluginsHfQuantizer)
    # So that `backend` given to `from_pretrained` reaches the loaded artifact's config.
    if GPTQPluginsConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, GPTQPluginsConfig)
