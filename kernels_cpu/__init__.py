"""nanoserve's kernel contract compiled for the CPU with Numba: the fast CPU backend.

The reference kernels (``kernels_ref``) are vectorised NumPy. That is as fast as a CPU
gets wherever the work is one big BLAS call or one big ufunc, and slow wherever NumPy
must copy memory into a shape it can vectorise over. Decode attention is the worst case:
to read each sequence's pages the reference gathers them into a padded array (a copy of
the whole KV context, every layer, every step) and only then multiplies. This backend
compiles plain loops (``numba.njit``) for the kernels where that copy or a chain of
temporaries dominates, and takes the rest from the reference on purpose:

    compiled here         paged_attention (decodes read pages in place), store_kv,
                          rms_norm, rope
    BLAS, reordered       linear: a decode batch's few rows go through (W @ x.T).T
    the reference's       the quantized linears (dequantize, then BLAS), silu_mul and
    (already the best     softmax (SIMD ufuncs), attention (BLAS), the sampling filters,
    NumPy can do)         and the prefill chunks of paged_attention (gather, then BLAS)

Numba's CPU target has no float16 arithmetic, so a float16 KV cache is read as float32
(``paged_attention``) or written through NumPy (``store_kv``); the engine's cache is
float32. Compiled code is cached on disk (``cache=True``): the first run in a fresh
checkout spends a few seconds compiling. ``parallel=True`` kernels split their outer
loop across ``numba.get_num_threads()`` threads (``NUMBA_NUM_THREADS`` sets it).

Threads: the matmuls run on OpenBLAS's threads and the parallel kernels on Numba's
(OpenMP when available). OpenMP threads spin for a while after each kernel, waiting for
more work, and on a small machine that spinning takes the cores away from the next
matmul (measured here: 5x slower steps). So this package asks OpenMP to let its idle
threads sleep (``OMP_WAIT_POLICY=passive``) unless the environment already says otherwise;
that must happen before the OpenMP runtime loads, so import this backend early.

    >>> from nanoserve.kernels import get_backend
    >>> get_backend("cpu").fallbacks
    ()
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # see "Threads" above; read when OpenMP loads

from kernels_cpu.attention import paged_attention, store_kv  # noqa: E402
from kernels_cpu.linear import linear  # noqa: E402
from kernels_cpu.pointwise import rms_norm, rope  # noqa: E402
from kernels_ref import (  # noqa: E402
    attention,
    linear_int4,
    linear_int8,
    linear_q4_0,
    linear_q4_1,
    linear_q8_0,
    min_p_filter,
    silu_mul,
    softmax,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "attention",
    "linear",
    "linear_int4",
    "linear_int8",
    "linear_q4_0",
    "linear_q4_1",
    "linear_q8_0",
    "min_p_filter",
    "paged_attention",
    "rms_norm",
    "rope",
    "silu_mul",
    "softmax",
    "store_kv",
    "top_k_filter",
    "top_p_filter",
]
