"""The CUDA backend: fused Triton matmul for decode, Triton dequantize + cuBLAS for prefill.

Triton is imported only when a layer is prepared, so CPU-only installs never load it.
"""

from __future__ import annotations

import importlib.util

import torch

from gptq_plugins.kernels.triton_dtypes import ACTIVATION_DTYPES


class TritonBackend:
    name = "triton"
    priority = 100

    def supports(self, device_type, bits, group_size, desc_act, dtype) -> bool:
        return (device_type == "cuda" and dtype in ACTIVATION_DTYPES
                and importlib.util.find_spec("triton") is not None)

    def prepare(self, layer) -> None:
        from gptq_plugins.kernels import triton_matmul  # noqa: F401  (fail here, not mid-forward)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        from gptq_plugins.kernels.triton_layout import dequantize_triton
        from gptq_plugins.kernels.triton_matmul import MAX_FUSED_ROWS, fused_matmul

        packed = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
        x_act = x.to(layer.dtype)
        if x.shape[0] <= MAX_FUSED_ROWS:
            y = fused_matmul(x_act, *packed)
        else:  # enough rows that one dequantized copy per call is amortised by cuBLAS
            y = torch.nn.functional.linear(x_act, dequantize_triton(*packed, dtype=layer.dtype))
        return y.to(x.dtype)
