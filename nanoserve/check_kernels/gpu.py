"""GPU detection, and the switch to numba's CUDA simulator when there is none.

Asked of the CUDA driver library directly (ctypes), never through numba: numba reads
NUMBA_ENABLE_CUDASIM once, at import, so the choice must be made before numba loads.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: Under the CUDA simulator every block's threads are Python threads that hand the GIL
#: around at each barrier; a short switch interval makes that hand-over ~20x faster.
SIMULATOR_SWITCH_INTERVAL = 1e-4


def gpu_present() -> bool:
    """True when the CUDA driver reports at least one device (asked without numba)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def use_simulator_if_no_gpu() -> bool:
    """Select numba's CUDA simulator when there is no GPU; True if it will be used.

    Must run before anything imports numba: numba reads NUMBA_ENABLE_CUDASIM once, at
    import. An explicit NUMBA_ENABLE_CUDASIM in the environment always wins.
    """
    if "NUMBA_ENABLE_CUDASIM" not in os.environ and "numba" not in sys.modules:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if gpu_present() else "1"
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
    if simulated:
        sys.setswitchinterval(SIMULATOR_SWITCH_INTERVAL)
    return simulated
