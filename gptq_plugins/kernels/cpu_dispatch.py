"""Which CPU path a call takes: PyTorch's int4 kernel, or `tiled_dequant` for calls of many rows.

The int4 kernel costs the same per row whatever the batch, while dequantizing a tile costs the
same whatever the batch and the GEMM after it is cheap per row, so past a number of rows the
tiled path wins. That crossover depends on the CPU kind (native bfloat16 GEMMs on AVX512-BF16,
emulated ones on AVX2) and on how many 4-bit codes the kernel reads per weight (two for 8-bit).
The figures are measured by `benchmarks/kernels.py` (`crossover`, recorded in
`benchmarks/results/kernels.json`) as the first batch from which the tiled path is faster on the
two shapes of the ~300M model; a constant per kind keeps the choice deterministic, where a
calibration at load time would follow the machine's momentary load.
"""

from __future__ import annotations

from gptq_plugins.cpu_features import cpu_features

# rows from which the tiled path runs, per CPU kind, for 1 and 2 codes read per weight
TILED_FROM_ROWS = {
    "AVX-512 + bfloat16": {1: 96, 2: 64},  # Xeon Sapphire Rapids (AMX), 2 cores: two runs of benchmarks/kernels.py
                                           # gave 96/64 and 128/96 (results/kernels.json: the second)
    "AVX2": {1: 96, 2: 32},                # the same CPU with ATEN_CPU_CAPABILITY=avx2 (oneDNN's GEMM still
                                           # uses AMX there: a real AVX2 CPU emulates bfloat16, so later)
}
# Not measured here (AVX-512 without bfloat16: Skylake/Ice Lake): the AVX2 figures, whose GEMMs
# also emulate bfloat16. A Zen 4 (AVX512-BF16, no AMX) takes the Sapphire Rapids figures.
UNMEASURED_KIND = "AVX2"


def tiled_from_rows(op_weights_per_weight: int = 1) -> int:
    """The crossover for this CPU; `op_weights_per_weight` 4-bit codes are read per weight."""
    table = TILED_FROM_ROWS.get(cpu_features().kind, TILED_FROM_ROWS[UNMEASURED_KIND])
    return table[op_weights_per_weight]


def uses_tiled_dequant(rows: int, op_weights_per_weight: int = 1) -> bool:
    """Whether a call of `rows` rows goes to the tiled dequantize + GEMM path."""
    return rows >= tiled_from_rows(op_weights_per_weight)
