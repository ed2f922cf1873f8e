"""`GPTQPluginsConfig`: vLLM's view of an artifact's `quantization_config`.

It only parses (into the core's `QuantizeConfig`, which validates) and decides which layers are
quantized; `GPTQPluginsLinearMethod` owns the weights.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from gptq_plugins.artifact import read_artifact
from gptq_plugins.config import QUANT_METHOD, QuantizeConfig

# Checkpoints that keep their options outside config.json (older AutoGPTQ releases).
STANDALONE_CONFIG_FILE = "quantize_config.json"


@register_quantization_config(QUANT_METHOD)
class GPTQPluginsConfig(QuantizationConfig):
    """Options of a GPTQ v1 checkpoint (ours or a stock `quant_method: gptq` one)."""

    def __init__(self, options: QuantizeConfig, modules_not_to_convert: list[str] | None = None):
        super().__init__()
        self.options = options
        self.modules_not_to_convert = list(modules_not_to_convert or [])
        # Module paths that hold quantized tensors, read from a local artifact; None when the
        # checkpoint is not local (then every Linear not in modules_not_to_convert is quantized).
        self.quantized_modules: set[str] | None = None

    def __repr__(self) -> str:
        return f"GPTQPluginsConfig({self.options}, modules_not_to_convert={self.modules_not_to_convert})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        # The core's torch reference backend runs on any device vLLM runs on; faster kernels
        # (Marlin/Machete, Triton) are chosen per layer only where the device supports them.
        return 0

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        return [STANDALONE_CONFIG_FILE]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQPluginsConfig":
        options = QuantizeConfig.from_quantization_config(
            config, strict=config.get("quant_method") == QUANT_METHOD)
        return cls(options, config.get("modules_not_to_convert"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None, **kwargs) -> str | None:
        """Serve stock `quant_method: gptq` checkpoints, but only when the user asked for us."""
        if user_quant == QUANT_METHOD and hf_quant_cfg.get("quant_method", "").lower() in ("gptq", QUANT_METHOD):
            return QUANT_METHOD
        return None

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Keep `.g_idx`: the base mapper drops it, which would silently break act-order."""
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None):
        """Validate a local artifact before any engine starts, and learn which modules it quantized.

        `read_artifact` checks every tensor's shape and dtype against the config, so a mismatch
        fails here with the file, tensor and expected shape instead of deep inside a loader.
        """
        if os.path.isdir(model_name):
            self.quantized_modules = set(read_artifact(model_name).modules)

    def apply_vllm_mapper(self, hf_to_vllm_mapper):
        self.modules_not_to_convert = hf_to_vllm_mapper.apply_list(self.modules_not_to_convert)
        if self.quantized_modules is not None:
            self.quantized_modules = set(hf_to_vllm_mapper.apply_list(sorted(self.quantized_modules)))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe import RoutedExperts

        from gptq_plugins_vllm.linear import GPTQPluginsLinearMethod
        from gptq_plugins_vllm.moe import GPTQPluginsMoEMethod

        if isinstance(layer, RoutedExperts):  # None: vLLM's float experts
            return GPTQPluginsMoEMethod(self, layer.moe_config) if self._experts_are_quantized(prefix) else None
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: left in float
        return GPTQPluginsLinearMethod(self) if self.is_quantized(prefix) else UnquantizedLinearMethod()

    def is_quantized(self, prefix: str) -> bool:
        """Whether the checkpoint stores `prefix` quantized; a fused layer's parts must agree."""
        name = prefix.rsplit(".", 1)[-1]
        parts = [prefix[: -len(name)] + part for part in self.packed_modules_mapping.get(name, [name])]
        flags = {part: self._part_is_quantized(part) for part in parts}
        if len(set(flags.values())) > 1:
            raise ValueError(f"{prefix}: vLLM fuses {parts} into one layer, but the checkpoint quantized "
                             f"only some of them ({flags}); quantize all or none of them")
        return all(flags.values())

    def _experts_are_quantized(self, prefix: str) -> bool:
        """Whether the checkpoint stores the experts under `prefix` (`<prefix>.<e>.<part>`) quantized."""
        if self.quantized_modules is not None:
            return any(name.startswith(prefix + ".") for name in self.quantized_modules)
        return self._part_is_quantized(prefix)

    def _part_is_quantized(self, name: str) -> bool:
        if self.quantized_modules is not None:
            return name in self.quantized_modules
        return not any(name == kept or name.endswith("." + kept) for kept in self.modules_not_to_convert)
