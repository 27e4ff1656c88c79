"""Compile every kernel of this package to PTX for a chosen GPU architecture, without a GPU.

``numba.cuda.compile_ptx`` needs NVVM (shipped by ``numba-cuda[cu12]``) but no device, so
this checks on any machine that each kernel type-checks and lowers for real hardware,
something the simulator (which runs kernels as plain Python) cannot tell. Run it with the
simulator off:

    python -m kernels_cuda.ptx            # compiles for compute capability 8.0 (A100)
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

from numba import boolean, cuda, float32, float64, int8, int32, int64, uint8
from numba.core.types import float16

from kernels_cuda._runtime import SIMULATOR
from kernels_cuda.activation import silu_mul_kernel, softmax_kernel
from kernels_cuda.attention import paged_attention_kernel, store_kv_kernel
from kernels_cuda.linear import linear_kernel
from kernels_cuda.norm import rms_norm_kernel
from kernels_cuda.rope import rope_kernel
from kernels_cuda.sampling import min_p_kernel, penalties_kernel, top_k_kernel, top_p_kernel

F32_1, F32_2, F32_3, F32_4 = float32[::1], float32[:, ::1], float32[:, :, ::1], float32[:, :, :, ::1]
I64_1, I64_2 = int64[::1], int64[:, ::1]


def kernel_signatures() -> list[tuple[str, Any, tuple]]:
    """(label, kernel, argument types) for one launch of every kernel and dtype variant."""
    from kernels_cuda import (  # the int8 KV cache's and activations' kernels list their own
        int8_activations,
        kv_int8,
    )

    lin = linear_kernel
    return kv_int8.ptx_signatures() + int8_activations.ptx_signatures() + [
        ("rms_norm", rms_norm_kernel, (F32_2, F32_1, float64, F32_2)),
        ("rope", rope_kernel, (F32_3, I64_1, float64, F32_3)),
        ("silu_mul", silu_mul_kernel, (F32_1, F32_1, F32_1)),
        ("softmax[f32]", softmax_kernel, (F32_2, F32_2)),
        ("softmax[f64]", softmax_kernel, (float64[:, ::1], float64[:, ::1])),
        ("linear[fp32]", lin("fp"), (F32_2, F32_2, F32_1, F32_2)),
        ("linear[fp16]", lin("fp"), (F32_2, float16[:, ::1], F32_1, F32_2)),
        ("linear_int8", lin("int8"), (F32_2, int8[:, ::1], F32_1, F32_2)),
        ("linear_int4", lin("int4"), (F32_2, uint8[:, ::1], F32_2, F32_2)),
        ("linear_q8_0", lin("q8_0"), (F32_2, uint8[:, ::1], F32_1, F32_2)),
        ("linear_q4_0", lin("q4_0"), (F32_2, uint8[:, ::1], F32_1, F32_2)),
        ("linear_q4_1", lin("q4_1"), (F32_2, uint8[:, ::1], F32_1, F32_2)),
        ("store_kv[f32 cache]", store_kv_kernel, (F32_3, F32_3, F32_4, F32_4, I64_1)),
        ("store_kv[f16 cache]", store_kv_kernel, (F32_3, F32_3, float16[:, :, :, ::1], float16[:, :, :, ::1], I64_1)),
        ("paged_attention[f32 cache]", paged_attention_kernel, (F32_3, F32_4, F32_4, I64_2, I64_1, I64_1, float64, F32_3)),
        ("paged_attention[f16 cache]", paged_attention_kernel, (F32_3, float16[:, :, :, ::1], float16[:, :, :, ::1], I64_2, I64_1, I64_1, float64, F32_3)),
        ("top_k_filter", top_k_kernel, (int32[:, ::1], I64_1, F32_2)),
        ("top_p_filter", top_p_kernel, (F32_2, int32[:, ::1], float64[::1], float64[:, ::1], F32_2)),
        ("min_p_filter[f32]", min_p_kernel, (F32_2, F32_1, F32_1, F32_2)),
        ("min_p_filter[f64]", min_p_kernel, (F32_2, float64[::1], float64[::1], F32_2)),
        ("apply_penalties", penalties_kernel, (F32_2, boolean[:, ::1], int32[:, ::1], F32_1, F32_1, F32_1, F32_2)),
    ]


@contextlib.contextmanager
def _device_functions_compiled_for(cc: tuple[int, int]) -> Iterator[None]:
    """Make numba compile ``device=True`` functions for ``cc`` instead of asking a GPU.

    ``compile_ptx`` takes the target for the kernel itself, but numba compiles the device
    functions a kernel calls for the *current device*, which does not exist here; for
    the duration of the compile a stand-in device of capability ``cc`` answers instead.
    """
    from numba.cuda import dispatcher

    real = getattr(dispatcher, "get_current_device", None)
    if real is None:  # a numba-cuda that no longer asks the device: nothing to stand in for
        yield
        return
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = real


def compile_all(cc: tuple[int, int] = (8, 0)) -> dict[str, str]:
    """PTX text of every kernel in ``kernel_signatures()`` for compute capability ``cc``."""
    if SIMULATOR:
        raise RuntimeError("compile_all needs the real numba.cuda: unset NUMBA_ENABLE_CUDASIM")
    ptx = {}
    with _device_functions_compiled_for(cc):
        for label, kernel, signature in kernel_signatures():
            ptx[label], _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
    return ptx


def main() -> int:
    """Compile everything for sm_80 and print one line per kernel."""
    for label, text in compile_all((8, 0)).items():
        entries = text.count(".entry")
        print(f"{label:28s} {len(text):8d} chars of PTX, {entries} entry point(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
