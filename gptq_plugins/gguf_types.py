"""The GGUF block types the solver can target, as data: what each stores per block of inputs.

llama.cpp's legacy types quantize rows in blocks of 32 consecutive inputs, each block with a
float16 scale `d` and, for the affine types, a float16 minimum `m`:
- symmetric (`Q4_0`, `Q5_0`, `Q8_0`): value = (code - zero) * d, the zero fixed by the type;
- affine (`Q4_1`, `Q5_1`): value = code * d + m.
The solver quantizes onto exactly these values (`gguf_grid`), so the codes are stored unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFType:
    name: str
    bits: int
    block_size: int        # inputs per block (a row's input size must be a multiple)
    affine: bool           # stores a float16 minimum per block (value = code * d + m)
    zero: int = 0          # symmetric types: the code that means 0.0
    lowest_code: int = 0   # Q8_0 leaves code 0 (int8 -128) unused, as llama.cpp's quantizer does

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


GGUF_TYPES = {t.name: t for t in (
    GGUFType("Q4_0", bits=4, block_size=32, affine=False, zero=8),
    GGUFType("Q4_1", bits=4, block_size=32, affine=True),
    GGUFType("Q5_0", bits=5, block_size=32, affine=False, zero=16),
    GGUFType("Q5_1", bits=5, block_size=32, affine=True),
    GGUFType("Q8_0", bits=8, block_size=32, affine=False, zero=128, lowest_code=1),
)}
