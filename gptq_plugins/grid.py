"""The per-row integer grid (scale and zero point) that GPTQ quantizes onto.

Project rules on top of GPTQ's `Quantizer.find_params`:
- scales are float16-representable (the artifact stores them as float16, so the solver must
  quantize against exactly the stored value) and rounded *up*, so a row's range stays on the grid;
- zero points lie in [1, maxq], because the v1 checkpoint stores `zero - 1` as an unsigned code;
- rows that are all zero (or nearly so) get the smallest float16 scale instead of NaN or 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT16_MAX = 65504.0
FLOAT16_MIN_SUBNORMAL = 2.0 ** -24
MSE_NORM = 2.4  # GPTQ's `mse` option: an error norm between L2 and L-inf
MSE_SHRINK_FACTORS = torch.linspace(1.0, 0.5, 51)  # range shrink factors tried by `mse_clip`
# Range factors an importance-weighted search tries (each also refitted by least squares): a
# little past the range too, as llama.cpp's `make_qx_quants` does, since a refit can pull back in.
IMPORTANCE_FACTORS = torch.arange(60, 29, -1) / 50  # 1.2 down to 0.6, exactly 1.0 among them
# Trials ([factors, rows, cols]) per chunk: 1 MiB stays in cache, 2.3x faster than 64 MiB.
MSE_CHUNK_ELEMENTS = 1 << 18


def _float16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16-representable value >= x (clamped to float16's positive finite range)."""
    x = x.clamp(FLOAT16_MIN_SUBNORMAL, FLOAT16_MAX)
    nearest = x.half()
    up = torch.nextafter(nearest, torch.tensor(float("inf"), dtype=torch.float16))
    return torch.where(nearest.float() < x, up, nearest).float()


def _grid_for_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    """Scale and zero point covering [xmin, xmax] (xmin <= 0 <= xmax), elementwise."""
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        # The grid is [-(maxq+1)/2, (maxq-1)/2] * scale; the row max lands on its half-step edge.
        scale = _float16_ceil(2 * xmax / maxq)
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    scale = _float16_ceil((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale)
    # Zero 0 cannot be stored; at zero 1 the top code maxq must still reach the row max.
    at_zero = zero < 1
    if at_zero.any():
        scale = torch.where(at_zero, _float16_ceil(torch.maximum(scale, xmax / (maxq - 1))), scale)
        zero = zero.clamp(min=1)
    return scale, zero


def find_params(w: torch.Tensor, bits: int, sym: bool, mse_clip: bool = False):
    """Per-row `(scale [rows], zero [rows])` as float32 for `w [rows, cols]`.

    `mse_clip` shrinks each row's range by the factor (from 1.0 down to 0.5) that minimises
    `sum |q(w) - w|^2.4`, as GPTQ's `mse` option does: clipping a few outliers buys a finer
    grid for the rest of the row.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.amin(dim=1), zeros)
    xmax = torch.maximum(w.amax(dim=1), zeros)
    if not mse_clip:
        return _grid_for_range(xmin, xmax, maxq, sym)
    return search_grid(w, lambda factors, rows: _grid_for_range(factors * xmin[rows], factors * xmax[rows], maxq, sym),
                       lambda trial, scale, zero: round_to_grid(trial, scale, zero, maxq), dequantize_codes)


def search_grid(w: torch.Tensor, grid_at, codes, values, factors: torch.Tensor = MSE_SHRINK_FACTORS,
                importance: torch.Tensor | None = None, refit=None):
    """Per row of `w [rows, cols]`, the `(scale, zero)` among `grid_at(factors [F, 1], rows)`'s
    grids (one per range factor) whose values `values(codes(w, s, z), s, z)` fit `w` best.

    Without `importance`: the error is GPTQ's `mse` norm, `sum |q(w) - w|^2.4`. With it (one
    weight per column, e.g. the Hessian diagonal): `sum_j importance_j (q(w_j) - w_j)^2`, the
    output error those columns cause, and `refit(w, scale, zero, importance, rows)` adds each
    grid's least-squares refit on its own codes as one more candidate.
    """
    factors = factors.to(w.device)[:, None]
    weight = None if importance is None else importance.float().to(w.device)
    rows_per_chunk = max(1, MSE_CHUNK_ELEMENTS // (len(factors) * w.shape[1]))
    scales, zero_points = [], []
    for r0 in range(0, w.shape[0], rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        scale, zero = grid_at(factors, rows)
        trial = w[rows].unsqueeze(0)  # [1, rows, cols] against [factors, rows] grids
        if refit is not None:
            refitted = refit(trial, scale, zero, weight, rows)
            scale, zero = torch.cat([scale, refitted[0]]), torch.cat([zero, refitted[1]])
        error = values(codes(trial, scale, zero), scale, zero) - trial
        error = error.abs_().pow_(MSE_NORM) if weight is None else error.square_().mul_(weight)
        best = error.sum(dim=2).argmin(dim=0, keepdim=True)
        scales.append(scale.gather(0, best)[0])
        zero_points.append(zero.gather(0, best)[0])
    return torch.cat(scales), torch.cat(zero_points)


def least_squares_scale(w: torch.Tensor, steps: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Per leading index, the `d` minimising `sum_j importance_j (w_j - d * steps_j)^2` (NaN where
    all steps are 0: the caller keeps its own scale there)."""
    weighted = steps * importance
    return (weighted * w).sum(dim=-1) / weighted.mul(steps).sum(dim=-1)


def least_squares_line(w: torch.Tensor, codes: torch.Tensor, importance: torch.Tensor):
    """Per leading index, `(d, m)` minimising `sum_j importance_j (w_j - d * codes_j - m)^2`
    (NaN where all codes are equal)."""
    total = importance.expand_as(codes).sum(dim=-1)
    sum_c, sum_w = (importance * codes).sum(dim=-1), (importance * w).sum(dim=-1)
    sum_cc, sum_cw = (importance * codes * codes).sum(dim=-1), (importance * codes * w).sum(dim=-1)
    det = total * sum_cc - sum_c * sum_c
    return (total * sum_cw - sum_c * sum_w) / det, (sum_cc * sum_w - sum_c * sum_cw) / det


def per_leading_dims(param: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """View `param` (shaped like w's leading dims) so it broadcasts over w's trailing dims."""
    trailing = w.dim() - param.dim()
    return param.reshape(param.shape + (1,) * trailing) if trailing else param


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes as float32 values; the solver's column loop stays in float to skip conversions."""
    scale, zero = per_leading_dims(scale, w), per_leading_dims(zero, w)
    return torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """int32 codes in [0, maxq]; `scale`/`zero` are shaped like w's leading dims (e.g. [rows])."""
    return round_to_grid(w.float(), scale, zero, maxq).to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 `(codes - zero) * scale`, with `scale`/`zero` shaped like codes' leading dims."""
    return torch.sub(codes.float(), per_leading_dims(zero, codes)).mul_(per_leading_dims(scale, codes))


@dataclass(frozen=True)
class IntegerGrid:
    """GPTQ v1's grid, as the solver uses any grid: `fit` a group's columns, `codes` of a column,
    `values` of codes. value = (code - zero) * scale, integer zero points in [1, maxq]."""

    bits: int
    sym: bool
    mse_clip: bool = False
    integer_zeros = True  # zero points are stored as integers

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def bind(self, _weight: torch.Tensor) -> "IntegerGrid":
        """The grid for one weight (grids whose parameters span groups fix them here)."""
        return self

    def fit(self, w: torch.Tensor, _group: int = 0, _importance: torch.Tensor | None = None):
        """`(scale, zero)` per row for the columns `w [rows, cols]` of group `_group`. The
        columns' `_importance` is not used: v1 keeps GPTQ's reference grid arithmetic."""
        return find_params(w, self.bits, self.sym, self.mse_clip)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return round_to_grid(w, scale, zero, self.maxq)

    def values(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize_codes(codes, scale, zero)
