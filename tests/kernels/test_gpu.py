"""On a real NVIDIA GPU: the ``cuda`` backend with CuPy arrays, checked at the model's shapes.

These run in a subprocess with NUMBA_ENABLE_CUDASIM=0, because this test process uses the
simulator; they are skipped, with the reason, where CuPy finds no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cupy_gpu_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "needs a real GPU: CuPy is not installed (pip install 'nanoserve[cuda]')"
    try:
        if not cupy.is_available():
            return "needs a real GPU: cupy.is_available() is False"
    except Exception as exc:  # a driver problem
        return f"needs a real GPU: cupy.is_available() raised {exc!r}"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_cupy_gpu_reason() is not None, reason=str(_cupy_gpu_reason()))]


def _python(code_or_args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cuda_backend_keeps_arrays_on_the_device() -> None:
    code = (
        "import numpy as np, cupy, kernels_cuda as kc\n"
        "assert kc.xp is cupy and not kc.SIMULATOR\n"
        "x = kc.to_device(np.ones((3, 8), np.float32)); w = kc.to_device(np.ones(8, np.float32))\n"
        "y = kc.rms_norm(x, w, 1e-5)\n"
        "assert isinstance(y, cupy.ndarray) and np.allclose(kc.to_host(y), 1.0, atol=1e-5)\n"
    )
    result = _python(["-c", code])
    assert result.returncode == 0, result.stdout + result.stderr


def test_cuda_backend_matches_reference_at_model_shapes_on_the_gpu() -> None:
    result = _python(["-m", "nanoserve.check_kernels", "--backend", "cuda", "--size", "large", "--examples", "50"])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
