"""How codes of `bits` bits fill the 32-bit words of the GPTQ v1 layout, and which sizes cannot.

A module of its own because the options (`QuantizeConfig.check_layer`), the packing code, the
artifact reader and the hosts all need it, and packing itself depends on the options.
"""

from __future__ import annotations

import math

WORD_BITS = 32


def packing_period(bits: int) -> tuple[int, int]:
    """(values, words): the smallest run of values that fills whole words (3 bits: 32 in 3)."""
    values = WORD_BITS // math.gcd(WORD_BITS, bits)
    return values, values * bits // WORD_BITS


def whole_words_problem(size: int, bits: int, what: str, advice: str = "") -> str | None:
    """Why `size` values of `bits` bits cannot be packed (the last word would be partial), or None.

    The one copy of this check; `what` names the size in the message, `advice` ends it.
    """
    if size * bits % WORD_BITS:
        return f"{what} x {bits} bits is not a whole number of 32-bit words{advice}"
    return None
