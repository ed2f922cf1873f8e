"""`QuantLinear`: a Linear stored in the GPTQ v1 layout, run by a pluggable kernel backend.

Its buffers carry the checkpoint names (`qweight, qzeros, scales, g_idx, bias`), so a state_dict
with keys `<module>.qweight` etc. loads as is. Whatever a backend derives from them (converted
or dequantized weights) is kept outside the state_dict and rebuilt when the buffers move or are
reloaded. A backend whose state holds the codes exactly (it has `checkpoint_qweight(layer)`, as
the CPU int4/int8 kernels) lets the layer drop its `qweight` buffer, so the weight is resident
once; `state_dict`, `dequantize` and a re-prepare rebuild it from the kernel's state.
"""

from __future__ import annotations

import torch

from gptq_plugins.config import ConfigError, QuantizeConfig
from gptq_plugins.kernels import (AUTO, BackendUnsupported, announce, builtin_kernel_backends, rank_backends,
                                 requested_backend)
from gptq_plugins.kernels.base import log
from gptq_plugins.packing import dequantize_packed, pack_quantized


def kernel_backends() -> list:
    """Every backend offered through the `gptq_plugins_kernel_backends` hook, core's included."""
    try:
        from gptq_plugins.plugins import get_plugin_manager
    except ImportError:  # plugin machinery unavailable: the core's own backends still work
        return builtin_kernel_backends()
    # pluggy lists later-registered plugins first, so they win priority ties.
    return [backend for provided in get_plugin_manager().hook.gptq_plugins_kernel_backends()
            for backend in provided]


def check_backend(name: str | None) -> None:
    """Raise `ConfigError` unless `name` is None, `auto` or the name of an installed backend."""
    names = [backend.name for backend in kernel_backends()]
    if name is not None and name != AUTO and name not in names:
        raise ConfigError("backend", f"expected {AUTO!r} or one of {names}, got {name!r}")


def planned_backend(device_type: str, bits: int, group_size: int, desc_act: bool, dtype: torch.dtype,
                    backend: str | None = None):
    """The backend `post_init` would try first for such a layer (a shape it declines falls further)."""
    forced = requested_backend(backend)
    check_backend(forced)
    return rank_backends(kernel_backends(), device_type, bits, group_size, desc_act, dtype, requested=forced)[0]


# Hooks are module-level functions, so layers stay picklable.
def _forget_kernel_after_load(module: "QuantLinear", incompatible_keys) -> None:
    """load_state_dict post-hook: the kernel's state is of the weights before the load."""
    module._forget_kernel()


def _qweight_buffer_for_load(module: "QuantLinear", state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a dropped `qweight` becomes a buffer again, to be loaded into."""
    module._restore_qweight()


def _qweight_into_state_dict(module: "QuantLinear", prefix, keep_vars) -> None:
    """state_dict pre-hook: the checkpoint's `qweight`, rebuilt if the layer dropped it."""
    module._rebuilt_for_state_dict = module._restore_qweight()


def _drop_qweight_after_state_dict(module: "QuantLinear", state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: drop again what `_qweight_into_state_dict` rebuilt (the state_dict keeps it)."""
    if module._rebuilt_for_state_dict:
        module._buffers["qweight"], module._rebuilt_for_state_dict = None, False


class QuantLinear(torch.nn.Module):
    """`y = x @ W.T + bias` with W packed as GPTQ v1; `dtype` is the activation dtype expected."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, dtype: torch.dtype = torch.float16):
        super().__init__()
        config = QuantizeConfig(bits=bits, group_size=group_size)  # validates bits and group_size
        config.check_layer(in_features, out_features, "QuantLinear")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        n_groups = config.groups_for(in_features)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", self._static_g_idx())
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.backend = None
        self.kernel_state = None
        self.requested_backend = None  # name given to post_init, kept across re-prepares
        self._prepared_for = None  # identity of the buffers the kernel state was built from
        self._rebuilt_for_state_dict = False
        self.register_load_state_dict_pre_hook(_qweight_buffer_for_load)
        self.register_load_state_dict_post_hook(_forget_kernel_after_load)
        self.register_state_dict_pre_hook(_qweight_into_state_dict)
        self.register_state_dict_post_hook(_drop_qweight_after_state_dict)

    @classmethod
    def from_quantized(cls, qw, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """A layer holding a solver `QuantizedWeight` (packed on its device)."""
        out_features, in_features = qw.codes.shape
        layer = cls(in_features, out_features, qw.bits, qw.group_size, bias=bias is not None,
                    dtype=dtype).to(qw.codes.device)
        for name, tensor in pack_quantized(qw).items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def _static_g_idx(self, device=None) -> torch.Tensor:
        """g_idx without act-order: contiguous groups."""
        group = self.in_features if self.group_size == -1 else self.group_size
        return (torch.arange(self.in_features, device=device) // group).to(torch.int32)

    @property
    def desc_act(self) -> bool:
        """Whether g_idx is permuted (act-order), i.e. not `arange(in) // group_size`."""
        return not torch.equal(self.g_idx, self._static_g_idx(self.g_idx.device))

    def _forget_kernel(self) -> None:
        self.backend, self.kernel_state, self._prepared_for = None, None, None

    def post_init(self, backend: str | None = None) -> None:
        """Choose the kernel backend for the buffers' device and prepare it, once.

        `backend` forces one by name (remembered; `auto`, the default, chooses; see
        `gptq_plugins.kernels.base`). `forward` calls this itself when the layer was never
        prepared, or was moved or reloaded since.
        """
        forced = requested_backend(backend or self.requested_backend)
        check_backend(forced)
        self.requested_backend = backend or self.requested_backend
        self._restore_qweight()  # prepare from the codes, whichever backend comes next
        device_type = self.qweight.device.type
        ranked = rank_backends(kernel_backends(), device_type, self.bits, self.group_size, self.desc_act,
                               self.dtype, requested=forced)
        declined = []
        for candidate in ranked:
            try:
                state = candidate.prepare(self)
            except BackendUnsupported as why:
                declined.append(f"{candidate.name}: {why}")
                continue
            self.backend, self.kernel_state = candidate, state
            if hasattr(candidate, "checkpoint_qweight"):  # the state holds the codes: keep them once
                self._buffers["qweight"] = None
            self._prepared_for = self._buffers_identity()
            if declined:  # e.g. cpu_int4 on groups no sub-group length divides
                log.info("gptq_plugins: a %dx%d layer runs on %s; declined: %s", self.out_features,
                         self.in_features, candidate.name, "; ".join(declined))
            announce(candidate, device_type, self.bits, self.dtype, forced is not None)
            return
        raise ValueError(f"no kernel backend could prepare this layer: {declined}")

    def _buffers_identity(self):
        """Changes when the buffers move or are replaced (in-place loads go through the hook)."""
        held = (self._buffers["qweight"], self.qzeros, self.scales, self.g_idx)
        return tuple((t.device, t.data_ptr()) if t is not None else None for t in held)

    def _restore_qweight(self) -> bool:
        """Make `qweight` a buffer again if it was dropped; returns whether it was."""
        if self._buffers["qweight"] is not None:
            return False
        self._buffers["qweight"] = self.checkpoint_qweight()
        return True

    def checkpoint_qweight(self) -> torch.Tensor:
        """The packed codes: the `qweight` buffer, or rebuilt from the kernel state that holds them."""
        qweight = self._buffers["qweight"]
        if qweight is not None:
            return qweight
        return self.backend.checkpoint_qweight(self).to(self.qzeros.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None or self._prepared_for != self._buffers_identity():
            self.post_init()
        y = self.backend.apply(self, x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """float32 `[out, in]` weight (the reference dequantization)."""
        return dequantize_packed(self.checkpoint_qweight(), self.qzeros, self.scales, self.g_idx, self.bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"backend={self.backend.name if self.backend else None}")
