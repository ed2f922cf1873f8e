"""The GGUF block types the solver can target, as data: what each stores per block of inputs.

llama.cpp's legacy types quantize rows in blocks of 32 consecutive inputs, each block with a
float16 scale `d` and, for the affine types, a float16 minimum `m`:
- symmetric (`Q4_0`, `Q5_0`, `Q8_0`): value = (code - zero) * d, the zero fixed by the type;
- affine (`Q4_1`, `Q5_1`): value = code * d + m.
The K-quants group blocks into super-blocks of 256 inputs that hold float16 `d` (and `dmin`);
each sub-block's scale (and minimum) is a small integer times them:
- `Q4_K`, `Q5_K`: 8 sub-blocks of 32, 6-bit `sc` and `m`: value = code * (d * sc) - dmin * m;
- `Q6_K`: 16 sub-blocks of 16, signed 8-bit `sc`: value = (code - 32) * (d * sc).
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
    super_block: int = 0   # K-quants: inputs per super-block (256); 0 for the legacy types
    scale_levels: tuple[int, int] = (0, 0)  # K-quants: the range of the integer sub-block scales
    # llama.cpp's type for a row that is not a whole number of super-blocks (`llama-quantize`'s rule)
    fallback: str | None = None

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


GGUF_TYPES = {t.name: t for t in (
    GGUFType("Q4_0", bits=4, block_size=32, affine=False, zero=8),
    GGUFType("Q4_1", bits=4, block_size=32, affine=True),
    GGUFType("Q5_0", bits=5, block_size=32, affine=False, zero=16),
    GGUFType("Q5_1", bits=5, block_size=32, affine=True),
    GGUFType("Q8_0", bits=8, block_size=32, affine=False, zero=128, lowest_code=1),
    GGUFType("Q4_K", bits=4, block_size=32, affine=True, super_block=256, scale_levels=(0, 63), fallback="Q5_0"),
    GGUFType("Q5_K", bits=5, block_size=32, affine=True, super_block=256, scale_levels=(0, 63), fallback="Q5_1"),
    GGUFType("Q6_K", bits=6, block_size=16, affine=False, zero=32, super_block=256, scale_levels=(-128, 127),
             fallback="Q8_0"),
)}

# llama.cpp's mixtures: a base type, and a larger one for the attention value and MLP down
# projections of the layers `more_bits` picks (as `llama-quantize` assigns them).
GGUF_MIXTURES = {"Q4_K_M": ("Q4_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K")}
MORE_BITS_LAYERS = ("v_proj", "down_proj")
# `general.file_type` of a single K type: llama.cpp's nearest ftype name.
FILE_TYPES = {"Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}


def more_bits(index: int, count: int) -> bool:
    """llama.cpp's choice of layers that get more bits in a mixture: the first and last eighth,
    and every third layer between."""
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


def base_type(type_name: str) -> GGUFType:
    """The type that fixes a run's bits and group: the type itself, or a mixture's base."""
    return GGUF_TYPES[GGUF_MIXTURES[type_name][0] if type_name in GGUF_MIXTURES else type_name]


def layer_type(type_name: str, module_name: str, index: int, count: int, in_features: int) -> str:
    """The type one Linear (`module_name` in block `index` of `count`) gets, after llama.cpp's
    fallback for a row that is not a whole number of super-blocks."""
    if type_name in GGUF_MIXTURES:
        base, larger = GGUF_MIXTURES[type_name]
        counted = module_name.rsplit(".", 1)[-1] in MORE_BITS_LAYERS
        type_name = larger if counted and more_bits(index, count) else base
    chosen = GGUF_TYPES[type_name]
    if chosen.super_block and in_features % chosen.super_block:
        return chosen.fallback
    return type_name
