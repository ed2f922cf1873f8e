"""Kernel backends for `QuantLinear`, chosen per layer through the `gptq_plugins_kernel_backends`
hook. Built in, best first: Triton on CUDA, PyTorch's int4 kernel for 2/3/4-bit and (two 4-bit
codes per weight) 8-bit on CPU, with calls of many rows dequantized tile by tile (and, only when
forced by name, a bfloat16 prefill cache), and the dense reference (dequantize once, matmul) that
runs everything."""

from gptq_plugins.kernels.base import (AUTO, BACKEND_ENV, BackendUnsupported, KernelBackend, activation_dtype, announce,
                                       rank_backends, requested_backend, select_backend)
from gptq_plugins.kernels.cpu_int4 import CpuInt4Backend, CpuInt4PrefillCacheBackend
from gptq_plugins.kernels.cpu_int8 import CpuInt8Backend
from gptq_plugins.kernels.dense import DenseBackend
from gptq_plugins.kernels.triton_backend import TritonBackend

BUILTIN_BACKENDS = (TritonBackend(), CpuInt4Backend(), CpuInt8Backend(), CpuInt4PrefillCacheBackend(),
                    DenseBackend())


def builtin_kernel_backends() -> list[KernelBackend]:
    """What the core's `gptq_plugins_kernel_backends` hookimpl returns."""
    return list(BUILTIN_BACKENDS)


__all__ = ["AUTO", "BACKEND_ENV", "BUILTIN_BACKENDS", "BackendUnsupported", "activation_dtype", "announce",
           "requested_backend", "CpuInt4Backend", "CpuInt4PrefillCacheBackend", "CpuInt8Backend",
           "DenseBackend", "KernelBackend", "TritonBackend", "builtin_kernel_backends", "rank_backends",
           "select_backend"]
