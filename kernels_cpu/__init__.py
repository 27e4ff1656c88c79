"""nanoserve's kernel contract compiled for the CPU with Numba: the fast CPU backend.

The reference kernels (``kernels_ref``) are vectorised NumPy. That is as fast as a CPU
gets wherever the work is one big BLAS call or one big ufunc, and slow wherever NumPy
must copy memory into a shape it can vectorise over. Decode attention is the worst case:
to read each sequence's pages the reference gathers them into a padded array (a copy of
the whole KV context, every layer, every step) and only then multiplies. This backend
compiles plain loops (``numba.njit``) for the kernels where that copy or a chain of
temporaries dominates, and takes the rest from the reference on purpose:

    compiled here         paged_attention (decodes and chunks of up to 8 queries read
                          the pages in place), store_kv,
                          paged_attention_int8 and store_kv_int8 (kernels_cpu.kv_int8:
                          int8 pages read in place, quantized on write),
                          rms_norm, rope, apply_penalties (one pass, not a chain of
                          temporaries), the quantized linears linear_int8, linear_int4,
                          linear_q8_0, linear_q4_0, linear_q4_1 (kernels_cpu.quant: the
                          bytes widened in registers for one row, never a float matrix;
                          kernels_cpu.quant_tiles: four rows at a time widened into L1
                          for 2-32 rows, a float32 tile at a time into BLAS for prefill),
                          the int8-activation linears linear_q8_0_a8, linear_q4_0_a8,
                          linear_q4_1_a8 (kernels_cpu.int8_activations: x quantized to
                          int8 blocks, int32 block sums by vpmaddwd for decode rows;
                          the dequantized int8 x into BLAS tiles for prefill rows),
                          and linear for up to 32 rows (kernels_cpu.linear: each weight
                          row read once for all rows of the step; BLAS above 32 rows)
    NumPy, less work      top_p_filter: sorts a few dozen candidates, not the vocabulary
    the reference's       silu_mul and softmax (SIMD ufuncs), attention (BLAS), the
    (already the best     sampling filters, and paged_attention's longer prefill
    NumPy can do)         chunks (gather, then BLAS)

Numba's CPU target has no float16, so decode attention reads a float16 KV cache as its
raw 16-bit patterns and widens each page to float32 (exactly), and ``store_kv`` writes
one through NumPy. Compiled code is cached on disk (``cache=True``) under
``~/.cache/nanoserve/numba`` (``kernels_cpu.compile_cache``): the first run spends a few
seconds compiling.

Threads: by default every kernel here runs on the calling thread. ``--threads N``
(``nanoserve.threads``) gives OpenBLAS N threads and splits the compiled linears' output
rows (``linear``'s few-row loop, the quantized lanes and quad kernels) over N threads
(``kernels_cpu.split``: the same bits as one thread). Attention stays on the calling
thread: splitting it did not make serving faster on 2 cores (measured in
``kernels_cpu.attention``).

    >>> from nanoserve.kernels import get_backend
    >>> get_backend("cpu").fallbacks
    ()
"""

from kernels_cpu import compile_cache  # noqa: F401  (first: sets where compiled kernels are cached)
from kernels_cpu.attention import paged_attention, store_kv
from kernels_cpu.int8_activations import linear_q4_0_a8, linear_q4_1_a8, linear_q8_0_a8
from kernels_cpu.kv_int8 import paged_attention_int8, store_kv_int8
from kernels_cpu.linear import linear
from kernels_cpu.pointwise import rms_norm, rope
from kernels_cpu.quant import linear_int4, linear_int8, linear_q4_0, linear_q4_1, linear_q8_0
from kernels_cpu.sampling import apply_penalties, top_p_filter
from kernels_ref import (
    attention,
    min_p_filter,
    silu_mul,
    softmax,
    top_k_filter,
)

__all__ = [
    "apply_penalties",
    "attention",
    "linear",
    "linear_int4",
    "linear_int8",
    "linear_q4_0",
    "linear_q4_0_a8",
    "linear_q4_1",
    "linear_q4_1_a8",
    "linear_q8_0",
    "linear_q8_0_a8",
    "min_p_filter",
    "paged_attention",
    "paged_attention_int8",
    "rms_norm",
    "rope",
    "silu_mul",
    "softmax",
    "store_kv",
    "store_kv_int8",
    "top_k_filter",
    "top_p_filter",
]
