"""The exact value grids of GGUF's block types, in the interface the solver quantizes onto.

Scales (and minimums) are rounded to float16 *before* codes are chosen, so the codes the solver
picks are the codes llama.cpp reads, and `values` computes what `gguf`'s dequantizer computes,
operation for operation (float32 products and sums, no fused multiply-add).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_plugins.grid import FLOAT16_MAX, FLOAT16_MIN_SUBNORMAL, dequantize_codes, mse_best, per_leading_dims
from gptq_plugins.gguf_types import GGUFType, base_type


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

    def bind(self, _weight: torch.Tensor) -> "SymmetricBlockGrid":
        return self

    def fit(self, w: torch.Tensor, _group: int = 0):
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

    def bind(self, _weight: torch.Tensor) -> "AffineBlockGrid":
        return self

    def fit(self, w: torch.Tensor, _group: int = 0):
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


@dataclass(frozen=True, eq=False)
class SuperBlockGrid:
    """Q4_K, Q5_K (affine) and Q6_K (symmetric): a sub-block's scale is `d * sc`, its minimum
    `dmin * m`, with small integers `sc`, `m` and float16 `d`, `dmin` per super-block of 256 inputs.

    `bind(weight)` fixes `d` (and `dmin`) of every super-block from the weight before GPTQ runs
    (so any column order works); each sub-block's `sc`/`m` are chosen from the updated weights when
    its first column comes up, on that lattice. `scale`/`zero` handed to the solver are the
    effective `d * sc` and `-(dmin * m)` (Q6_K: the fixed zero code 32), computed as `gguf` does.
    """

    type: GGUFType
    mse_clip: bool = False
    super_scales: torch.Tensor | None = None  # [out, n_super] d
    super_mins: torch.Tensor | None = None    # [out, n_super] dmin (affine types)

    @property
    def maxq(self) -> int:
        return self.type.maxq

    @property
    def integer_zeros(self) -> bool:
        return not self.type.affine

    @property
    def _per_super(self) -> int:
        return self.type.super_block // self.type.block_size

    def _ideal(self, w: torch.Tensor, factors=1.0):
        """Each row's unconstrained sub-block scale (and minimum as a positive number)."""
        if self.type.affine:
            xmin = torch.minimum(w.amin(dim=-1), torch.zeros((), device=w.device)) * factors
            xmax = torch.maximum(w.amax(dim=-1), torch.zeros((), device=w.device)) * factors
            return (xmax - xmin) / self.maxq, -xmin
        extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))[..., 0] * factors
        return extreme / -self.type.zero, None

    def bind(self, weight: torch.Tensor) -> "SuperBlockGrid":
        out_features, in_features = weight.shape
        subs = weight.float().reshape(out_features, -1, self._per_super, self.type.block_size)
        scale, minimum = self._ideal(subs)  # [out, n_super, per_super]
        top = self.type.scale_levels[1]
        d = _nonzero(float16_nearest(scale.abs().amax(dim=-1) / top))
        dmin = None if minimum is None else _nonzero(float16_nearest(minimum.amax(dim=-1) / top))
        return SuperBlockGrid(self.type, self.mse_clip, d, dmin)

    def _on_lattice(self, scale, minimum, group: int, rows=slice(None)):
        """The nearest lattice point `(d * sc, -(dmin * m))` (Q6_K: `(d * sc, 32)`) of `rows`."""
        low, high = self.type.scale_levels
        d = self.super_scales[rows, group // self._per_super]
        # A zero scale would make codes NaN: affine scales start at 1, Q6_K's skip 0.
        sc = torch.round(scale / d).clamp_(max(low, 1) if self.type.affine else low, high)
        if not self.type.affine:
            return d * torch.where(sc == 0, torch.ones_like(sc), sc), torch.full_like(sc, self.type.zero)
        dmin = self.super_mins[rows, group // self._per_super]
        return d * sc, -(dmin * torch.round(minimum / dmin).clamp_(0, high))

    def fit(self, w: torch.Tensor, group: int):
        w = w.float()
        if not self.mse_clip:
            return self._on_lattice(*self._ideal(w), group)
        return mse_best(w, lambda factors, rows: self._on_lattice(*self._ideal(w[rows].unsqueeze(0), factors),
                                                                  group, rows), self.codes, self.values)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        scale, zero = per_leading_dims(scale, w), per_leading_dims(zero, w)
        if self.type.affine:
            return torch.sub(w, zero).div_(scale).round_().clamp_(0, self.maxq)
        return torch.div(w, scale).round_().add_(zero).clamp_(0, self.maxq)

    def values(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        if self.type.affine:
            scale, zero = per_leading_dims(scale, codes), per_leading_dims(zero, codes)
            return torch.mul(codes.float(), scale).add_(zero)
        return dequantize_codes(codes, scale, zero)


def block_grid(type_name: str, mse_clip: bool = False):
    """The grid of GGUF type `type_name` (a mixture: its base type's); `bind` it to a weight before use."""
    gguf_type = base_type(type_name)
    if gguf_type.super_block:
        return SuperBlockGrid(gguf_type, mse_clip)
    return (AffineBlockGrid if gguf_type.affine else SymmetricBlockGrid)(gguf_type, mse_clip)
