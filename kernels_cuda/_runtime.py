"""Where the CUDA kernels run, and how arrays get there.

Three situations, decided once at import:

    real GPU + CuPy      arrays live on the device as ``cupy.ndarray``; ``xp`` is cupy and
                         numba kernels take CuPy arrays directly (``__cuda_array_interface__``)
    real GPU, no CuPy    ``xp`` is numpy; numba copies each host array to the device and
                         back around every launch (correct, slow)
    simulator            ``NUMBA_ENABLE_CUDASIM=1`` was set before numba was imported: the
                         kernels run as Python threads on the CPU, on numpy arrays

The simulator must be chosen by the caller (tests, ``check-kernels``) before anything
imports numba; this module only reads the choice. Under the simulator every block's
threads are real Python threads and each ``syncthreads`` costs about a millisecond, so the
launch helpers below use small blocks there; every kernel is written to be correct for
any block size up to ``MAX_BLOCK_THREADS``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
from numba import config as numba_config
from numba import cuda

#: True when numba.cuda is the CPU simulator (NUMBA_ENABLE_CUDASIM=1 at numba import).
SIMULATOR: bool = bool(numba_config.ENABLE_CUDASIM)


def _share_simulated_arrays_safely() -> None:
    """Make the simulator's ``cuda.shared.array`` give every thread of a block the same array.

    The simulator finds a block's shared array by the calling line, and creates it when
    the first thread gets there: look up, and if missing, allocate and store. Two threads
    can both miss and each get a private array, and then "shared" memory is not shared
    (seen as a wrong result once in a few hundred launches, more often with the short
    thread switch interval the tests use). The same lookup under a lock cannot race.
    """
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    unlocked_array = FakeCUDAShared.array
    lock = threading.Lock()

    def array(self: Any, shape: Any, dtype: Any, alignment: Any = None) -> Any:
        if shape == 0 or alignment is not None:  # dynamic shared memory: no lookup to race
            return unlocked_array(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)  # the kernel line asking for the array, as the simulator keys it
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            if key not in self._allocations:
                self._allocations[key] = np.empty(shape, dtype)
            return self._allocations[key]

    FakeCUDAShared.array = array


if SIMULATOR:
    _share_simulated_arrays_safely()

#: Shared-memory scratch arrays are sized for this many threads per block.
MAX_BLOCK_THREADS = 256

#: Threads per block under the simulator: every thread is a Python thread there.
SIMULATOR_BLOCK_THREADS = 8


def _load_cupy() -> Any | None:
    """CuPy if a real GPU is usable through it, else None (never under the simulator)."""
    if SIMULATOR:
        return None
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.is_available() else None
    except Exception:  # a broken driver install shows up here, not at import
        return None


cupy = _load_cupy()

#: The array module kernels take and return: cupy on a real GPU with CuPy, else numpy.
xp: Any = cupy if cupy is not None else np


def to_device(a: np.ndarray) -> Any:
    """Host numpy array -> backend array (a CuPy device array on a GPU, else unchanged)."""
    return xp.asarray(a)


def to_host(a: Any) -> np.ndarray:
    """Backend array -> host numpy array."""
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return np.asarray(a)


def require_device() -> None:
    """Raise a clear error when there is neither a GPU nor the simulator to launch on."""
    if not SIMULATOR and not cuda.is_available():
        raise RuntimeError(
            "kernels_cuda: no usable CUDA GPU was found and the simulator is off; set "
            "NUMBA_ENABLE_CUDASIM=1 before numba is imported to run the kernels on the CPU"
        )


def block_threads(preferred: int) -> int:
    """Threads per block for a launch: ``preferred`` on a GPU, a few under the simulator."""
    return min(preferred, SIMULATOR_BLOCK_THREADS) if SIMULATOR else min(preferred, MAX_BLOCK_THREADS)


def grid_stride_blocks(n: int, threads: int, max_blocks: int = 1024) -> int:
    """Blocks for a grid-stride loop over ``n`` items (one block under the simulator)."""
    if SIMULATOR:
        return 1
    return max(1, min(max_blocks, -(-n // threads)))


def contiguous(a: Any, dtype: Any = None) -> Any:
    """``a`` as a C-contiguous array of the backend's array module (copied only if needed).

    Host arrays given to a GPU backend are moved to the device here, once per call. The
    simulator copies every argument back to the host after a launch, so a read-only host
    array (a memory-mapped weight, say) is copied first.
    """
    out = xp.ascontiguousarray(xp.asarray(a), dtype=dtype)
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        out = out.copy()
    return out
