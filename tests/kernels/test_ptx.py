"""Every numba CUDA kernel compiles to PTX for a real GPU (sm_80), on any machine.

The simulator runs kernels as Python, so it cannot tell whether they type-check and
lower for hardware. ``kernels_cuda.ptx.compile_all`` can, without a GPU, given NVVM (from
``numba-cuda[cu12]``, part of the dev extras). It runs in a subprocess because this test
process has the simulator switched on. kernels_cuda uses no CuPy RawKernel sources, so
there is no CUDA C to compile with NVRTC.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = """
import sys
try:
    from kernels_cuda.ptx import compile_all, kernel_signatures
    from numba.cuda.cudadrv.error import NvvmSupportError
except ImportError as exc:
    print("SKIP: cannot import numba.cuda / kernels_cuda:", exc)
    sys.exit(3)
try:  # without NVIDIA's toolkit wheels (nanoserve[ptx]) the libraries are simply not found
    from cuda.pathfinder import DynamicLibNotFoundError
except ImportError:
    DynamicLibNotFoundError = NvvmSupportError
try:
    ptx = compile_all((8, 0))
except (NvvmSupportError, DynamicLibNotFoundError) as exc:
    print("SKIP: NVVM is not available:", str(exc).strip().splitlines()[0])
    sys.exit(3)
for label, text in ptx.items():
    assert ".target sm_80" in text and ".entry" in text, label
print("compiled", len(ptx), "of", len(kernel_signatures()))
"""


@pytest.mark.slow
def test_every_cuda_kernel_compiles_to_ptx_for_sm_80() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if result.returncode == 3:
        pytest.skip(result.stdout.strip() + " (install the toolkit wheels: pip install 'nanoserve[ptx]')")
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = result.stdout.split()
    assert compiled[1] == compiled[3], result.stdout
