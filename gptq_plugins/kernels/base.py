"""What a kernel backend is, and how `QuantLinear` chooses one."""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch


class BackendUnsupported(Exception):
    """Raised by `prepare` when a backend cannot serve this particular layer (its shape or
    g_idx); `QuantLinear` then prepares the next candidate."""


class KernelBackend(Protocol):
    """A way to run a packed GPTQ Linear.

    Backends are shared objects: `prepare(layer)` returns the per-layer state (converted
    weights, caches), which `QuantLinear` keeps as `layer.kernel_state` outside its state_dict;
    `apply(layer, x)` computes `x [M, in] @ W.T` (no bias) in x's dtype from that state.
    """

    name: str
    priority: int  # higher wins among backends that support a layer

    def supports(self, device_type: str, bits: int, group_size: int, desc_act: bool,
                 dtype: torch.dtype) -> bool: ...

    def prepare(self, layer) -> Any: ...

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor: ...


def rank_backends(candidates: Iterable[KernelBackend], device_type: str, bits: int, group_size: int,
                  desc_act: bool, dtype: torch.dtype) -> list[KernelBackend]:
    """Backends that support the layer, best first (ties keep the candidates' order).

    Raises ValueError naming the candidates when none does.
    """
    candidates = list(candidates)
    supported = [b for b in candidates if b.supports(device_type, bits, group_size, desc_act, dtype)]
    if not supported:
        raise ValueError(f"no kernel backend supports device={device_type} bits={bits} "
                         f"group_size={group_size} desc_act={desc_act} dtype={dtype}; tried "
                         f"{[b.name for b in candidates]}")
    return sorted(supported, key=lambda b: -b.priority)


def select_backend(candidates: Iterable[KernelBackend], device_type: str, bits: int, group_size: int,
                   desc_act: bool, dtype: torch.dtype) -> KernelBackend:
    """The highest-priority backend that supports the layer."""
    return rank_backends(candidates, device_type, bits, group_size, desc_act, dtype)[0]
