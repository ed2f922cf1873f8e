"""What a kernel backend is, and how `QuantLinear` chooses one.

With no backend requested (`auto`), the choice never computes a layer in a lower precision than
its activation dtype, with one documented exception: on devices with native bfloat16 (AVX512-BF16
or AMX CPUs, recent GPUs) a backend may round activations to bfloat16, as PyTorch's CPU int4
kernel does, because there it is several times faster. A backend requested by name (the
`backend=` option of the hosts, or `GPTQ_PLUGINS_BACKEND`) is used as is. Each distinct choice is
logged once per process, with the activation dtype it computes in.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Protocol

import torch

from gptq_plugins.cpu_features import native_bfloat16

log = logging.getLogger("gptq_plugins")

AUTO = "auto"
# A process-wide default for hosts whose users cannot pass options to a quantization method (vLLM).
BACKEND_ENV = "GPTQ_PLUGINS_BACKEND"


class BackendUnsupported(Exception):
    """Raised by `prepare` when a backend cannot serve this particular layer (its shape or
    g_idx); `QuantLinear` then prepares the next candidate."""


class KernelBackend(Protocol):
    """A way to run a packed GPTQ Linear.

    Backends are shared objects: `prepare(layer)` returns the per-layer state (converted
    weights, caches), which `QuantLinear` keeps as `layer.kernel_state` outside its state_dict;
    `apply(layer, x)` computes `x [M, in] @ W.T` (no bias) in x's dtype from that state.
    `activation_dtype(dtype)` says in which dtype it computes layers of activation dtype `dtype`
    (optional: backends without it compute in `dtype`).
    """

    name: str
    priority: int  # higher wins among backends that support a layer

    def supports(self, device_type: str, bits: int, group_size: int, desc_act: bool,
                 dtype: torch.dtype) -> bool: ...

    def prepare(self, layer) -> Any: ...

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor: ...


def activation_dtype(backend: KernelBackend, dtype: torch.dtype) -> torch.dtype:
    """The dtype `backend` computes in for layers whose activations are `dtype`."""
    of = getattr(backend, "activation_dtype", None)
    return of(dtype) if of is not None else dtype


def keeps_precision(backend: KernelBackend, device_type: str, dtype: torch.dtype) -> bool:
    """Whether `auto` may choose `backend`: it computes in `dtype`, or in bfloat16 where that is native."""
    computes_in = activation_dtype(backend, dtype)
    return computes_in == dtype or (computes_in == torch.bfloat16 and native_bfloat16(device_type))


def requested_backend(name: str | None) -> str | None:
    """The backend name to force, from `name` or else `GPTQ_PLUGINS_BACKEND`; None for `auto`."""
    name = name or os.environ.get(BACKEND_ENV) or AUTO
    return None if name == AUTO else name


def rank_backends(candidates: Iterable[KernelBackend], device_type: str, bits: int, group_size: int,
                  desc_act: bool, dtype: torch.dtype, requested: str | None = None) -> list[KernelBackend]:
    """Backends that support the layer, best first (ties keep the candidates' order).

    `requested` keeps only the backend of that name; without it, backends that would lower the
    precision are left out (see the module docstring). Raises ValueError naming the candidates
    when none is left.
    """
    candidates = list(candidates)
    if requested is not None:
        chosen = [b for b in candidates if b.name == requested]
    else:
        chosen = [b for b in candidates if keeps_precision(b, device_type, dtype)]
    supported = [b for b in chosen if b.supports(device_type, bits, group_size, desc_act, dtype)]
    if not supported:
        raise ValueError(f"no kernel backend supports device={device_type} bits={bits} "
                         f"group_size={group_size} desc_act={desc_act} dtype={dtype}; tried "
                         f"{[b.name for b in chosen]}")
    return sorted(supported, key=lambda b: -b.priority)


def select_backend(candidates: Iterable[KernelBackend], device_type: str, bits: int, group_size: int,
                   desc_act: bool, dtype: torch.dtype, requested: str | None = None) -> KernelBackend:
    """The highest-priority backend that supports the layer."""
    return rank_backends(candidates, device_type, bits, group_size, desc_act, dtype, requested)[0]


_announced: set[tuple] = set()


def announce(backend: KernelBackend, device_type: str, bits: int, dtype: torch.dtype, forced: bool) -> None:
    """Log once per process which backend runs `bits`-bit layers of `dtype`, and in what precision.

    A warning (shown by every host) when the activations are rounded below the model's dtype,
    with the way to get the exact computation; an info line otherwise.
    """
    key = (backend.name, device_type, bits, dtype)
    if key in _announced:
        return
    _announced.add(key)
    computes_in = activation_dtype(backend, dtype)
    how = "as requested" if forced else "chosen automatically"
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    if computes_in != dtype:
        log.warning("gptq_plugins: %d-bit layers on %s run on the %s kernel (%s) with %s activations, not %s: "
                    "faster, and close to but not exactly a %s computation; backend='dense' (or %s=dense) "
                    "computes in %s", bits, device_type, backend.name, how, name(computes_in), name(dtype),
                    name(dtype), BACKEND_ENV, name(dtype))
    else:
        log.info("gptq_plugins: %d-bit layers on %s run on the %s kernel (%s) in %s", bits, device_type,
                 backend.name, how, name(dtype))
