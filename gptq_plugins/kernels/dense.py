"""The reference backend: dequantize once, then a plain matmul. Runs everything, anywhere."""

from __future__ import annotations

import torch

from gptq_plugins.packing import dequantize_packed


class DenseBackend:
    """Caches the float weight in the layer's dtype; the fallback when no kernel fits."""

    name = "dense"
    priority = 0

    def supports(self, device_type, bits, group_size, desc_act, dtype) -> bool:
        return True

    def prepare(self, layer) -> torch.Tensor:
        weight = dequantize_packed(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
        return weight.to(layer.dtype)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        weight = layer.kernel_state
        return torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)
