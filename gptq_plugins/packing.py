"""The GPTQ v1 ("gptq") checkpoint layout, as torch reference code.

Integer codes are packed into int32 words as a little-endian bit stream along one dimension:
value ``i`` occupies stream bits ``[i*bits, (i+1)*bits)`` and word ``w`` holds stream bits
``[32w, 32w+32)``, so 3-bit values cross word boundaries (32 values fill 3 words). A layer
stores ``qweight = pack_rows(codes.T)`` ``[in*bits/32, out]``, ``qzeros = pack_rows((zeros -
1).T).T`` ``[n_groups, out*bits/32]``, ``scales`` float16 ``[n_groups, out]`` and ``g_idx``
int32 ``[in]``; readers compute ``w = scales[g_idx] * (code - (stored_zero + 1))``.

Every kernel in ``gptq_plugins.kernels`` must be bit-identical to these functions.
"""

from __future__ import annotations

import torch

from gptq_plugins.config import SUPPORTED_BITS
from gptq_plugins.packed_words import WORD_BITS, packing_period, whole_words_problem


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: expected one of {list(SUPPORTED_BITS)}, got {bits!r}")
    return bits


def check_codes(values: torch.Tensor, bits: int, name: str, low: int = 0) -> None:
    """Raise ValueError naming `name` unless `values` are integers in [low, low + 2**bits - 1]."""
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got {values.dtype}")
    if values.numel():
        high = low + (1 << bits) - 1
        lo, hi = (int(x) for x in torch.aminmax(values))
        if lo < low or hi > high:
            raise ValueError(f"{name}: {bits}-bit values must lie in [{low}, {high}], "
                             f"found [{lo}, {hi}]")


def _check_packable_length(n: int, bits: int, name: str) -> None:
    problem = whole_words_problem(n, bits, f"{name}: {n} values",
                                  f" (need a multiple of {packing_period(bits)[0]})")
    if problem:
        raise ValueError(problem)


def check_packable(values: torch.Tensor, bits: int, low: int = 0) -> tuple[int, int]:
    """Validate `values [n, m]` (in [low, low + 2**bits - 1]) for packing along dim 0."""
    check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"values: expected a 2-D tensor [n, m], got shape {tuple(values.shape)}")
    n, m = values.shape
    _check_packable_length(n, bits, "values")
    check_codes(values, bits, "values", low)
    return n, m


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer `values [n, m]` (0..2**bits-1) along dim 0 into int32 `[n*bits/32, m]`."""
    n, m = check_packable(values, bits)
    period_values, period_words = packing_period(bits)
    # int32 arithmetic (torch's left shift wraps into the sign bit like uint32 would), in place
    # into buffers allocated once: fresh large tensors cost more than the bit operations.
    v = values.to(torch.int32).reshape(n // period_values, period_values, m)
    words = torch.zeros(n // period_values, period_words, m, dtype=torch.int32, device=values.device)
    shifted = torch.empty_like(v[:, 0])
    for j in range(period_values):  # one vectorised step per position inside a period
        word, offset = divmod(j * bits, WORD_BITS)
        words[:, word] |= torch.bitwise_left_shift(v[:, j], offset, out=shifted)
        if offset + bits > WORD_BITS:  # the value's high bits start the next word
            words[:, word + 1] |= torch.bitwise_right_shift(v[:, j], WORD_BITS - offset, out=shifted)
    return words.reshape(-1, m)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 `[n*bits/32, m]` -> int32 `[n, m]`."""
    check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed: expected a 2-D int32 tensor, got {packed.dtype} of shape "
                         f"{tuple(packed.shape)}")
    _check_packable_length(n, bits, "n")
    if packed.shape[0] != n * bits // WORD_BITS:
        raise ValueError(f"packed: {n} values of {bits} bits need {n * bits // WORD_BITS} rows, "
                         f"got {packed.shape[0]}")
    m = packed.shape[1]
    period_values, period_words = packing_period(bits)
    words = packed.reshape(n // period_values, period_words, m)
    out = torch.empty(n // period_values, period_values, m, dtype=torch.int32, device=packed.device)
    high = torch.empty_like(words[:, 0])
    for j in range(period_values):
        word, offset = divmod(j * bits, WORD_BITS)
        # Arithmetic shift: bits above 32 - offset are sign copies, cleared by the masks below.
        value = torch.bitwise_right_shift(words[:, word], offset, out=out[:, j])
        if offset + bits > WORD_BITS:
            low_bits = WORD_BITS - offset
            value &= (1 << low_bits) - 1
            value |= torch.bitwise_left_shift(words[:, word + 1], low_bits, out=high)
        value &= (1 << bits) - 1
    return out.reshape(n, m)


def check_quantized(qw) -> None:
    """Validate a `QuantizedWeight`'s tensors against each other before packing."""
    bits = check_bits(qw.bits)
    out_features, in_features = qw.codes.shape
    n_groups = qw.scales.shape[0]
    if qw.scales.shape != (n_groups, out_features) or qw.zeros.shape != (n_groups, out_features):
        raise ValueError(f"scales/zeros: expected [n_groups, {out_features}], got "
                         f"{tuple(qw.scales.shape)} and {tuple(qw.zeros.shape)}")
    if qw.g_idx.shape != (in_features,):
        raise ValueError(f"g_idx: expected [{in_features}], got {tuple(qw.g_idx.shape)}")
    check_group_indices(qw.g_idx, n_groups)
    check_codes(qw.codes, bits, "codes")
    check_codes(qw.zeros, bits, "zeros", low=1)  # stored as zero - 1 in 0..maxq
    _check_packable_length(in_features, bits, "codes (in_features)")
    _check_packable_length(out_features, bits, "zeros (out_features)")


def pack_quantized(qw) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (`qweight, qzeros, scales, g_idx`) of a `QuantizedWeight`."""
    return pack_quantized_with(qw, pack_rows)


def pack_quantized_with(qw, pack) -> dict[str, torch.Tensor]:
    """`pack_quantized` with another implementation of `pack_rows` (a GPU kernel)."""
    check_quantized(qw)
    return {
        "qweight": pack(qw.codes.T, qw.bits),
        "qzeros": pack((qw.zeros - 1).T, qw.bits).T.contiguous(),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def check_group_indices(g_idx: torch.Tensor, n_groups: int, name: str = "g_idx") -> None:
    """Raise `ValueError` naming `name` unless every group index lies in `[0, n_groups)`.

    The one copy of this check: a group index out of range would read another layer's memory in
    a gather kernel, so every reader (artifact, hosts, kernels) calls it before use.
    """
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"{name}: group indices must lie in [0, {n_groups - 1}], found "
                         f"[{int(g_idx.min())}, {int(g_idx.max())}]")


def check_packed(qweight, qzeros, scales, g_idx, bits) -> tuple[int, int, int]:
    """Validate a packed layer's tensors against each other; returns (in, out, n_groups)."""
    check_bits(bits)
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: expected int32, got {t.dtype}")
    if scales.dim() != 2 or not scales.dtype.is_floating_point:
        raise ValueError(f"scales: expected a 2-D float tensor [n_groups, out], got {scales.dtype} "
                         f"of shape {tuple(scales.shape)}")
    n_groups, out_features = scales.shape
    if g_idx.dim() != 1:
        raise ValueError(f"g_idx: expected a 1-D tensor [in], got shape {tuple(g_idx.shape)}")
    in_features = g_idx.shape[0]
    expected = {"qweight": (in_features * bits // WORD_BITS, out_features),
                "qzeros": (n_groups, out_features * bits // WORD_BITS)}
    _check_packable_length(in_features, bits, "g_idx (in_features)")
    _check_packable_length(out_features, bits, "scales (out_features)")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name}: expected shape {expected[name]} for in={in_features}, "
                             f"out={out_features}, groups={n_groups}, bits={bits}, got "
                             f"{tuple(t.shape)}")
    check_group_indices(g_idx, n_groups)
    return in_features, out_features, n_groups


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Zero points int32 `[n_groups, out]` (the stored value + 1)."""
    return unpack_rows(qzeros.T.contiguous(), bits, out_features).T + 1


def dequantize_packed(qweight, qzeros, scales, g_idx, bits) -> torch.Tensor:
    """float32 `[out, in]` weight of a packed layer, as stock GPTQ readers compute it."""
    in_features, out_features, _ = check_packed(qweight, qzeros, scales, g_idx, bits)
    codes = unpack_rows(qweight, bits, in_features)  # [in, out]
    groups = g_idx.long()
    zeros = unpack_zeros(qzeros, bits, out_features)[groups]
    return ((codes - zeros).float() * scales.float()[groups]).T.contiguous()
