"""``y = x @ W.T`` for the cpu backend: a compiled few-row kernel, and BLAS for many rows.

A decode step multiplies one row per sequence by each weight matrix; a speculative
verification multiplies k + 1 rows of one sequence. With so few rows the product is
bound by reading the weights (SmolLM2-135M in float32: 540 MB per forward pass), so a
step of T rows should cost about what one row costs. BLAS does not get there: OpenBLAS's
GEMM for 2-16 rows took about twice its GEMV for one row, and its one-thread GEMV read
the weights at half the speed of a plain compiled loop. So up to ``R_MAX`` rows a
compiled loop reads each weight row once for all rows of the step::

    for o in range(out):                          the hot loop: one pass over W
        prefetch W[o + 16] into L2                (a hint: see PREFETCH_AHEAD)
        w_row = W[o]                              [in]  (from memory once, then from L1)
        for each block of up to 4 rows t..t+3:    x [T, in] is small: it stays in L1/L2
            y[t:t+4, o] = w_row . x[t:t+4]        4 dot products in one loop over in

From ``PAIR_MIN_ROWS`` rows on, two weight rows go through the loop together, so that
each load of ``x[t, i]`` serves two products. LLVM vectorises the loop over ``in``
(``fastmath`` reassociation lets it split every sum into SIMD lanes), accumulating in
float32 as BLAS does. A float16 weight row is widened to float32 in a scratch row first
(exactly, from its bits: Numba's CPU target has no float16), so an fp16 model reads half
the bytes and never converts a whole matrix.

Measured with ``python bench/forward_rows.py`` (AMD EPYC Zen 4, 2 cores, AVX-512, OpenBLAS
0.3.31 on 1 thread as ``nanoserve.threads`` sets it, load average ~3 from other
processes; thread CPU time per call, median of 11, 30 distinct weights per layer shape):

    rows T   [49152, 576] LM head      [3072, 576] gate/up       [576, 1536] down
             BLAS      compiled        BLAS      compiled        BLAS      compiled
    1        12.5 ms   5.7 ms          0.80 ms   0.38 ms         0.30 ms   0.22 ms
    2        24.5      5.7             1.50      0.37            0.50      0.19
    5        27.3      6.6             1.64      0.39            0.61      0.41
    9        32.2      11.5            1.82      0.58            0.69      0.52
    17       36.0      (BLAS)          2.06      (BLAS)          0.84      (BLAS)

Why each threshold is where it is:

* ``R_MAX = 16``: at 16 rows the loop still beat GEMM (LM head 16.9 vs 37.5 ms, gate/up
  1.20 vs 2.05, down 0.77 vs 0.75 ms); past that GEMM's blocking wins as rows grow.
* ``PAIR_MIN_ROWS = 4``: two weight rows at once were 15-30% faster at 4-16 rows (LM
  head at 5 rows: 7.8 vs 10.8 ms) and 5-15% slower at 1-2 rows.
* ``PREFETCH_AHEAD = 16``: without the hint, memory reads and arithmetic barely overlap at
  4+ rows (LM head at 5 rows: 16.2 ms without, 10.8 with; one row: 7.0 vs 5.0). 16 and
  32 rows ahead measured the same; into L1 instead of L2 was slower.
* One row goes through the loop too: GEMV was 1.4-2.2x slower at every shape.

Threads: the loop runs on the calling thread. A ``prange`` over output features on both
cores was ~1.8x faster when the other core was idle, and up to 20x slower whenever
another process held it (every call waits at a barrier for the descheduled half), the
same failure that made ``nanoserve.threads`` give BLAS one thread by default.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

import kernels_ref
from kernels_cpu.pointwise import FASTMATH

#: Up to this many rows the compiled loop computes the product; above it, BLAS (see above).
R_MAX = 16
#: Above ``R_MAX`` and up to this many rows, BLAS computes ``(W @ x.T).T``: with the
#: weight as the left operand OpenBLAS was 7-11% faster at 48-128 rows (a layer's four
#: matmuls, 30 layers of distinct weights); at 512 rows the usual order was 25% faster.
FEW_ROWS = 128
#: Rows of the weight prefetched into L2 ahead of the one being multiplied (see above).
PREFETCH_AHEAD = 16
#: From this many rows on, float32 weights go two rows at a time (:func:`_pair_dots`; see above).
PAIR_MIN_ROWS = 4


@intrinsic
def _prefetch_row(typingctx, matrix, row):  # [R, C] C-contiguous, int -> nothing
    """Ask the CPU to start loading row ``row`` of ``matrix`` into L2 (``llvm.prefetch``, one per
    64-byte line). Only a hint: it changes no value and never faults."""

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        columns = builder.extract_value(array.shape, 1)
        itemsize = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        byte = ir.IntType(8).as_pointer()
        start = builder.bitcast(builder.gep(array.data, [builder.mul(args[1], columns)]), byte)
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        size = builder.mul(columns, ir.Constant(columns.type, itemsize))
        with cgutils.for_range_slice(builder, ir.Constant(columns.type, 0), size, ir.Constant(columns.type, 64)) as (offset, _):
            # read, locality 2 (keep in L2, not L1: the rows being multiplied live there), data
            builder.call(prefetch, [builder.gep(start, [offset]), i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return types.void(matrix, row), codegen


@njit(fastmath=FASTMATH, inline="always")
def _row_dots(x, w, r, out, o):  # [T, in] f32, [R, in] f32 (row r read), [T, out] f32 (column o written)
    """``out[t, o] = w[r] . x[t]`` for every row t, reading ``w[r]`` once per block of 4 rows.

    Plain 2-D indexing, no row views: a view per row costs reference counting on every
    output feature, which measured 2x slower at one row.
    """
    rows, n = x.shape
    t = 0
    while t + 4 <= rows:
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for i in range(n):
            u = w[r, i]
            a0 += u * x[t, i]
            a1 += u * x[t + 1, i]
            a2 += u * x[t + 2, i]
            a3 += u * x[t + 3, i]
        out[t, o], out[t + 1, o], out[t + 2, o], out[t + 3, o] = a0, a1, a2, a3
        t += 4
    if t + 2 <= rows:
        a0 = a1 = np.float32(0.0)
        for i in range(n):
            u = w[r, i]
            a0 += u * x[t, i]
            a1 += u * x[t + 1, i]
        out[t, o], out[t + 1, o] = a0, a1
        t += 2
    if t < rows:
        a0 = np.float32(0.0)
        for i in range(n):
            a0 += w[r, i] * x[t, i]
        out[t, o] = a0


@njit(fastmath=FASTMATH, inline="always")
def _pair_dots(x, w, r, out):  # [T, in] f32, [R, in] f32 (rows r, r+1 read), [T, out] f32 (columns r, r+1 written)
    """``_row_dots`` for two weight rows at once: each load of ``x[t, i]`` serves two products."""
    rows, n = x.shape
    t = 0
    while t + 4 <= rows:
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        for i in range(n):
            u, v = w[r, i], w[r + 1, i]
            x0, x1, x2, x3 = x[t, i], x[t + 1, i], x[t + 2, i], x[t + 3, i]
            a0 += u * x0
            a1 += u * x1
            a2 += u * x2
            a3 += u * x3
            b0 += v * x0
            b1 += v * x1
            b2 += v * x2
            b3 += v * x3
        out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = a0, a1, a2, a3
        out[t, r + 1], out[t + 1, r + 1], out[t + 2, r + 1], out[t + 3, r + 1] = b0, b1, b2, b3
        t += 4
    while t < rows:
        a0 = b0 = np.float32(0.0)
        for i in range(n):
            a0 += w[r, i] * x[t, i]
            b0 += w[r + 1, i] * x[t, i]
        out[t, r], out[t, r + 1] = a0, b0
        t += 1


@njit(fastmath=FASTMATH, cache=True)
def _linear_rows_f32(x, w, out, ahead, pairs):  # [T, in] f32, [out, in] f32, [T, out] f32 (written), int, bool
    """The hot loop: one pass over the weight, ``ahead`` rows prefetched in front of it (0: none),
    one weight row at a time, or two (``pairs``) with the last odd row on its own."""
    n_out = w.shape[0]
    o = 0
    if pairs:
        while o + 2 <= n_out:
            if o + ahead + 1 < n_out:
                _prefetch_row(w, o + ahead)
                _prefetch_row(w, o + ahead + 1)
            _pair_dots(x, w, o, out)
            o += 2
    while o < n_out:
        if ahead > 0 and o + ahead < n_out:
            _prefetch_row(w, o + ahead)
        _row_dots(x, w, o, out, o)
        o += 1


@njit(fastmath=FASTMATH, cache=True)
def _widen_half_row(half, row):  # [in] uint16 (float16 bits) -> [in] f32 (written)
    """Widen float16 bits to float32, exactly (the method of ``kernels_cpu.attention._float16_page``).

    A finite half (-1)^s * 2^(e-15) * 1.m becomes float32 by moving its exponent and
    mantissa bits up 13 places, which reads as 2^(e-127) * 1.m, then multiplying by
    2^112 (subnormal halves included). Exponent 31 becomes 255: inf stays inf, nan stays nan.
    """
    bits = row.view(np.uint32)
    for i in range(half.shape[0]):
        h = np.uint32(half[i])
        magnitude = (h & np.uint32(0x7FFF)) << np.uint32(13)
        if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):
            magnitude |= np.uint32(0x7F800000)
        bits[i] = ((h & np.uint32(0x8000)) << np.uint32(16)) | magnitude
    for i in range(row.shape[0]):
        row[i] *= np.float32(2.0**112)


@njit(fastmath=FASTMATH, cache=True)
def _linear_rows_f16(x, w_bits, out, ahead):  # [T, in] f32, [out, in] uint16 (float16 bits), [T, out] f32 (written), int
    n_out = w_bits.shape[0]
    row = np.empty((1, w_bits.shape[1]), dtype=np.float32)  # one widened weight row, reused
    for o in range(n_out):
        if ahead > 0 and o + ahead < n_out:
            _prefetch_row(w_bits, o + ahead)
        _widen_half_row(w_bits[o], row[0])
        _row_dots(x, row, 0, out, o)


def linear_rows(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, in] f32, [out, in] f32|f16 -> [T, out] f32
    """The compiled few-row product for any T (the dispatcher sends it T <= ``R_MAX``).

    ``x`` float32 (copied only if not C-contiguous); ``w`` C-contiguous float32 or
    float16. Each ``out[t, o]`` is one float32 dot product over ``in``, summed in SIMD
    lanes (a different order from BLAS's, within the ``linear`` tolerance).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    if w.dtype == np.float16:
        _linear_rows_f16(x, w.view(np.uint16), out, PREFETCH_AHEAD)
    else:
        _linear_rows_f32(x, w, out, PREFETCH_AHEAD, x.shape[0] >= PAIR_MIN_ROWS)
    return out


def linear_blas(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, in], [out, in] -> [T, out]
    """``x @ w.T`` through BLAS, weight as the left operand up to ``FEW_ROWS`` rows."""
    if x.shape[0] > FEW_ROWS:
        return kernels_ref.linear(x, w)
    if w.dtype != np.float32:
        w = w.astype(np.float32)
    return np.ascontiguousarray((w @ x.T).T)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, in], [out, in] -> [T, out]
    """``x @ w.T`` with w float32 or float16 (upcast; accumulation is float32).

    T <= ``R_MAX`` rows of float32 ``x`` against a C-contiguous weight: the compiled
    loop (:func:`linear_rows`); anything else: BLAS (:func:`linear_blas`).
    """
    if (
        x.shape[0] <= R_MAX
        and x.dtype == np.float32
        and w.dtype in (np.float32, np.float16)
        and w.flags.c_contiguous
    ):
        return linear_rows(x, w)
    return linear_blas(x, w)
