"""The layers GPTQ quantizes, seen as `y = x @ W.T + b` with `W [out, in]` whatever their class.

`torch.nn.Linear` stores W as it is; Transformers' `Conv1D` (GPT-2) stores it transposed,
`[in, out]`, and computes `y = x @ W + b`. The solver, the Hessians and the artifact always see
the `[out, in]` weight; only this module knows how each class holds it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

QUANTIZABLE = "torch.nn.Linear or Transformers' Conv1D"


class Features(NamedTuple):
    """A quantizable layer's input and output widths."""

    in_features: int
    out_features: int


def _is_conv1d(layer: torch.nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # without Transformers there is no Conv1D to meet
        return False
    return isinstance(layer, Conv1D)


def is_quantizable(layer: torch.nn.Module) -> bool:
    """Whether `layer` is a Linear the pipeline can quantize (`QUANTIZABLE`)."""
    return isinstance(layer, torch.nn.Linear) or _is_conv1d(layer)


def features(layer: torch.nn.Module) -> Features:
    """`(in_features, out_features)` of a quantizable layer."""
    if isinstance(layer, torch.nn.Linear):
        return Features(layer.in_features, layer.out_features)
    if _is_conv1d(layer):
        return Features(layer.weight.shape[0], layer.nf)
    raise TypeError(f"{type(layer).__name__} is not a quantizable layer; expected {QUANTIZABLE}")


def read_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as `[out, in]` (a view of the stored tensor, no copy)."""
    features(layer)  # refuses other layers
    return layer.weight.data.T if _is_conv1d(layer) else layer.weight.data


def write_weight(layer: torch.nn.Module, value: torch.Tensor) -> None:
    """Replace the layer's weight by `value [out, in]`, stored in the layer's own orientation and dtype."""
    in_features, out_features = features(layer)
    if tuple(value.shape) != (out_features, in_features):
        raise ValueError(f"{type(layer).__name__} weight: expected [{out_features}, {in_features}] "
                         f"([out, in]), got {list(value.shape)}")
    stored = value.T.contiguous() if _is_conv1d(layer) else value
    layer.weight.data = stored.to(dtype=layer.weight.dtype, device=layer.weight.device)
