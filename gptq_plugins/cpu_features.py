"""What the CPU can do, for the choices that depend on it (bfloat16 Hessians, kernel activations).

Two kinds are common: x86 with AVX-512 and native bfloat16 (AVX512-BF16, AMX: Sapphire Rapids and
later, Zen 4 and later) and AVX2-only parts (Zen 3, older Xeons), where bfloat16 arithmetic is
emulated. The flags come from `/proc/cpuinfo`; a CPU counts as having native bfloat16 only if
PyTorch also dispatches to its AVX-512 kernels, so `ATEN_CPU_CAPABILITY=avx2` makes this machine
behave as the AVX2 kind (for tests and benchmarks of that path).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

# The flags that change what runs fast, as /proc/cpuinfo spells them.
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                  "amx_tile", "amx_bf16", "amx_int8")
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's model name, its relevant flags and the kernels PyTorch dispatches to."""

    model: str
    flags: tuple[str, ...]  # those of RELEVANT_FLAGS present
    torch_capability: str   # e.g. "AVX512", "AVX2", "DEFAULT" (torch.backends.cpu)

    @property
    def native_bfloat16(self) -> bool:
        """bfloat16 dot products in hardware, and PyTorch's AVX-512 kernels in use to reach them."""
        return any(f in self.flags for f in BFLOAT16_FLAGS) and self.torch_capability.startswith("AVX512")

    @property
    def kind(self) -> str:
        """A short name for reports: 'AVX-512 + bfloat16', 'AVX-512', 'AVX2' or the machine."""
        if self.torch_capability.startswith("AVX512"):
            return "AVX-512 + bfloat16" if self.native_bfloat16 else "AVX-512"
        if self.torch_capability == "AVX2":
            return "AVX2"
        return platform.machine() or "unknown"

    def as_dict(self) -> dict:
        """JSON-clean, for benchmark results and reports."""
        return {"model": self.model, "flags": list(self.flags), "torch_capability": self.torch_capability,
                "kind": self.kind, "native_bfloat16": self.native_bfloat16}


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo's first processor; ('', set()) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


@functools.cache
def cpu_features() -> CpuFeatures:
    model, flags = _cpuinfo()
    return CpuFeatures(model=model or platform.processor() or platform.machine(),
                       flags=tuple(f for f in RELEVANT_FLAGS if f in flags),
                       torch_capability=torch.backends.cpu.get_cpu_capability())


def native_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matrix products run in hardware on `device` (GPUs from Ampere on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_features().native_bfloat16
