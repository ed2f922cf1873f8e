"""The exact value grids of GGUF's block types, in the interface the solver quantizes onto.

Scales (and minimums) are rounded to float16 *before* codes are chosen, so the codes the solver
picks are the codes llama.cpp reads, and `values` computes what `gguf`'s dequantizer computes,
operation for operation (float32 products and sums, no fused multiply-add).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_plugins.grid import FLOAT16_MAX, FLOAT16_MIN_SUBNORMAL, dequantize_codes, mse_best, per_leading_dims
from gptq_plugins.gguf_types import GGUF_TYPES, GGUFType


def float16_nearest(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float16 (as llama.cpp stores d and m), kept as float32."""
    return x.clamp(-FLOAT16_MAX, FLOAT16_MAX).half().float()


def _nonzero(d: torch.Tensor) -> torch.Tensor:
    """A block of zeros gets the smallest float16 step instead of d = 0 (codes would be NaN)."""
    return torch.where(d == 0, torch.full_like(d, FLOAT16_MIN_SUBNORMAL), d)


@dataclass(frozen=True)
class SymmetricBlockGrid:
    """Q4_0, Q5_0, Q8_0: value = (code - zero) * d. The block's largest-magnitude weight lands on
    the lowest code, d taking its sign: the one extra negative code serves whichever side is larger."""

    type: GGUFType
    mse_clip: bool = False
    integer_zeros = True

    @property
    def maxq(self) -> int:
        return self.type.maxq

    def _grid(self, extreme: torch.Tensor):
        d = _nonzero(float16_nearest(extreme / -(self.type.zero - self.type.lowest_code)))
        return d, torch.full_like(d, self.type.zero)

    def fit(self, w: torch.Tensor):
        w = w.float()
        extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
        if not self.mse_clip:
            return self._grid(extreme)
        return mse_best(w, lambda factors, rows: self._grid(factors * extreme[rows]), self.codes, self.values)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        scale, zero = per_leading_dims(scale, w), per_leading_dims(zero, w)
        return torch.div(w, scale).round_().add_(zero).clamp_(self.type.lowest_code, self.maxq)

    def values(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize_codes(codes, scale, zero)


@dataclass(frozen=True)
class AffineBlockGrid:
    """Q4_1, Q5_1: value = code * d + m, with `zero` holding the float16 minimum m."""

    type: GGUFType
    mse_clip: bool = False
    integer_zeros = False  # `zero` holds the float16 minimum

    @property
    def maxq(self) -> int:
        return self.type.maxq

    def _grid(self, xmin: torch.Tensor, xmax: torch.Tensor):
        return _nonzero(float16_nearest((xmax - xmin) / self.maxq)), float16_nearest(xmin)

    def fit(self, w: torch.Tensor):
        w = w.float()
        xmin, xmax = w.amin(dim=1), w.amax(dim=1)
        if not self.mse_clip:
            return self._grid(xmin, xmax)
        return mse_best(w, lambda factors, rows: self._grid(factors * xmin[rows], factors * xmax[rows]),
                        self.codes, self.values)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        scale, zero = per_leading_dims(scale, w), per_leading_dims(zero, w)
        return torch.sub(w, zero).div_(scale).round_().clamp_(0, self.maxq)

    def values(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        scale, zero = per_leading_dims(scale, codes), per_leading_dims(zero, codes)
        return torch.mul(codes.float(), scale).add_(zero)


def block_grid(type_name: str, mse_clip: bool = False):
    """The grid of GGUF type `type_name` (a key of `GGUF_TYPES`)."""
    gguf_type = GGUF_TYPES[type_name]
    return (AffineBlockGrid if gguf_type.affine else SymmetricBlockGrid)(gguf_type, mse_clip)
