"""Freed memory handed back to the operating system between the passes over the calibration batches.

glibc's malloc keeps freed blocks in its per-thread arenas; a forward over every calibration batch
leaves hundreds of MB there (measured: peak RSS 1.44 GB against 1.18 GB with this call after each
pass, on a hidden-1024 Llama, 64 x 256 tokens). `malloc_trim` returns those pages at no measurable
cost. Elsewhere (another libc, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Return the heap's free pages to the OS, where the C library can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
