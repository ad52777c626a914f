"""Kernel tests run the Triton kernels on CPU tensors under the Triton interpreter.

TRITON_INTERPRET must be set before `kunlite.kernels.triton_*` is imported (`@triton.jit` reads it
when it decorates), so it is set here, at conftest import, ahead of the test modules.
"""

from __future__ import annotations

import ctypes
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

# The interpreter runs tl.dot as a numpy matmul. OpenBLAS threads fighting torch's threads on a
# 2-core machine make those matmuls about 3x slower, so numpy's OpenBLAS gets one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _one_openblas_thread() -> None:
    """numpy is already loaded, so the variable comes too late: ask the library directly."""
    try:
        with open("/proc/self/maps") as maps:
            libs = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for fn in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, fn):
                getattr(lib, fn)(1)
                break


if "numpy" in sys.modules:
    _one_openblas_thread()
