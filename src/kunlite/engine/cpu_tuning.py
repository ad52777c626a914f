"""Process- and memory-level settings that make the CPU path fast.

glibc's malloc hands every freed block above its mmap threshold (128 KiB, adapting upwards)
back to the kernel, and trims the heap top beyond 128 KiB. An engine step allocates and frees
the same few hundred-KiB activations every layer, so each of them was paid for again in page
faults and zeroing: measured here, gathering and widening one layer's KV went from ~215 us to
~77 us once freed memory stays in the heap. Large blocks (the pool) are still mmapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_MADV_HUGEPAGE = 14
_HUGE = 2 << 20
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_applied = False


def keep_freed_memory() -> None:
    """Raise glibc's mmap and trim thresholds (no-op elsewhere, and after the first call)."""
    global _applied
    if _applied:
        return
    _applied = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt; allocator left as it is")
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, 256 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30) and mallopt(_M_TOP_PAD, 64 << 20)
    if not ok:
        log.debug("mallopt refused the thresholds")


def advise_huge_pages(tensor: "torch.Tensor") -> bool:
    """Ask the kernel to back a large CPU tensor with 2 MiB pages (transparent huge pages in
    "madvise" mode). Call it before the first touch. Attention gathers rows from pages scattered
    over the whole pool; with 4 KiB pages nearly every row is a TLB miss. Returns whether the
    advice was taken."""
    if tensor.device.type != "cpu" or tensor.nbytes < 2 * _HUGE:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except (OSError, TypeError):
        return False
    start = (tensor.data_ptr() + _HUGE - 1) // _HUGE * _HUGE  # madvise wants an aligned range
    length = (tensor.data_ptr() + tensor.nbytes - start) // _HUGE * _HUGE
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0
