"""The exact value grids of GGUF's block types, in the interface the solver quantizes onto.

Scales (and minimums) are rounded to float16 *before* codes are chosen, so the codes the solver
picks are the codes llama.cpp reads, and `values` computes what `gguf`'s dequantizer computes,
operation for operation (float32 products and sums, no fused multiply-add).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_plugins.grid import (FLOAT16_MAX, FLOAT16_MIN_SUBNORMAL, IMPORTANCE_FACTORS, dequantize_codes,
                               least_squares_line, least_squares_scale, per_leading_dims, search_grid)
from gptq_plugins.gguf_types import GGUFType, base_type


def float16_nearest(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float16 (as llama.cpp stores d and m), kept as float32."""
    return x.clamp(-FLOAT16_MAX, FLOAT16_MAX).half().float()


def _nonzero(d: torch.Tensor) -> torch.Tensor:
    """A block of zeros gets the smallest float16 step instead of d = 0 (codes would be NaN)."""
    return torch.where(d == 0, torch.full_like(d, FLOAT16_MIN_SUBNORMAL), d)


def _or_kept(refitted: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A least-squares refit where it is defined and keeps the step's sign, else the grid it refits."""
    return torch.where(torch.isfinite(refitted) & (refitted * kept > 0), refitted, kept)


def _line_or_kept(line, scale: torch.Tensor, zero: torch.Tensor):
    """A least-squares `(step, offset)` where it is defined with a positive step, else `(scale, zero)`."""
    d, m = line
    refitted = torch.isfinite(d) & torch.isfinite(m) & (d > 0)
    return torch.where(refitted, d, scale), torch.where(refitted, m, zero)


def _fit(grid, w: torch.Tensor, grid_at, refit, importance: torch.Tensor | None):
    """`(scale, zero)` per row of `w`: with the columns' importance, the best of a range of grids
    and their weighted least-squares `refit`s (as llama.cpp's importance-matrix quantizer
    searches); without, the full range, or GPTQ's `mse` search with `mse_clip`."""
    if importance is not None:
        return search_grid(w, grid_at, grid.codes, grid.values, IMPORTANCE_FACTORS, importance, refit)
    if not grid.mse_clip:
        scale, zero = grid_at(torch.ones((1, 1), device=w.device), slice(None))
        return scale[0], zero[0]
    return search_grid(w, grid_at, grid.codes, grid.values)


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

    def fit(self, w: torch.Tensor, _group: int = 0, importance: torch.Tensor | None = None):
        w = w.float()
        extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
        return _fit(self, w, lambda factors, rows: self._grid(factors * extreme[rows]), self.refit, importance)

    def refit(self, w, scale, zero, importance, _rows):
        """Each grid's float16 step refitted by least squares to its own codes (zero stays)."""
        d = least_squares_scale(w, self.codes(w, scale, zero) - self.type.zero, importance)
        return _nonzero(float16_nearest(_or_kept(d, scale))), zero

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

    def fit(self, w: torch.Tensor, _group: int = 0, importance: torch.Tensor | None = None):
        w = w.float()
        xmin, xmax = w.amin(dim=1), w.amax(dim=1)
        return _fit(self, w, lambda factors, rows: self._grid(factors * xmin[rows], factors * xmax[rows]),
                    self.refit, importance)

    def refit(self, w, scale, zero, importance, _rows):
        """Each grid's float16 step and minimum refitted by least squares to its own codes."""
        d, m = _line_or_kept(least_squares_line(w, self.codes(w, scale, zero), importance), scale, zero)
        return _nonzero(float16_nearest(d)), float16_nearest(m)

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

    def fit(self, w: torch.Tensor, group: int, importance: torch.Tensor | None = None):
        w = w.float()
        return _fit(self, w, lambda factors, rows: self._on_lattice(*self._ideal(w[rows].unsqueeze(0), factors),
                                                                    group, rows),
                    lambda *args: self.refit(*args, group), importance)

    def refit(self, w, scale, zero, importance, rows, group):
        """Each grid's sub-block scale (and minimum) refitted by least squares to its own codes,
        then put back on the super-block's lattice."""
        codes = self.codes(w, scale, zero)
        if not self.type.affine:
            return self._on_lattice(_or_kept(least_squares_scale(w, codes - zero[..., None], importance), scale),
                                    None, group, rows)
        d, m = _line_or_kept(least_squares_line(w, codes, importance), scale, zero)
        return self._on_lattice(d, -m, group, rows)

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
