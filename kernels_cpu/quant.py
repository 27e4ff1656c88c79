"""Fused quantized linears ``y = x @ W.T`` for the cpu backend: the weights stay quantized.

The reference (``kernels_ref.linear``) defines each quantized linear as "dequantize the
whole matrix to float32, then BLAS". That writes and re-reads 4 bytes per weight on
every call, so a decode step cost more than the float32 model it was meant to beat. Here
each kernel reads the format's bytes (layouts: ``kernels_ref.quant``) and widens them to
float32 where they are used, by one of three paths chosen by the number of rows T:

    one row (a single-stream decode step): the lanes kernels, nothing materialised
        for o in range(out):
            y[0, o] = dot(x[0], W[o])             16 float32 lanes, block by block:
                for b in blocks of W[o]:          d_b = F16_TABLE[the block's f16 bits]
                    lane[j] += d_b * (q[j] * x[j] + q[j+16] * x[j+16])   j = 0..15
                y = sum(lanes)
    2 .. R_MAX_QUAD rows (batched decode, a speculative verification): the quad kernels,
        four output rows at a time widened into L1, then kernels_cpu.linear's loop
    more rows (prefill): ``TILE_ROWS`` output rows at a time widened into a float32 tile,
        then BLAS

The last two widen exactly the reference's float32 weights into memory first; they live
in ``kernels_cpu.quant_tiles``. int8 (one scale per row) takes the same three paths, its
one-row kernel a flat loop over each row. int4 keeps a lanes kernel up to ``R_MAX`` rows
(the quad kernel and tiles above).

Why three: the lanes kernel widens a row's bytes once per row of x, so its cost grows
with T (Q4_1 [3072, 576]: 0.24 ms at T = 1, 0.64 at 5, 2.0 at 16); the quad kernel widens
each byte once per call, and its dot products cost what float32 weights cost from L1 (0.29
ms at T = 1, 0.34 at 5, 0.62 at 16); above 32 rows, BLAS. Measured (AMD EPYC Zen 5, 2
cores, load average 0.2, thread CPU time per call, median of 7, 30 distinct matrices per
shape so that their bytes stream from memory as in the model), ms:

    fmt   [out, in]        T=1 lanes/quad   T=2 lanes/quad   T=5 lanes/quad/tiles  T=32 quad/tiles
    q4_1  [3072, 576]        0.24 / 0.29      0.33 / 0.26      0.64 / 0.34 / 0.86    0.89 / 1.55
    q4_1  [576, 1536]        0.08 / 0.11      0.11 / 0.13      0.38 / 0.18 / 0.45    0.53 / 0.82
    q4_1  [49152, 576]       2.66 / 3.55      4.16 / 3.81      9.23 / 4.90 / 12.6    16.6 / 25.2
    q8_0  [3072, 576]        0.22 / 0.33      0.29 / 0.28      0.64 / 0.40 / 0.84    1.17 / 1.64
    q8_0  [49152, 576]       2.13 / 4.95      6.49 / 6.75      9.28 / 6.39 / 13.7    18.9 / 27.3
    q4_0  [3072, 576]        0.17 / 0.21      0.25 / 0.21      0.57 / 0.31 / 0.85    1.00 / 1.70

Vectorising the lanes kernels. The 16 accumulators ``a0 .. a15`` written out in each ``_dot_*`` are the 16
float32 lanes of one AVX-512 register (two AVX2 ones): LLVM's SLP vectorizer packs each
line's loads, conversions and products into one vector instruction per lane group, and
the horizontal sum happens once per output row, not once per 32-weight block. Three things
make that happen, the first two measured on SmolLM2's [3072, 576] Q8_0 matrix at T = 1:

* Numba compiles with LLVM's SLP vectorizer off (``NUMBA_SLP_VECTORIZE=0``) unless told
  otherwise; :func:`kernels_cpu.quant_tiles._run` turns it on while one of these kernels
  compiles, for these kernels only. Off, the same source ran as scalar code: 2.4 ms instead of 0.19.
* No ``fastmath`` reassociation in the ``_dot_*`` kernels: with it, LLVM's loop vectorizer
  takes the loop over blocks instead, with a gather per lane (1.4-2.4 ms); without it that
  loop is not vectorisable and the SLP vectorizer gets the block. Each lane then sums in
  block order; the 16 lanes are added in order at the end (written as a tree of adds,
  the whole kernel ran 3x slower: the vectorizer no longer packed the block).
* The ``_dot_*`` function is inlined into its row loop (``inline="always"``) and compiled
  with the one fastmath flag ``contract`` (:data:`CONTRACT`: multiply-adds fused, never
  reordered). As a call, each output row paid for passing some 30 arguments on the
  stack, about as long as its 18 blocks of arithmetic took; with both, the one-row
  kernels ran 1.1-1.6x faster than the call without fused multiply-adds (the T=1 lanes
  column above is from before; since, in ms, before -> after, same machine, interleaved:
  q4_1 [3072, 576] 0.19 -> 0.15, [576, 1536] 0.093 -> 0.076, [49152, 576] 2.71 -> 2.01;
  q8_0 [3072, 576] 0.18 -> 0.11, [49152, 576] 2.85 -> 1.75; q4_0 [3072, 576] 0.14 -> 0.13).

A written-out loop over the 32 weights of a block (``for j in range(32)``) fared worse
every way it was tried (0.25-1.5 ms): its horizontal sum per block, or the loop vectorizer
again taking the block loop. For comparison, the plain float32 dot over the same matrix
(``_row_dots`` on float32 rows) took 0.13 ms, the int8 per-channel flat loop 0.08 ms.

Rounding: Q8_0, Q4_0 and int4 take their scale out of the block's sum (``d * sum(q * x)``),
which bounds the error by the same ``|x| @ |W|.T`` as the reference's order; Q4_1 widens
each weight as the reference does (``d * q + m``, fused: rounded once, where the
reference rounds twice, then the product), because its
minimum ``m`` can cancel ``d * q`` (written as ``d * sum(q * x) + m * sum(x)``, with the
block sums of x computed once per call, it also ran 3.5x slower: the extra accumulator
kept the SLP vectorizer off the block). The quad kernels and the tiles widen exactly the
reference's float32 weights, then multiply. All accumulate in float32; results differ
from the reference only by summation order, within ``check_kernels.tolerances.DOT``.

In the model, a single-stream decode step spends most of its time in the lanes kernels
(``python bench/quant.py --profile gguf``: 5.5 ms of an 11.1 ms step in ``_rows_q4_1``,
1.4 ms in the Q8_0 LM head): they widen about 19 G weights/s on one core, bound by the
instructions of widening (some 20 per block of 32 weights, a third of them scalar: the
float16 scales' table lookups), not by memory, so a Q4_1 model's step is about 2.3x faster
than float32's, not the 6x its bytes would allow. The scales' bits are read as one 16-bit
word each (``h3``, the blocks viewed as uint16) rather than two bytes put together: 1.1x on
the one-row kernels.

Threads: by default every kernel here runs on the calling thread. With ``--threads N``
(``nanoserve.threads``) the lanes and quad kernels split their output rows over N threads
(``_split_*``, ``kernels_cpu.split``: each output is still one thread's sum, the same bits).
SmolLM2's Q4_1 matrices, each of the 30 layers' own (so the bytes stream from memory as in
the model), one row, wall microseconds per call through ``linear_q4_1``, median of 15, 1 / 2
threads, AMD EPYC AVX2 (Zen 3), idle: QKV [960, 576] 94 / 61, output [576, 576] 68 / 51,
gate-up [3072, 576] 273 / 166, down [576, 1536] 141 / 88: 1.3-1.6x, not 2x. The kernel
alone (``_rows_q4_1`` against ``_split_q4_1``, 20 random [576, 576] matrices) took 55 / 38
us, so starting and joining the threads costs about 10 us a call. The same
split on a busy machine took 8.0 ms where the one-thread kernel took 0.27 ms (load
average 3.4): the join waits for whichever thread was descheduled, as OpenBLAS's
threads do, which is why one thread stays the default. The prefill tiles' BLAS calls
use the threads ``nanoserve.threads`` set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit, prange

from kernels_cpu.linear import R_MAX as R_MAX_LINEAR
from kernels_cpu.pointwise import FASTMATH
from kernels_cpu.quant_tiles import (
    F16_TABLE,
    INT4,
    INT8,
    Q4_0,
    Q4_1,
    Q8_0,
    _int4_row,
    _row_dots,
    _run,
    _tile_int4,
    _tile_int8,
    _tile_q4_0,
    _tile_q4_1,
    _tile_q8_0,
    linear_tiled,
    quad_rows,
)
from kernels_cpu.split import part_bounds, parts_for
from kernels_ref.quant import Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK

#: Up to this many rows int4 takes its fused lanes kernel; above it, up to ``R_MAX_QUAD``,
#: the quad kernel (four rows widened into L1), then float32 tiles into BLAS. The lanes
#: kernel re-widens a row's bytes for every input row, so its cost grows with T. Int4
#: [3072, 576], thread CPU ms per call, lanes / quad (AMD EPYC, AVX2 only, Zen 3):
#: T = 2: 0.42 / 0.93, T = 5: 1.17 / 1.13, T = 8: 1.88 / 1.09, T = 16: 3.70 / 1.58;
#: [576, 1536]: T = 5: 0.52 / 0.45, T = 8: 0.83 / 0.56.
R_MAX = 4
#: From 2 rows up to this many, int8 and the GGUF block formats take the quad kernels (four
#: weight rows widened into L1, then ``kernels_cpu.linear``'s loop), as float32 weights
#: take that loop up to ``kernels_cpu.linear.R_MAX`` rows; above it, float32 tiles into BLAS.
R_MAX_QUAD = R_MAX_LINEAR
#: The int4 group size with a vectorised kernel (``nanoserve.quant`` quantizes with it);
#: other group sizes take a plain loop.
INT4_FAST_GROUP = 32


#: The lanes kernels' one fastmath flag: ``a * b + c`` may become one fused multiply-add
#: (rounded once). No reassociation: each lane still sums its blocks in order.
CONTRACT = {"contract"}

f32 = np.float32  # short, for the lane lines below


# --- decode shapes: 16 lanes per output row, one block of 32 weights at a time -------------------


@njit(inline="always", fastmath=CONTRACT, cache=True)
def _dot_q8_0(x3, t, h3, q3, o, table):  # [T, nb, 32] f32, int, uint16 [out, nb, 17], int8 [out, nb, 34], int, [65536] -> f32
    """``x[t] . W[o]`` for Q8_0 blocks | d: f16 | q[0..31]: int8 |, lane j taking weights j and j+16."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = f32(0.0)
    for b in range(h3.shape[1]):
        d = table[h3[o, b, 0]]
        qb = q3[o, b]
        xb = x3[t, b]
        a0 += d * (f32(qb[2]) * xb[0] + f32(qb[18]) * xb[16])
        a1 += d * (f32(qb[3]) * xb[1] + f32(qb[19]) * xb[17])
        a2 += d * (f32(qb[4]) * xb[2] + f32(qb[20]) * xb[18])
        a3 += d * (f32(qb[5]) * xb[3] + f32(qb[21]) * xb[19])
        a4 += d * (f32(qb[6]) * xb[4] + f32(qb[22]) * xb[20])
        a5 += d * (f32(qb[7]) * xb[5] + f32(qb[23]) * xb[21])
        a6 += d * (f32(qb[8]) * xb[6] + f32(qb[24]) * xb[22])
        a7 += d * (f32(qb[9]) * xb[7] + f32(qb[25]) * xb[23])
        a8 += d * (f32(qb[10]) * xb[8] + f32(qb[26]) * xb[24])
        a9 += d * (f32(qb[11]) * xb[9] + f32(qb[27]) * xb[25])
        a10 += d * (f32(qb[12]) * xb[10] + f32(qb[28]) * xb[26])
        a11 += d * (f32(qb[13]) * xb[11] + f32(qb[29]) * xb[27])
        a12 += d * (f32(qb[14]) * xb[12] + f32(qb[30]) * xb[28])
        a13 += d * (f32(qb[15]) * xb[13] + f32(qb[31]) * xb[29])
        a14 += d * (f32(qb[16]) * xb[14] + f32(qb[32]) * xb[30])
        a15 += d * (f32(qb[17]) * xb[15] + f32(qb[33]) * xb[31])
    return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15


@njit(inline="always", fastmath=CONTRACT, cache=True)
def _dot_q4_0(x3, t, r3, h3, o, table):  # [T, nb, 32] f32, int, uint8 [out, nb, 18], uint16 [out, nb, 9], int, [65536] -> f32
    """``x[t] . W[o]`` for Q4_0 blocks | d: f16 | qs[0..15] |: byte j holds weights j (low) and j+16 (high)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = f32(0.0)
    for b in range(r3.shape[1]):
        d = table[h3[o, b, 0]]
        qb = r3[o, b]
        xb = x3[t, b]
        a0 += d * (f32((qb[2] & 0xF) - 8) * xb[0] + f32((qb[2] >> 4) - 8) * xb[16])
        a1 += d * (f32((qb[3] & 0xF) - 8) * xb[1] + f32((qb[3] >> 4) - 8) * xb[17])
        a2 += d * (f32((qb[4] & 0xF) - 8) * xb[2] + f32((qb[4] >> 4) - 8) * xb[18])
        a3 += d * (f32((qb[5] & 0xF) - 8) * xb[3] + f32((qb[5] >> 4) - 8) * xb[19])
        a4 += d * (f32((qb[6] & 0xF) - 8) * xb[4] + f32((qb[6] >> 4) - 8) * xb[20])
        a5 += d * (f32((qb[7] & 0xF) - 8) * xb[5] + f32((qb[7] >> 4) - 8) * xb[21])
        a6 += d * (f32((qb[8] & 0xF) - 8) * xb[6] + f32((qb[8] >> 4) - 8) * xb[22])
        a7 += d * (f32((qb[9] & 0xF) - 8) * xb[7] + f32((qb[9] >> 4) - 8) * xb[23])
        a8 += d * (f32((qb[10] & 0xF) - 8) * xb[8] + f32((qb[10] >> 4) - 8) * xb[24])
        a9 += d * (f32((qb[11] & 0xF) - 8) * xb[9] + f32((qb[11] >> 4) - 8) * xb[25])
        a10 += d * (f32((qb[12] & 0xF) - 8) * xb[10] + f32((qb[12] >> 4) - 8) * xb[26])
        a11 += d * (f32((qb[13] & 0xF) - 8) * xb[11] + f32((qb[13] >> 4) - 8) * xb[27])
        a12 += d * (f32((qb[14] & 0xF) - 8) * xb[12] + f32((qb[14] >> 4) - 8) * xb[28])
        a13 += d * (f32((qb[15] & 0xF) - 8) * xb[13] + f32((qb[15] >> 4) - 8) * xb[29])
        a14 += d * (f32((qb[16] & 0xF) - 8) * xb[14] + f32((qb[16] >> 4) - 8) * xb[30])
        a15 += d * (f32((qb[17] & 0xF) - 8) * xb[15] + f32((qb[17] >> 4) - 8) * xb[31])
    return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15


@njit(inline="always", fastmath=CONTRACT, cache=True)
def _dot_q4_1(x3, t, r3, h3, o, table):  # [T, nb, 32] f32, int, uint8 [out, nb, 20], uint16 [out, nb, 10], int, [65536] -> f32
    """``x[t] . W[o]`` for Q4_1 blocks | d: f16 | m: f16 | qs[0..15] |, each weight ``d * q + m``."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = f32(0.0)
    for b in range(r3.shape[1]):
        d = table[h3[o, b, 0]]
        m = table[h3[o, b, 1]]
        qb = r3[o, b]
        xb = x3[t, b]
        a0 += (d * f32(qb[4] & 0xF) + m) * xb[0] + (d * f32(qb[4] >> 4) + m) * xb[16]
        a1 += (d * f32(qb[5] & 0xF) + m) * xb[1] + (d * f32(qb[5] >> 4) + m) * xb[17]
        a2 += (d * f32(qb[6] & 0xF) + m) * xb[2] + (d * f32(qb[6] >> 4) + m) * xb[18]
        a3 += (d * f32(qb[7] & 0xF) + m) * xb[3] + (d * f32(qb[7] >> 4) + m) * xb[19]
        a4 += (d * f32(qb[8] & 0xF) + m) * xb[4] + (d * f32(qb[8] >> 4) + m) * xb[20]
        a5 += (d * f32(qb[9] & 0xF) + m) * xb[5] + (d * f32(qb[9] >> 4) + m) * xb[21]
        a6 += (d * f32(qb[10] & 0xF) + m) * xb[6] + (d * f32(qb[10] >> 4) + m) * xb[22]
        a7 += (d * f32(qb[11] & 0xF) + m) * xb[7] + (d * f32(qb[11] >> 4) + m) * xb[23]
        a8 += (d * f32(qb[12] & 0xF) + m) * xb[8] + (d * f32(qb[12] >> 4) + m) * xb[24]
        a9 += (d * f32(qb[13] & 0xF) + m) * xb[9] + (d * f32(qb[13] >> 4) + m) * xb[25]
        a10 += (d * f32(qb[14] & 0xF) + m) * xb[10] + (d * f32(qb[14] >> 4) + m) * xb[26]
        a11 += (d * f32(qb[15] & 0xF) + m) * xb[11] + (d * f32(qb[15] >> 4) + m) * xb[27]
        a12 += (d * f32(qb[16] & 0xF) + m) * xb[12] + (d * f32(qb[16] >> 4) + m) * xb[28]
        a13 += (d * f32(qb[17] & 0xF) + m) * xb[13] + (d * f32(qb[17] >> 4) + m) * xb[29]
        a14 += (d * f32(qb[18] & 0xF) + m) * xb[14] + (d * f32(qb[18] >> 4) + m) * xb[30]
        a15 += (d * f32(qb[19] & 0xF) + m) * xb[15] + (d * f32(qb[19] >> 4) + m) * xb[31]
    return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15


@njit(inline="always", fastmath=CONTRACT, cache=True)
def _dot_int4(xe3, xo3, t, q3, scales, o):  # [T, G, 16] f32 x2, int, uint8 [out, G, 16], f32 [out, G], int -> f32
    """``x[t] . W[o]`` for int4 groups of 32 columns: byte j of a group holds columns 2j (low) and 2j+1.

    ``xe3`` / ``xo3`` are x's even and odd columns, so lane j meets its byte's two weights
    in two contiguous runs instead of one interleaved one.
    """
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = f32(0.0)
    for g in range(q3.shape[1]):
        s = scales[o, g]
        qg = q3[o, g]
        xe = xe3[t, g]
        xo = xo3[t, g]
        a0 += s * (f32((qg[0] & 0xF) - 8) * xe[0] + f32((qg[0] >> 4) - 8) * xo[0])
        a1 += s * (f32((qg[1] & 0xF) - 8) * xe[1] + f32((qg[1] >> 4) - 8) * xo[1])
        a2 += s * (f32((qg[2] & 0xF) - 8) * xe[2] + f32((qg[2] >> 4) - 8) * xo[2])
        a3 += s * (f32((qg[3] & 0xF) - 8) * xe[3] + f32((qg[3] >> 4) - 8) * xo[3])
        a4 += s * (f32((qg[4] & 0xF) - 8) * xe[4] + f32((qg[4] >> 4) - 8) * xo[4])
        a5 += s * (f32((qg[5] & 0xF) - 8) * xe[5] + f32((qg[5] >> 4) - 8) * xo[5])
        a6 += s * (f32((qg[6] & 0xF) - 8) * xe[6] + f32((qg[6] >> 4) - 8) * xo[6])
        a7 += s * (f32((qg[7] & 0xF) - 8) * xe[7] + f32((qg[7] >> 4) - 8) * xo[7])
        a8 += s * (f32((qg[8] & 0xF) - 8) * xe[8] + f32((qg[8] >> 4) - 8) * xo[8])
        a9 += s * (f32((qg[9] & 0xF) - 8) * xe[9] + f32((qg[9] >> 4) - 8) * xo[9])
        a10 += s * (f32((qg[10] & 0xF) - 8) * xe[10] + f32((qg[10] >> 4) - 8) * xo[10])
        a11 += s * (f32((qg[11] & 0xF) - 8) * xe[11] + f32((qg[11] >> 4) - 8) * xo[11])
        a12 += s * (f32((qg[12] & 0xF) - 8) * xe[12] + f32((qg[12] >> 4) - 8) * xo[12])
        a13 += s * (f32((qg[13] & 0xF) - 8) * xe[13] + f32((qg[13] >> 4) - 8) * xo[13])
        a14 += s * (f32((qg[14] & 0xF) - 8) * xe[14] + f32((qg[14] >> 4) - 8) * xo[14])
        a15 += s * (f32((qg[15] & 0xF) - 8) * xe[15] + f32((qg[15] >> 4) - 8) * xo[15])
    return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15


@njit(fastmath=CONTRACT, cache=True)
def _rows_q8_0(x, raw, table, out, lo, hi):  # [T, in] f32, uint8 [out, in/32*34], [65536], [T, out] f32 (columns lo..hi written)
    rows, n = x.shape
    x3 = x.reshape(rows, n // QK, QK)
    # the blocks as 16-bit words, so that a scale's f16 bits are one load (little-endian, as GGUF)
    h3 = raw.view(np.uint16).reshape(raw.shape[0], n // QK, Q8_0_BLOCK_BYTES // 2)
    q3 = raw.view(np.int8).reshape(raw.shape[0], n // QK, Q8_0_BLOCK_BYTES)
    for o in range(lo, hi):
        for t in range(rows):
            out[t, o] = _dot_q8_0(x3, t, h3, q3, o, table)


@njit(fastmath=CONTRACT, cache=True)
def _rows_q4_0(x, raw, table, out, lo, hi):  # [T, in] f32, uint8 [out, in/32*18], [65536], [T, out] f32 (columns lo..hi written)
    rows, n = x.shape
    x3 = x.reshape(rows, n // QK, QK)
    r3 = raw.reshape(raw.shape[0], n // QK, Q4_0_BLOCK_BYTES)
    h3 = raw.view(np.uint16).reshape(raw.shape[0], n // QK, Q4_0_BLOCK_BYTES // 2)
    for o in range(lo, hi):
        for t in range(rows):
            out[t, o] = _dot_q4_0(x3, t, r3, h3, o, table)


@njit(fastmath=CONTRACT, cache=True)
def _rows_q4_1(x, raw, table, out, lo, hi):  # [T, in] f32, uint8 [out, in/32*20], [65536], [T, out] f32 (columns lo..hi written)
    rows, n = x.shape
    x3 = x.reshape(rows, n // QK, QK)
    r3 = raw.reshape(raw.shape[0], n // QK, Q4_1_BLOCK_BYTES)
    h3 = raw.view(np.uint16).reshape(raw.shape[0], n // QK, Q4_1_BLOCK_BYTES // 2)
    for o in range(lo, hi):
        for t in range(rows):
            out[t, o] = _dot_q4_1(x3, t, r3, h3, o, table)


@njit(fastmath=CONTRACT, cache=True)
def _rows_int4(x_even, x_odd, qweight, scales, out, lo, hi):  # [T, in/2] f32 x2, uint8 [out, in/2], f32 [out, G], [T, out] (columns lo..hi)
    rows, half = x_even.shape
    groups = scales.shape[1]
    xe3 = x_even.reshape(rows, groups, half // groups)
    xo3 = x_odd.reshape(rows, groups, half // groups)
    q3 = qweight.reshape(qweight.shape[0], groups, half // groups)
    for o in range(lo, hi):
        for t in range(rows):
            out[t, o] = _dot_int4(xe3, xo3, t, q3, scales, o)


@njit(fastmath=FASTMATH, cache=True)
def _rows_int8(x, qweight, scale, out, lo, hi):  # [1, in] f32, int8 [out, in], f32 [out], [1, out] f32 (columns lo..hi written)
    """One row of x: each weight widened as it is multiplied (no scratch row)."""
    x0 = x[0]
    for o in range(lo, hi):
        q = qweight[o]
        acc = f32(0.0)
        for i in range(x0.shape[0]):
            acc += f32(q[i]) * x0[i]
        out[0, o] = acc * scale[o]


@njit(fastmath=FASTMATH, cache=True)
def _rows_int4_any_group(x, qweight, scales, out):  # [T, in], uint8 [out, in/2], f32 [out, G], [T, out] (written)
    row = np.empty(x.shape[1], dtype=np.float32)
    for o in range(qweight.shape[0]):
        _int4_row(qweight[o], scales[o], row)
        _row_dots(x, row, f32(1.0), out, o)


# --- the same, output rows split over threads (kernels_cpu.split: every bit as above) --------------


@njit(parallel=True, cache=True)
def _split_q8_0(x, raw, table, out, parts):  # as _rows_q8_0, all rows; parts >= 1 threads
    for p in prange(parts):
        lo, hi = part_bounds(raw.shape[0], p, parts, 1)
        _rows_q8_0(x, raw, table, out, lo, hi)


@njit(parallel=True, cache=True)
def _split_q4_0(x, raw, table, out, parts):  # as _rows_q4_0, all rows
    for p in prange(parts):
        lo, hi = part_bounds(raw.shape[0], p, parts, 1)
        _rows_q4_0(x, raw, table, out, lo, hi)


@njit(parallel=True, cache=True)
def _split_q4_1(x, raw, table, out, parts):  # as _rows_q4_1, all rows
    for p in prange(parts):
        lo, hi = part_bounds(raw.shape[0], p, parts, 1)
        _rows_q4_1(x, raw, table, out, lo, hi)


@njit(parallel=True, cache=True)
def _split_int4(x_even, x_odd, qweight, scales, out, parts):  # as _rows_int4, all rows
    for p in prange(parts):
        lo, hi = part_bounds(qweight.shape[0], p, parts, 1)
        _rows_int4(x_even, x_odd, qweight, scales, out, lo, hi)


@njit(parallel=True, cache=True)
def _split_int8(x, qweight, scale, out, parts):  # as _rows_int8, all rows
    for p in prange(parts):
        lo, hi = part_bounds(qweight.shape[0], p, parts, 1)
        _rows_int8(x, qweight, scale, out, lo, hi)


# --- the kernels ----------------------------------------------------------------------------------


def _x32(x: np.ndarray) -> np.ndarray:  # [T, in] any float -> C-contiguous float32
    return np.ascontiguousarray(x, dtype=np.float32)


def _gguf_linear(x: np.ndarray, raw: np.ndarray, block_bytes: int, lanes_kernel: Callable[..., None],
                 split_kernel: Callable[..., None], quad_format: int, tile_kernel: Callable[..., None],
                 name: str) -> np.ndarray:  # fmt: skip
    """One row: the lanes kernel (``split_kernel`` over threads, kernels_cpu.split); up to
    ``R_MAX_QUAD`` rows: the quad kernel; more: BLAS tiles."""
    x = _x32(x)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % block_bytes:
        raise ValueError(f"{name}: expected uint8 [out, n*{block_bytes}] raw blocks, got {raw.dtype} {raw.shape}")
    if raw.shape[1] // block_bytes * QK != x.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[1]} features, the blocks hold {raw.shape[1] // block_bytes * QK}")
    raw = np.ascontiguousarray(raw)
    if x.shape[0] > R_MAX_QUAD:
        return linear_tiled(x, raw.shape[0], tile_kernel, raw, F16_TABLE)
    out = np.empty((x.shape[0], raw.shape[0]), dtype=np.float32)
    if x.shape[0] != 1:  # 2 .. R_MAX_QUAD rows, or none
        quad_rows(quad_format, x, raw, F16_TABLE, out)
    elif (parts := parts_for(raw.shape[0])) > 1:
        _run(split_kernel, x, raw, F16_TABLE, out, parts)
    else:
        _run(lanes_kernel, x, raw, F16_TABLE, out, 0, raw.shape[0])
    return out


def linear_q8_0(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*34] -> [T, out]
    """``x @ dequantize_q8_0(raw).T``, reading the Q8_0 blocks in place (see the module docstring)."""
    return _gguf_linear(x, raw, Q8_0_BLOCK_BYTES, _rows_q8_0, _split_q8_0, Q8_0, _tile_q8_0, "linear_q8_0")


def linear_q4_0(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*18] -> [T, out]
    """``x @ dequantize_q4_0(raw).T``, reading the Q4_0 blocks in place."""
    return _gguf_linear(x, raw, Q4_0_BLOCK_BYTES, _rows_q4_0, _split_q4_0, Q4_0, _tile_q4_0, "linear_q4_0")


def linear_q4_1(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*20] -> [T, out]
    """``x @ dequantize_q4_1(raw).T``, reading the Q4_1 blocks in place."""
    return _gguf_linear(x, raw, Q4_1_BLOCK_BYTES, _rows_q4_1, _split_q4_1, Q4_1, _tile_q4_1, "linear_q4_1")


def linear_int8(x: np.ndarray, qweight: np.ndarray, scale: np.ndarray) -> np.ndarray:  # [T, in], int8 [out, in], f32 [out] -> [T, out]
    """``x @ (qweight * scale[:, None]).T``: each output is ``scale[o] * (q[o] . x[t])`` in float32."""
    x = _x32(x)
    qweight = np.ascontiguousarray(qweight)
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    if qweight.shape[1] != x.shape[1]:
        raise ValueError(f"linear_int8: x has {x.shape[1]} features, the weight {qweight.shape[1]}")
    if x.shape[0] > R_MAX_QUAD:
        return linear_tiled(x, qweight.shape[0], _tile_int8, qweight, scale)
    out = np.empty((x.shape[0], qweight.shape[0]), dtype=np.float32)
    if x.shape[0] != 1:  # 2 .. R_MAX_QUAD rows, or none (_rows_int8 reads x[0])
        quad_rows(INT8, x, qweight, scale, out)
    elif (parts := parts_for(qweight.shape[0])) > 1:
        _run(_split_int8, x, qweight, scale, out, parts)
    else:
        _run(_rows_int8, x, qweight, scale, out, 0, qweight.shape[0])
    return out


def linear_int4(x: np.ndarray, qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/2], f32 [out, G] -> [T, out]
    """``x @ dequantize_int4(qweight, scales).T`` (group-wise int4, group = in / G columns)."""
    x = _x32(x)
    qweight = np.ascontiguousarray(qweight)
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    if 2 * qweight.shape[1] != x.shape[1] or x.shape[1] % scales.shape[1]:
        raise ValueError(
            f"linear_int4: x has {x.shape[1]} features; the weight holds {2 * qweight.shape[1]} "
            f"in {scales.shape[1]} groups"
        )
    if x.shape[0] > R_MAX_QUAD:
        return linear_tiled(x, qweight.shape[0], _tile_int4, qweight, scales)
    out = np.empty((x.shape[0], qweight.shape[0]), dtype=np.float32)
    if x.shape[0] > R_MAX:  # scales flattened: every format's second array is 1-D (quant_tiles._widen)
        quad_rows(INT4, x, qweight, scales.reshape(-1), out)
    elif x.shape[1] // scales.shape[1] == INT4_FAST_GROUP:
        x_even, x_odd = np.ascontiguousarray(x[:, 0::2]), np.ascontiguousarray(x[:, 1::2])  # [T, in/2] each
        if (parts := parts_for(qweight.shape[0])) > 1:
            _run(_split_int4, x_even, x_odd, qweight, scales, out, parts)
        else:
            _run(_rows_int4, x_even, x_odd, qweight, scales, out, 0, qweight.shape[0])
    else:
        _run(_rows_int4_any_group, x, qweight, scales, out)
    return out
