"""``y = x @ W.T`` for the cpu backend: a compiled few-row kernel, and BLAS for many rows.

A decode step multiplies one row per sequence by each weight matrix; a speculative
verification multiplies k + 1 rows of one sequence. With so few rows the product is
bound by reading the weights (SmolLM2-135M in float32: 540 MB per forward pass), so a
step of T rows should cost about what one row costs. BLAS does not get there: OpenBLAS's
GEMM for 2-32 rows costs 3-6x its GEMV for one row. So up to ``R_MAX`` rows a compiled
loop reads each weight row once for all rows of the step::

    for o in range(0, out, 4):                    the hot loop: one pass over W
        w4 = W[o:o+4]                             [4, in] (from memory once, then from L1)
        for each block of up to X_BLOCK rows:     x [T, in] is small: it stays in L1/L2
            y[t:t+n, o:o+4] = x[t:t+n] @ w4.T     4n dot products in one loop over in

Each ``_quad_dots_<n>`` is that loop for a block of n rows of x, its 4n sums written out
as scalars: LLVM vectorises the loop over ``in`` (``fastmath`` reassociation lets it split
every sum into SIMD lanes) and keeps the 4n lane vectors in registers, so one load of
``x[t, i:i+16]`` serves four weight rows and one load of ``W[o, i:i+16]`` serves n rows of
x. Everything accumulates in float32, as BLAS does. A float16 weight row is widened to
float32 in a scratch row first (exactly, from its bits: Numba's CPU target has no
float16), so an fp16 model reads half the bytes and never converts a whole matrix.

Measured (AMD EPYC Zen 5, 2 cores, AVX-512, OpenBLAS 0.3.31 on 1 thread as
``nanoserve.threads`` sets it, load average 0.1; thread CPU time per call, median of 9,
30 distinct weights per shape so that they stream from memory as in the model, rows
interleaved in every repeat). ``pairs``: the loop this one replaced, one or two weight
rows at a time against blocks of 4 rows of x, with a software prefetch 16 rows ahead::

    rows T   [3072, 576] gate/up          [576, 1536] down             [49152, 576] LM head
             BLAS   pairs   compiled      BLAS   pairs   compiled      BLAS    pairs   compiled
    1        0.248  0.282   0.258         0.125  0.164   0.116         4.09    4.34    3.88
    2        0.848  0.282   0.295         0.388  0.175   0.138         15.4    4.73    4.91
    3        0.999  0.389   0.321         0.451  0.210   0.154         17.2    5.93    5.33
    5        1.056  0.395   0.364         0.492  0.247   0.199         18.9    6.18    6.27
    9        1.065  0.672   0.485         0.487  0.309   0.261         19.5    9.82    8.20

Why the loop is shaped as it is:

* Four weight rows at once: one row was 10-30% slower at one row of x (gate/up 0.28 vs
  0.26 ms, down 0.16 vs 0.12), and four rows against one row of x runs as fast as the
  memory delivers the weights (about 27 GB/s here, what BLAS's GEMV reads too).
* ``X_BLOCK``, 5 with AVX-512, 2 without: a block of n rows of x keeps 4n accumulator
  vectors live, plus the four weight vectors. With AVX-512's 32 registers 20 accumulators
  fit, a block of 5 rows cost about what a block of 4 did, and k = 4 drafts make 5
  rows; every extra pass over a group of weight rows, even from L1, cost 30-50 ns per
  row, so 5 rows in one block beat 4 + 1. AVX2 has 16 registers: from 3 rows on the
  accumulators spill to the stack, and blocks of 2 won. Measured on an AMD EPYC with
  AVX2 only (Zen 3, LLVM's ``znver3``), thread CPU time per call, median of 7, 20
  distinct weights, a compiler busy on the other core; float32 weights (``_linear_rows_f32``) and Q4_1 widened four rows at
  a time (``kernels_cpu.quant_tiles._quad_rows``), block sizes 2 / 3 / 4 / 5, ms::

      rows T   [3072, 576] float32     [3072, 576] Q4_1        [576, 1536] Q4_1
      2        0.55 0.55 0.54 0.54     0.30 0.30 0.30 0.30     0.15 0.15 0.15 0.15
      5        0.69 0.66 0.73 0.79     0.46 0.59 0.58 1.17     0.23 0.29 0.28 0.53
      9        0.86 1.13 1.04 1.09     0.66 1.08 0.90 1.46     0.31 0.50 0.42 0.69
      16       1.15 1.87 1.55 1.79     0.90 1.66 1.41 3.11     0.45 0.80 0.65 1.48

  The block size is an argument of the kernels, not a constant compiled into them, so
  the tests run every size on every machine.
* No software prefetch: the hardware prefetcher keeps up with four sequential streams;
  ``llvm.prefetch`` 16 rows ahead made every shape 5-15% slower on this machine.
* ``R_MAX = 32``: at 32 rows the loop still beat GEMM on every shape (gate/up 1.48 vs
  2.64 ms, down 0.72 vs 0.90, LM head 23.2 vs 35.0), so a 32-stream decode step takes it
  too. It kept ahead up to 256 rows on this machine (gate/up 7.8 vs 9.9 ms); on the Zen 4
  machine of earlier measurements the loop it replaced lost to GEMM from about 16 rows,
  so prefill-sized products stay with BLAS.

Threads: the loop runs on the calling thread unless ``--threads N`` asks for more; then
:func:`_split_rows_f32` / :func:`_split_rows_f16` cut the output rows into N ranges at
multiples of four (``kernels_cpu.split``), each range the same loop, so every output keeps
its bits. Two threads were ~1.8x faster per call when the other core was idle, and up to
20x slower whenever another process held it (every call waits at a barrier for the
descheduled half), the same failure that made ``nanoserve.threads`` default to one thread.
"""

from __future__ import annotations

import numpy as np
from llvmlite.binding import get_host_cpu_features
from numba import njit, prange

import kernels_ref
from kernels_cpu.pointwise import FASTMATH
from kernels_cpu.split import part_bounds, parts_for

#: Up to this many rows the compiled loop computes the product; above it, BLAS (see above).
R_MAX = 32
#: Above ``R_MAX`` and up to this many rows, BLAS computes ``(W @ x.T).T``: with the
#: weight as the left operand OpenBLAS was 7-11% faster at 48-128 rows (a layer's four
#: matmuls, 30 layers of distinct weights); at 512 rows the usual order was 25% faster.
FEW_ROWS = 128
#: Rows of x that meet each group of four weight rows in one loop (:func:`_quad_dots_all`):
#: 5 where the CPU has AVX-512's 32 vector registers, 2 where it has AVX2's 16 (see above).
X_BLOCK = 5 if get_host_cpu_features().get("avx512f", False) else 2


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
def _quad_dots_1(x, w, r, t, out, o):  # [T, in] f32, [R, in] f32 (rows r..r+3 read), row t, [T, out] f32, column o
    """``out[t, o:o+4] = w[r:r+4] . x[t]``: four weight rows in one loop over ``in``."""
    a0 = b0 = c0 = d0 = np.float32(0.0)
    for i in range(x.shape[1]):
        x0 = x[t, i]
        a0 += w[r, i] * x0
        b0 += w[r + 1, i] * x0
        c0 += w[r + 2, i] * x0
        d0 += w[r + 3, i] * x0
    out[t, o], out[t, o + 1], out[t, o + 2], out[t, o + 3] = a0, b0, c0, d0


@njit(fastmath=FASTMATH, inline="always")
def _quad_dots_2(x, w, r, t, out, o):  # as _quad_dots_1, rows t, t+1 of x
    a0 = b0 = c0 = d0 = a1 = b1 = c1 = d1 = np.float32(0.0)
    for i in range(x.shape[1]):
        u0, u1, u2, u3 = w[r, i], w[r + 1, i], w[r + 2, i], w[r + 3, i]
        x0, x1 = x[t, i], x[t + 1, i]
        a0 += u0 * x0
        b0 += u1 * x0
        c0 += u2 * x0
        d0 += u3 * x0
        a1 += u0 * x1
        b1 += u1 * x1
        c1 += u2 * x1
        d1 += u3 * x1
    out[t, o], out[t, o + 1], out[t, o + 2], out[t, o + 3] = a0, b0, c0, d0
    out[t + 1, o], out[t + 1, o + 1], out[t + 1, o + 2], out[t + 1, o + 3] = a1, b1, c1, d1


@njit(fastmath=FASTMATH, inline="always")
def _quad_dots_3(x, w, r, t, out, o):  # as _quad_dots_1, rows t..t+2 of x
    a0 = b0 = c0 = d0 = a1 = b1 = c1 = d1 = a2 = b2 = c2 = d2 = np.float32(0.0)
    for i in range(x.shape[1]):
        u0, u1, u2, u3 = w[r, i], w[r + 1, i], w[r + 2, i], w[r + 3, i]
        x0, x1, x2 = x[t, i], x[t + 1, i], x[t + 2, i]
        a0 += u0 * x0
        b0 += u1 * x0
        c0 += u2 * x0
        d0 += u3 * x0
        a1 += u0 * x1
        b1 += u1 * x1
        c1 += u2 * x1
        d1 += u3 * x1
        a2 += u0 * x2
        b2 += u1 * x2
        c2 += u2 * x2
        d2 += u3 * x2
    out[t, o], out[t, o + 1], out[t, o + 2], out[t, o + 3] = a0, b0, c0, d0
    out[t + 1, o], out[t + 1, o + 1], out[t + 1, o + 2], out[t + 1, o + 3] = a1, b1, c1, d1
    out[t + 2, o], out[t + 2, o + 1], out[t + 2, o + 2], out[t + 2, o + 3] = a2, b2, c2, d2


@njit(fastmath=FASTMATH, inline="always")
def _quad_dots_4(x, w, r, t, out, o):  # as _quad_dots_1, rows t..t+3 of x
    a0 = b0 = c0 = d0 = a1 = b1 = c1 = d1 = a2 = b2 = c2 = d2 = a3 = b3 = c3 = d3 = np.float32(0.0)
    for i in range(x.shape[1]):
        u0, u1, u2, u3 = w[r, i], w[r + 1, i], w[r + 2, i], w[r + 3, i]
        x0, x1, x2, x3 = x[t, i], x[t + 1, i], x[t + 2, i], x[t + 3, i]
        a0 += u0 * x0
        b0 += u1 * x0
        c0 += u2 * x0
        d0 += u3 * x0
        a1 += u0 * x1
        b1 += u1 * x1
        c1 += u2 * x1
        d1 += u3 * x1
        a2 += u0 * x2
        b2 += u1 * x2
        c2 += u2 * x2
        d2 += u3 * x2
        a3 += u0 * x3
        b3 += u1 * x3
        c3 += u2 * x3
        d3 += u3 * x3
    out[t, o], out[t, o + 1], out[t, o + 2], out[t, o + 3] = a0, b0, c0, d0
    out[t + 1, o], out[t + 1, o + 1], out[t + 1, o + 2], out[t + 1, o + 3] = a1, b1, c1, d1
    out[t + 2, o], out[t + 2, o + 1], out[t + 2, o + 2], out[t + 2, o + 3] = a2, b2, c2, d2
    out[t + 3, o], out[t + 3, o + 1], out[t + 3, o + 2], out[t + 3, o + 3] = a3, b3, c3, d3


@njit(fastmath=FASTMATH, inline="always")
def _quad_dots_5(x, w, r, t, out, o):  # as _quad_dots_1, rows t..t+4 of x
    a0 = b0 = c0 = d0 = a1 = b1 = c1 = d1 = a2 = b2 = c2 = d2 = np.float32(0.0)
    a3 = b3 = c3 = d3 = a4 = b4 = c4 = d4 = np.float32(0.0)
    for i in range(x.shape[1]):
        u0, u1, u2, u3 = w[r, i], w[r + 1, i], w[r + 2, i], w[r + 3, i]
        x0, x1, x2, x3, x4 = x[t, i], x[t + 1, i], x[t + 2, i], x[t + 3, i], x[t + 4, i]
        a0 += u0 * x0
        b0 += u1 * x0
        c0 += u2 * x0
        d0 += u3 * x0
        a1 += u0 * x1
        b1 += u1 * x1
        c1 += u2 * x1
        d1 += u3 * x1
        a2 += u0 * x2
        b2 += u1 * x2
        c2 += u2 * x2
        d2 += u3 * x2
        a3 += u0 * x3
        b3 += u1 * x3
        c3 += u2 * x3
        d3 += u3 * x3
        a4 += u0 * x4
        b4 += u1 * x4
        c4 += u2 * x4
        d4 += u3 * x4
    out[t, o], out[t, o + 1], out[t, o + 2], out[t, o + 3] = a0, b0, c0, d0
    out[t + 1, o], out[t + 1, o + 1], out[t + 1, o + 2], out[t + 1, o + 3] = a1, b1, c1, d1
    out[t + 2, o], out[t + 2, o + 1], out[t + 2, o + 2], out[t + 2, o + 3] = a2, b2, c2, d2
    out[t + 3, o], out[t + 3, o + 1], out[t + 3, o + 2], out[t + 3, o + 3] = a3, b3, c3, d3
    out[t + 4, o], out[t + 4, o + 1], out[t + 4, o + 2], out[t + 4, o + 3] = a4, b4, c4, d4


@njit(fastmath=FASTMATH, inline="always")
def _quad_dots_all(x, w, r, out, o, x_block):  # [T, in] f32, [R, in] f32 (rows r..r+3 read), [T, out] f32 (columns o..o+3 written), 1..5
    """``out[:, o:o+4] = x @ w[r:r+4].T``: the rows of x in blocks of up to ``x_block``."""
    rows = x.shape[0]
    t = 0
    while t < rows:
        block = min(rows - t, x_block)
        if block == 1:
            _quad_dots_1(x, w, r, t, out, o)
        elif block == 2:
            _quad_dots_2(x, w, r, t, out, o)
        elif block == 3:
            _quad_dots_3(x, w, r, t, out, o)
        elif block == 4:
            _quad_dots_4(x, w, r, t, out, o)
        else:
            _quad_dots_5(x, w, r, t, out, o)
        t += block


@njit(fastmath=FASTMATH, cache=True)
def _linear_rows_f32(x, w, out, x_block, lo, hi):  # [T, in] f32, [out, in] f32, [T, out] f32 (columns lo..hi written), 1..5, ints
    """The hot loop: one pass over weight rows ``lo .. hi``, four rows at a time. Each group
    of four weight rows meets the rows of x in blocks of up to ``x_block``
    (:func:`_quad_dots_all`); the last ``(hi - lo) % 4`` weight rows go one at a time
    (:func:`_row_dots`)."""
    o = lo
    while o + 4 <= hi:
        _quad_dots_all(x, w, o, out, o, x_block)
        o += 4
    while o < hi:
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
def _linear_rows_f16(x, w_bits, out, x_block, lo, hi):  # [T, in] f32, [out, in] uint16 (float16 bits), [T, out] f32 (columns lo..hi written), 1..5, ints
    """:func:`_linear_rows_f32` on float16 weights: each group of four rows is widened into a
    float32 scratch (in L1), then meets the rows of x as float32 weights do."""
    quad = np.empty((4, w_bits.shape[1]), dtype=np.float32)  # four widened weight rows, reused
    o = lo
    while o < hi:
        if o + 4 <= hi:
            for j in range(4):
                _widen_half_row(w_bits[o + j], quad[j])
            _quad_dots_all(x, quad, 0, out, o, x_block)
            o += 4
        else:
            _widen_half_row(w_bits[o], quad[0])
            _row_dots(x, quad, 0, out, o)
            o += 1


@njit(parallel=True, cache=True)
def _split_rows_f32(x, w, out, x_block, parts):  # as _linear_rows_f32, all rows, over ``parts`` threads (kernels_cpu.split)
    for p in prange(parts):
        lo, hi = part_bounds(w.shape[0], p, parts, 4)
        _linear_rows_f32(x, w, out, x_block, lo, hi)


@njit(parallel=True, cache=True)
def _split_rows_f16(x, w_bits, out, x_block, parts):  # as _linear_rows_f16, all rows, over ``parts`` threads
    for p in prange(parts):
        lo, hi = part_bounds(w_bits.shape[0], p, parts, 4)
        _linear_rows_f16(x, w_bits, out, x_block, lo, hi)


def linear_rows(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, in] f32, [out, in] f32|f16 -> [T, out] f32
    """The compiled few-row product for any T (the dispatcher sends it T <= ``R_MAX``).

    ``x`` float32 (copied only if not C-contiguous); ``w`` C-contiguous float32 or
    float16. Each ``out[t, o]`` is one float32 dot product over ``in``, summed in SIMD
    lanes (a different order from BLAS's, within the ``linear`` tolerance).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    parts = parts_for(w.shape[0], 4)  # output rows split over threads (kernels_cpu.split)
    if w.dtype == np.float16:
        if parts > 1:
            _split_rows_f16(x, w.view(np.uint16), out, X_BLOCK, parts)
        else:
            _linear_rows_f16(x, w.view(np.uint16), out, X_BLOCK, 0, w.shape[0])
    elif parts > 1:
        _split_rows_f32(x, w, out, X_BLOCK, parts)
    else:
        _linear_rows_f32(x, w, out, X_BLOCK, 0, w.shape[0])
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
