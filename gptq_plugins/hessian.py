"""Accumulation of GPTQ's layer Hessian `H = 2/N sum_t x_t x_t^T` from calibration inputs."""

from __future__ import annotations

import logging

import torch

from gptq_plugins.cpu_features import native_bfloat16

log = logging.getLogger("gptq_plugins")

# H is symmetric: each `add` computes only the row strips on and right of the diagonal, which
# costs (k+1)/2k of a full product for k strips (53% for 4096 inputs) at one GEMM per strip.
# 256 measured best from 1024 to 4096 inputs: narrower strips make GEMMs less efficient.
STRIP_COLUMNS = 256


def symmetric_from_upper(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is `upper`'s."""
    return upper.triu() + upper.triu(1).T


class HessianAccumulator:
    """Running Hessian of one Linear's inputs, fed batch by batch from a calibration loop.

    It keeps the unnormalised *sum* of `x x^T` in float64, whatever the inputs' dtype: each
    batch's product (a float32 or bfloat16 GEMM) is added to it, and sums of float32 products in
    float64 come out the same in any order in practice (53 bits hold a float32 product's 24 with
    29 to spare for their spread), so partial sums over shares of the samples (ranks of a
    distributed run) add up to the sum one process computes, bit for bit.

    `matmul_dtype=torch.bfloat16` rounds the inputs and each batch's product to bfloat16 before
    adding it: about 2x faster where bfloat16 GEMMs are (AVX512-BF16/AMX CPUs, GPUs), much slower
    where they are emulated; see benchmarks/solver.py for its error.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, *,
                 matmul_dtype: torch.dtype = torch.float32):
        if matmul_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"matmul_dtype must be torch.float32 or torch.bfloat16, got {matmul_dtype}")
        self.in_features = in_features
        self.matmul_dtype = matmul_dtype
        self.num_tokens = 0
        self._device = device  # None: the device of the first inputs
        self._sum_upper: torch.Tensor | None = None  # upper triangle of sum(x x^T), float64

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the tokens of `x [..., in_features]`; `mask [...]` (0/1) drops padding tokens."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs must have last dimension in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.in_features)
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask must have the shape of the inputs without their last "
                                 f"dimension, {tuple(x.shape[:-1])}, got {tuple(mask.shape)}")
            tokens = tokens[mask.reshape(-1).to(device=tokens.device, dtype=torch.bool)]
        if tokens.shape[0] == 0:
            return
        sum_upper = self.partial_sum(tokens.device)
        tokens = tokens.to(device=sum_upper.device, dtype=self.matmul_dtype)
        for c0 in range(0, self.in_features, STRIP_COLUMNS):
            c1 = c0 + STRIP_COLUMNS
            sum_upper[c0:c1, c0:].add_(tokens[:, c0:c1].T @ tokens[:, c0:])
        self.num_tokens += tokens.shape[0]

    def partial_sum(self, fallback_device=None) -> torch.Tensor:
        """float64 `[in, in]` whose upper triangle is `sum x x^T` over the tokens added so far."""
        if self._sum_upper is None:
            device = self._device if self._device is not None else fallback_device or "cpu"
            self._sum_upper = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        return self._sum_upper

    def hessian(self) -> torch.Tensor:
        """float32 `[in, in]` equal to `2/N sum x x^T` over the N tokens added (zeros if none)."""
        return hessian_from_sum(self.partial_sum(), self.num_tokens)


def hessian_from_sum(sum_upper: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """float32 `2/N sum x x^T` from a `partial_sum` (or several added up) over `num_tokens` tokens."""
    return (symmetric_from_upper(sum_upper) * (2 / max(num_tokens, 1))).float()


class AsymmetryAccumulator:
    """Running `2/N sum_t (r_t - x_t) x_t^T` of GPTAQ: how the float model's inputs `r` to a Linear
    differ from the quantized model's `x`, scaled like the Hessian so the two combine directly.
    Kept as a float64 sum, like `HessianAccumulator`."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.num_tokens = 0
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)

    def add(self, reference: torch.Tensor, x: torch.Tensor) -> None:
        """Add matching tokens: `reference` and `x` are `[..., in_features]` of the same shape."""
        if reference.shape != x.shape or x.shape[-1] != self.in_features:
            raise ValueError(f"float and quantized inputs must both be [..., {self.in_features}], got "
                             f"{tuple(reference.shape)} and {tuple(x.shape)}")
        x = x.reshape(-1, self.in_features).to(device=self._sum.device, dtype=torch.float32)
        delta = reference.reshape(-1, self.in_features).to(x) - x
        self._sum.add_(delta.T @ x)
        self.num_tokens += x.shape[0]

    def partial_sum(self) -> torch.Tensor:
        """float64 `sum (r - x) x^T` over the tokens added so far."""
        return self._sum

    def asymmetry(self) -> torch.Tensor:
        return asymmetry_from_sum(self._sum, self.num_tokens)


def asymmetry_from_sum(total: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """float32 `2/N sum (r - x) x^T` from a `partial_sum` (or several added up) over `num_tokens` tokens."""
    return (total * (2 / max(num_tokens, 1))).float()


def resolve_hessian_dtype(name: str, device: torch.device | str) -> str:
    """`QuantizeConfig.hessian_dtype` made concrete for `device`: `auto` is bfloat16 exactly where
    bfloat16 GEMMs are native there, float32 elsewhere. Asking for bfloat16 where it is emulated is
    kept (results stay reproducible) but warned about: it is slower than float32 there."""
    native = native_bfloat16(device)
    if name == "bfloat16" and not native:
        log.warning("hessian_dtype bfloat16 on %s without native bfloat16 GEMMs: slower than float32 here "
                    "(use auto or float32)", device)
    if name != "auto":
        return name
    return "bfloat16" if native else "float32"
