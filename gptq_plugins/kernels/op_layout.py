"""Reading PyTorch's CPU int4 packing back: the 4-bit codes of a range of output columns.

`_convert_weight_to_int4pack_for_cpu(codes [N, K])` returns uint8 `[N, K/2]`, laid out as blocks
of `block` output columns (a shorter last one), each block `K` runs of `block / 2` bytes (one run
per input) holding that input's codes in an order PyTorch picks per ISA and block length. The
order and block length are learned once per process by converting probe codes that number the
columns and inputs (base-16 digits, one probe per digit), then checked on random codes. With the
codes readable from the op's weight, a layer keeps its weight resident once: the tiled many-row
path and the checkpoint's `qweight` (for `state_dict`) are read from the op's copy.
"""

from __future__ import annotations

import functools

import torch

from gptq_plugins.kernels.base import BackendUnsupported

NIBBLE = 16
OP_CODE_OFFSET = 8  # the op dequantizes (q - 8) * scale + offset
PROBE_INPUTS = 32  # inputs of the probe weights (two base-16 digits)
PROBE_COLUMNS = 128  # at least two blocks of every ISA's layout


def _convert(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 8)


def _nibble_stream(packed: torch.Tensor) -> torch.Tensor:
    """The packed bytes as one stream of 4-bit values, low nibble first."""
    flat = packed.reshape(-1)
    return torch.stack([flat & (NIBBLE - 1), flat >> 4], dim=-1).reshape(-1).long()


def _source_of_each_nibble(columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column, input) whose code each nibble of the op's packing of `[columns, PROBE_INPUTS]` holds."""
    column, inputs = torch.meshgrid(torch.arange(columns), torch.arange(PROBE_INPUTS), indexing="ij")

    def read(index: torch.Tensor) -> torch.Tensor:  # two base-16 digits, one conversion each
        return sum(_nibble_stream(_convert((index >> (4 * d)) & (NIBBLE - 1))) << (4 * d) for d in range(2))

    return read(column), read(inputs)


@functools.cache
def block_columns() -> int:
    """Output columns per block of the op's layout on this process's ISA (64 on AVX-512, 32 on AVX2)."""
    _, inputs = _source_of_each_nibble(PROBE_COLUMNS)
    return int((inputs != 0).nonzero()[0])  # the first block's first input run ends there


@functools.cache
def column_order(columns: int) -> torch.Tensor:
    """For a block of `columns` outputs, the position in each input's run of each column's code."""
    column, inputs = _source_of_each_nibble(columns)
    first_run = column[:columns]
    runs_alike = (torch.equal(inputs, torch.arange(PROBE_INPUTS).repeat_interleave(columns))
                  and torch.equal(column.view(PROBE_INPUTS, columns), first_run.expand(PROBE_INPUTS, -1))
                  and torch.equal(first_run.sort().values, torch.arange(columns)))
    if not runs_alike:
        raise BackendUnsupported("PyTorch's int4 packing is not laid out in runs of one input per block; "
                                 "this torch version's layout is not known to gptq_plugins")
    return torch.argsort(first_run)


@functools.cache
def _arrangement(columns: int) -> str:
    """How a run of `columns` codes sits in its bytes: "halves" (low nibbles hold the first half of
    the columns, high nibbles the second: PyTorch's whole blocks) or "pairs" (byte j holds columns
    2j and 2j + 1: its shorter blocks); another order raises BackendUnsupported."""
    order = column_order(columns)
    positions = torch.arange(columns)
    if torch.equal(order, positions):
        return "pairs"
    if torch.equal(order, torch.where(positions < columns // 2, 2 * positions, 2 * positions - columns + 1)):
        return "halves"
    raise BackendUnsupported(f"PyTorch's int4 packing orders a block of {columns} columns in a way "
                             "not known to gptq_plugins")


def read_codes(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """uint8 codes `[K, stop - start]` of output columns `start:stop` of the op's weight
    `packed [N, K/2]`; `start` is a multiple of `block_columns()`, `stop` one too or N."""
    block = block_columns()
    inputs = packed.shape[1] * 2
    whole_stop = start + (stop - start) // block * block
    parts = []
    for first, last, columns in ((start, whole_stop, block), (whole_stop, stop, stop - whole_stop)):
        if last == first:
            continue
        runs = packed[first:last].reshape(-1, inputs, columns // 2)  # [blocks, K, bytes of a run]
        low, high = runs & (NIBBLE - 1), runs >> 4
        codes = torch.cat([low, high], -1) if _arrangement(columns) == "halves" else torch.stack([low, high], -1)
        parts.append(codes.transpose(0, 1).reshape(inputs, -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@functools.cache
def check_layout(last_block_columns: int) -> None:
    """Raise BackendUnsupported unless random codes of two blocks and a last one of
    `last_block_columns` (0: none) read back as converted, from the first block and the second."""
    block = block_columns()
    columns = 2 * block + last_block_columns
    codes = torch.randint(0, NIBBLE, (columns, PROBE_INPUTS), generator=torch.Generator().manual_seed(0))
    packed = _convert(codes)
    if not all(torch.equal(read_codes(packed, start, columns).T.long(), codes[start:]) for start in (0, block)):
        raise BackendUnsupported("PyTorch's int4 packing did not read back; this torch version's layout "
                                 "is not known to gptq_plugins")
