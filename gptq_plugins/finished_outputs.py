"""Outputs of a block's finished parts, kept per calibration batch and reused by the block's later forwards.

True-sequential GPTQ runs a block once per group of Linears and once more for its outputs. A
direct child of the block (the attention, the MLP) whose Linears are all quantized computes the
same output in every later forward of that block: its weights no longer change, and what feeds it
ran before it, so it holds only Linears of earlier groups, finished too. Its output from the
first forward after it finished is returned again instead of recomputed (bit for bit the same).
"""

from __future__ import annotations

import contextlib

import torch


class FinishedOutputs:
    """Reuse of finished children's outputs in one block's forwards; `installed()` while it runs.

    `finish(name)` marks a Linear (path relative to the block) quantized. Forwards run inside
    `batch(key, keep)`: a finished child returns its output stored under `key`, or computes it
    and, with `keep`, stores it for the next forward (the last forward need not keep any).
    """

    def __init__(self, block: torch.nn.Module, linear_names: list[str]):
        self.block = block
        inside = {name: {linear for linear in linear_names if linear.startswith(name + ".")}
                  for name, _ in block.named_children()}
        self.pending = {name: linears for name, linears in inside.items() if linears}  # Linears not yet done
        self.outputs: dict[str, dict] = {name: {} for name in self.pending}
        self.key, self.keep = None, False

    def finish(self, linear: str) -> None:
        for linears in self.pending.values():
            linears.discard(linear)

    @contextlib.contextmanager
    def batch(self, key, keep: bool):
        self.key, self.keep = key, keep
        try:
            yield
        finally:
            self.key, self.keep = None, False

    @contextlib.contextmanager
    def installed(self):
        """Wrap each child holding Linears; an instance `forward` (accelerate's hooks) is put back."""
        children = {name: self.block.get_submodule(name) for name in self.pending}
        own = {name: child.__dict__.get("forward") for name, child in children.items()}
        for name, child in children.items():
            child.forward = self._reusing(name, child.forward)
        try:
            yield self
        finally:
            for name, child in children.items():
                del child.forward
                if own[name] is not None:
                    child.forward = own[name]
            self.outputs = {name: {} for name in self.pending}

    def _reusing(self, name: str, forward):
        def reusing_forward(*args, **kwargs):
            if self.key is None or self.pending[name]:
                return forward(*args, **kwargs)
            stored = self.outputs[name]
            if self.key not in stored:
                out = forward(*args, **kwargs)
                if not self.keep:
                    return out
                stored[self.key] = out
            return _copy(stored[self.key])  # the caller may change it in place
        return reusing_forward


class NoReuse:
    """For runs that keep nothing beside the hidden states (offloaded activations, one group)."""

    def finish(self, linear: str) -> None:
        pass

    def batch(self, key, keep: bool):
        return contextlib.nullcontext()

    def installed(self):
        return contextlib.nullcontext(self)


NO_REUSE = NoReuse()


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    return value
