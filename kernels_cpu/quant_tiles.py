"""Quantized weights widened to float32, exactly the reference's values: a block, four rows, a tile.

``kernels_cpu.quant`` runs a quantized linear one of three ways by the number of rows T;
this module holds the two that widen weights into float32 memory before multiplying:

    2 .. R_MAX_QUAD rows (batched decode, a speculative verification): the quad kernels
        for o in range(0, out, 4):
            w4 = widen(W[o:o+4])                  [4, in] float32 in L1, exactly the
                                                  reference's weights (``_block_*``)
            y[:, o:o+4] = x @ w4.T                kernels_cpu.linear's loop: each widened
                                                  row serves every row of x
    more rows (prefill): ``TILE_ROWS`` output rows widened into a float32 tile that stays
        in L2, multiplied by BLAS (:func:`linear_tiled`), the next tile into the same buffer

The widening itself (``_block_q4_1`` and its siblings) runs at about 22 G weights/s on one
core: each block's 16 bytes are read into locals before its 32 floats are stored, written
out line by line, so that LLVM's SLP vectorizer packs them (a loop over the block, or
loads interleaved with the stores, stayed scalar, 7x slower: Numba cannot tell LLVM that
the bytes and the floats do not overlap). Numba compiles with that vectorizer off unless
told; :func:`_run` turns it on while one of these kernels compiles.

Every widened weight is bit for bit ``kernels_ref.dequantize_*``'s, so the quad kernels
and the tiles differ from the reference only by summation order.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from kernels_cpu.linear import _quad_dots_all
from kernels_cpu.pointwise import FASTMATH
from kernels_cpu.split import part_bounds, parts_for
from kernels_ref.quant import Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK

#: Output rows dequantized per BLAS tile on the prefill path (576-wide rows: 576 KiB, in L2).
TILE_ROWS = 256

#: float32 value of every float16 bit pattern: ``F16_TABLE[bits]`` (subnormals, inf, nan exact).
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

f32 = np.float32  # short, for the lines below

_SLP_LOCK = threading.Lock()
# the module, for X_BLOCK read at every call (``kernels_cpu.linear`` is also the package's function)
cpu_linear = importlib.import_module("kernels_cpu.linear")


def _run(kernel: Callable[..., Any], *args: Any) -> Any:
    """Call a quantized-linear kernel (this module's, ``kernels_cpu.quant``'s or
    ``kernels_cpu.int8_activations``') with LLVM's SLP vectorizer on while it compiles.

    ``numba.config.SLP_VECTORIZE`` is read when a function is compiled (or loaded from the
    cache, where it was compiled the same way); the lock keeps other threads from seeing
    it changed, so only these kernels are compiled with it.
    """
    with _SLP_LOCK:
        saved = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1
        try:
            return kernel(*args)
        finally:
            numba.config.SLP_VECTORIZE = saved


@njit(cache=True)
def _f16(table, lo, hi):  # f32 [65536], two uint8 -> f32 (LLVM inlines it into its callers)
    return table[np.int64(lo) | (np.int64(hi) << 8)]


# --- one block of 32 weights widened to float32, exactly the reference's values ------------------


@njit(cache=True)
def _block_q8_0(qb, qs, table, db):  # uint8 + int8 [34], [65536], f32 [32] (written)
    """One Q8_0 block | d | qs[32] (int8) | as 32 float32 weights ``d * q``."""
    d = _f16(table, qb[0], qb[1])
    v0, v1, v2, v3, v4, v5, v6, v7 = qs[2], qs[3], qs[4], qs[5], qs[6], qs[7], qs[8], qs[9]
    v8, v9, v10, v11, v12, v13, v14, v15 = qs[10], qs[11], qs[12], qs[13], qs[14], qs[15], qs[16], qs[17]
    v16, v17, v18, v19, v20, v21, v22, v23 = qs[18], qs[19], qs[20], qs[21], qs[22], qs[23], qs[24], qs[25]
    v24, v25, v26, v27, v28, v29, v30, v31 = qs[26], qs[27], qs[28], qs[29], qs[30], qs[31], qs[32], qs[33]
    db[0], db[1], db[2], db[3] = d * f32(v0), d * f32(v1), d * f32(v2), d * f32(v3)
    db[4], db[5], db[6], db[7] = d * f32(v4), d * f32(v5), d * f32(v6), d * f32(v7)
    db[8], db[9], db[10], db[11] = d * f32(v8), d * f32(v9), d * f32(v10), d * f32(v11)
    db[12], db[13], db[14], db[15] = d * f32(v12), d * f32(v13), d * f32(v14), d * f32(v15)
    db[16], db[17], db[18], db[19] = d * f32(v16), d * f32(v17), d * f32(v18), d * f32(v19)
    db[20], db[21], db[22], db[23] = d * f32(v20), d * f32(v21), d * f32(v22), d * f32(v23)
    db[24], db[25], db[26], db[27] = d * f32(v24), d * f32(v25), d * f32(v26), d * f32(v27)
    db[28], db[29], db[30], db[31] = d * f32(v28), d * f32(v29), d * f32(v30), d * f32(v31)


@njit(cache=True)
def _block_q4_0(qb, table, db):  # uint8 [block bytes], [65536], f32 [32] (written)
    """One Q4_0 block | d | qs[16] | as 32 float32 weights ``d * (nibble - 8)``."""
    d = _f16(table, qb[0], qb[1])
    v0, v1, v2, v3, v4, v5, v6, v7 = qb[2], qb[3], qb[4], qb[5], qb[6], qb[7], qb[8], qb[9]
    v8, v9, v10, v11, v12, v13, v14, v15 = qb[10], qb[11], qb[12], qb[13], qb[14], qb[15], qb[16], qb[17]
    db[0], db[1], db[2], db[3] = d * f32((v0 & 0xF) - 8), d * f32((v1 & 0xF) - 8), d * f32((v2 & 0xF) - 8), d * f32((v3 & 0xF) - 8)
    db[4], db[5], db[6], db[7] = d * f32((v4 & 0xF) - 8), d * f32((v5 & 0xF) - 8), d * f32((v6 & 0xF) - 8), d * f32((v7 & 0xF) - 8)
    db[8], db[9], db[10], db[11] = d * f32((v8 & 0xF) - 8), d * f32((v9 & 0xF) - 8), d * f32((v10 & 0xF) - 8), d * f32((v11 & 0xF) - 8)
    db[12], db[13], db[14], db[15] = d * f32((v12 & 0xF) - 8), d * f32((v13 & 0xF) - 8), d * f32((v14 & 0xF) - 8), d * f32((v15 & 0xF) - 8)
    db[16], db[17], db[18], db[19] = d * f32((v0 >> 4) - 8), d * f32((v1 >> 4) - 8), d * f32((v2 >> 4) - 8), d * f32((v3 >> 4) - 8)
    db[20], db[21], db[22], db[23] = d * f32((v4 >> 4) - 8), d * f32((v5 >> 4) - 8), d * f32((v6 >> 4) - 8), d * f32((v7 >> 4) - 8)
    db[24], db[25], db[26], db[27] = d * f32((v8 >> 4) - 8), d * f32((v9 >> 4) - 8), d * f32((v10 >> 4) - 8), d * f32((v11 >> 4) - 8)
    db[28], db[29], db[30], db[31] = d * f32((v12 >> 4) - 8), d * f32((v13 >> 4) - 8), d * f32((v14 >> 4) - 8), d * f32((v15 >> 4) - 8)


@njit(cache=True)
def _block_q4_1(qb, table, db):  # uint8 [block bytes], [65536], f32 [32] (written)
    """One Q4_1 block | d | m | qs[16] | as 32 float32 weights ``d * nibble + m`` (low nibbles first)."""
    d = _f16(table, qb[0], qb[1])
    m = _f16(table, qb[2], qb[3])
    v0, v1, v2, v3, v4, v5, v6, v7 = qb[4], qb[5], qb[6], qb[7], qb[8], qb[9], qb[10], qb[11]
    v8, v9, v10, v11, v12, v13, v14, v15 = qb[12], qb[13], qb[14], qb[15], qb[16], qb[17], qb[18], qb[19]
    db[0], db[1], db[2], db[3] = d * f32(v0 & 0xF) + m, d * f32(v1 & 0xF) + m, d * f32(v2 & 0xF) + m, d * f32(v3 & 0xF) + m
    db[4], db[5], db[6], db[7] = d * f32(v4 & 0xF) + m, d * f32(v5 & 0xF) + m, d * f32(v6 & 0xF) + m, d * f32(v7 & 0xF) + m
    db[8], db[9], db[10], db[11] = d * f32(v8 & 0xF) + m, d * f32(v9 & 0xF) + m, d * f32(v10 & 0xF) + m, d * f32(v11 & 0xF) + m
    db[12], db[13], db[14], db[15] = d * f32(v12 & 0xF) + m, d * f32(v13 & 0xF) + m, d * f32(v14 & 0xF) + m, d * f32(v15 & 0xF) + m
    db[16], db[17], db[18], db[19] = d * f32(v0 >> 4) + m, d * f32(v1 >> 4) + m, d * f32(v2 >> 4) + m, d * f32(v3 >> 4) + m
    db[20], db[21], db[22], db[23] = d * f32(v4 >> 4) + m, d * f32(v5 >> 4) + m, d * f32(v6 >> 4) + m, d * f32(v7 >> 4) + m
    db[24], db[25], db[26], db[27] = d * f32(v8 >> 4) + m, d * f32(v9 >> 4) + m, d * f32(v10 >> 4) + m, d * f32(v11 >> 4) + m
    db[28], db[29], db[30], db[31] = d * f32(v12 >> 4) + m, d * f32(v13 >> 4) + m, d * f32(v14 >> 4) + m, d * f32(v15 >> 4) + m


# --- prefill shapes: a tile of output rows at a time, exactly the reference's weights, into BLAS --


@njit(cache=True)
def _tile_q8_0(raw, table, o0, tile):  # uint8 [out, in/32*34], [65536], int, f32 [rows, in] C-contiguous (written)
    nb = tile.shape[1] // QK
    r3 = raw.reshape(raw.shape[0], nb, Q8_0_BLOCK_BYTES)
    q3 = raw.view(np.int8).reshape(raw.shape[0], nb, Q8_0_BLOCK_BYTES)
    t3 = tile.reshape(tile.shape[0], nb, QK)
    for r in range(tile.shape[0]):
        for b in range(nb):
            _block_q8_0(r3[o0 + r, b], q3[o0 + r, b], table, t3[r, b])


@njit(cache=True)
def _tile_q4_0(raw, table, o0, tile):  # uint8 [out, in/32*18], [65536], int, f32 [rows, in] C-contiguous (written)
    nb = tile.shape[1] // QK
    r3 = raw.reshape(raw.shape[0], nb, Q4_0_BLOCK_BYTES)
    t3 = tile.reshape(tile.shape[0], nb, QK)
    for r in range(tile.shape[0]):
        for b in range(nb):
            _block_q4_0(r3[o0 + r, b], table, t3[r, b])


@njit(cache=True)
def _tile_q4_1(raw, table, o0, tile):  # uint8 [out, in/32*20], [65536], int, f32 [rows, in] C-contiguous (written)
    nb = tile.shape[1] // QK
    r3 = raw.reshape(raw.shape[0], nb, Q4_1_BLOCK_BYTES)
    t3 = tile.reshape(tile.shape[0], nb, QK)
    for r in range(tile.shape[0]):
        for b in range(nb):
            _block_q4_1(r3[o0 + r, b], table, t3[r, b])


@njit(cache=True)
def _tile_int8(qweight, scale, o0, tile):  # int8 [out, in], f32 [out], int, f32 [rows, in] (written)
    for r in range(tile.shape[0]):
        s = scale[o0 + r]
        q = qweight[o0 + r]
        for i in range(tile.shape[1]):
            tile[r, i] = f32(q[i]) * s


@njit(cache=True)
def _block_int4(qb, s, db):  # uint8 [16], f32, f32 [32] (written)
    """32 int4 columns sharing scale ``s``: byte j holds columns 2j (low) and 2j + 1 (high),
    each ``(nibble - 8) * s``; the 16 bytes read into locals first, as in ``_block_q4_0``."""
    v0, v1, v2, v3, v4, v5, v6, v7 = qb[0], qb[1], qb[2], qb[3], qb[4], qb[5], qb[6], qb[7]
    v8, v9, v10, v11, v12, v13, v14, v15 = qb[8], qb[9], qb[10], qb[11], qb[12], qb[13], qb[14], qb[15]
    db[0], db[1], db[2], db[3] = f32((v0 & 0xF) - 8) * s, f32((v0 >> 4) - 8) * s, f32((v1 & 0xF) - 8) * s, f32((v1 >> 4) - 8) * s
    db[4], db[5], db[6], db[7] = f32((v2 & 0xF) - 8) * s, f32((v2 >> 4) - 8) * s, f32((v3 & 0xF) - 8) * s, f32((v3 >> 4) - 8) * s
    db[8], db[9], db[10], db[11] = f32((v4 & 0xF) - 8) * s, f32((v4 >> 4) - 8) * s, f32((v5 & 0xF) - 8) * s, f32((v5 >> 4) - 8) * s
    db[12], db[13], db[14], db[15] = f32((v6 & 0xF) - 8) * s, f32((v6 >> 4) - 8) * s, f32((v7 & 0xF) - 8) * s, f32((v7 >> 4) - 8) * s
    db[16], db[17], db[18], db[19] = f32((v8 & 0xF) - 8) * s, f32((v8 >> 4) - 8) * s, f32((v9 & 0xF) - 8) * s, f32((v9 >> 4) - 8) * s
    db[20], db[21], db[22], db[23] = f32((v10 & 0xF) - 8) * s, f32((v10 >> 4) - 8) * s, f32((v11 & 0xF) - 8) * s, f32((v11 >> 4) - 8) * s
    db[24], db[25], db[26], db[27] = f32((v12 & 0xF) - 8) * s, f32((v12 >> 4) - 8) * s, f32((v13 & 0xF) - 8) * s, f32((v13 >> 4) - 8) * s
    db[28], db[29], db[30], db[31] = f32((v14 & 0xF) - 8) * s, f32((v14 >> 4) - 8) * s, f32((v15 & 0xF) - 8) * s, f32((v15 >> 4) - 8) * s


@njit(cache=True)
def _tile_int4(qweight, scales, o0, tile):  # uint8 [out, in/2], f32 [out, G], int, f32 [rows, in] (written)
    for r in range(tile.shape[0]):
        _int4_row(qweight[o0 + r], scales[o0 + r], tile[r])


@njit(cache=True)
def _int4_row(q_row, scales_row, row):  # uint8 [in/2], f32 [G], f32 [in] (written)
    """``row[c] = (nibble c - 8) * scale[c // group]``, exactly the reference's float32 weights."""
    n = row.shape[0]
    group = n // scales_row.shape[0]
    if group % QK == 0:  # whole runs of 16 bytes share a scale: written out, so that SLP packs them
        per_group = group // QK
        q2 = q_row.reshape(n // QK, QK // 2)
        r2 = row.reshape(n // QK, QK)
        for b in range(n // QK):
            _block_int4(q2[b], scales_row[b // per_group], r2[b])
        return
    if group % 2 == 0:  # both columns of every byte share a group: one scale per run of bytes
        half = group // 2
        for g in range(scales_row.shape[0]):
            s = scales_row[g]
            for k in range(g * half, (g + 1) * half):
                byte = np.int32(q_row[k])
                row[2 * k] = f32((byte & 0xF) - 8) * s
                row[2 * k + 1] = f32((byte >> 4) - 8) * s
        return
    for c in range(n):  # an odd group size: a byte's two columns may fall in two groups
        nibble = (np.int32(q_row[c >> 1]) >> ((c & 1) * 4)) & 0xF
        row[c] = f32(nibble - 8) * scales_row[c // group]


def linear_tiled(x: np.ndarray, out_features: int, dequantize_tile: Callable[..., None], *arrays: Any) -> np.ndarray:  # [T, in] -> [T, out]
    """``x @ W.T`` with W dequantized ``TILE_ROWS`` output rows at a time into one reused buffer.

    ``dequantize_tile(*arrays, o0, tile)`` writes rows ``o0 .. o0 + len(tile)`` of W as
    float32; BLAS multiplies each tile (``tile @ x.T``, weight as the left operand) into
    the transposed output, so each tile's result is one contiguous run of rows.
    """
    out_t = np.empty((out_features, x.shape[0]), dtype=np.float32)  # [out, T]
    tile = np.empty((min(TILE_ROWS, out_features), x.shape[1]), dtype=np.float32)
    x_t = np.ascontiguousarray(x.T)  # [in, T]
    for o0 in range(0, out_features, TILE_ROWS):
        rows = min(TILE_ROWS, out_features - o0)
        _run(dequantize_tile, *arrays, o0, tile[:rows])
        np.matmul(tile[:rows], x_t, out=out_t[o0 : o0 + rows])
    return np.ascontiguousarray(out_t.T)


# --- decode shapes, four output rows at a time: widened into L1, then kernels_cpu.linear's loop ----


@njit(fastmath=FASTMATH, cache=True)
def _row_dots(x, w_row, scale, out, o):  # [T, in] f32, [in] f32, f32, [T, out] f32 (column o written)
    """``out[t, o] = scale * (w_row . x[t])`` for every t, loading ``w_row[i]`` once per 4 rows.

    ``fastmath`` reassociation lets LLVM's loop vectorizer split each long sum into SIMD lanes.
    """
    rows, n = x.shape
    t = 0
    while t + 4 <= rows:
        x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
        a0 = a1 = a2 = a3 = f32(0.0)
        for i in range(n):
            u = w_row[i]
            a0 += u * x0[i]
            a1 += u * x1[i]
            a2 += u * x2[i]
            a3 += u * x3[i]
        out[t, o], out[t + 1, o], out[t + 2, o], out[t + 3, o] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        t += 4
    while t < rows:
        x0 = x[t]
        a0 = f32(0.0)
        for i in range(n):
            a0 += w_row[i] * x0[i]
        out[t, o] = a0 * scale
        t += 1


#: Which format ``_quad_rows`` widens. A code, not the widening function itself: Numba's
#: disk cache cannot key a compiled kernel on a function passed as an argument.
INT8, Q8_0, Q4_0, Q4_1, INT4 = 0, 1, 2, 3, 4


@njit(cache=True)
def _widen(fmt, a, b, o0, rows):  # code, the format's two arrays, int, f32 [n, in] C-contiguous (written)
    """Rows ``o0 .. o0 + n`` of W as float32, exactly the reference's weights; ``(a, b)`` is
    ``(raw blocks, F16_TABLE)`` for the GGUF formats, ``(qweight, scale)`` for int8,
    ``(qweight, scales flattened)`` for int4 (so that every format's ``b`` is 1-D float32:
    one compiled kernel types every branch with the same arguments)."""
    if fmt == Q8_0:
        _tile_q8_0(a, b, o0, rows)
    elif fmt == Q4_0:
        _tile_q4_0(a, b, o0, rows)
    elif fmt == Q4_1:
        _tile_q4_1(a, b, o0, rows)
    elif fmt == INT4:
        _tile_int4(a, b.reshape((a.shape[0], b.shape[0] // a.shape[0])), o0, rows)
    else:
        _tile_int8(a, b, o0, rows)


@njit(fastmath=FASTMATH, cache=True)
def _quad_rows(fmt, x, a, b, out, x_block, lo, hi):  # code, [T, in] f32, the format's two arrays, [T, out] f32 (columns lo..hi written), 1..5, ints
    """``out[:, lo:hi] = x @ W[lo:hi].T``, W widened four output rows at a time into L1, then
    linear's loop (``lo`` a multiple of 4, so the groups of four are the whole matrix's)."""
    quad = np.empty((4, x.shape[1]), dtype=np.float32)  # four widened weight rows, reused (L1)
    one = np.empty((1, x.shape[1]), dtype=np.float32)
    o = lo
    while o + 4 <= hi:
        _widen(fmt, a, b, o, quad)
        _quad_dots_all(x, quad, 0, out, o, x_block)
        o += 4
    for r in range(o, hi):  # the rows after the last four
        _widen(fmt, a, b, r, one)
        _row_dots(x, one[0], f32(1.0), out, r)


@njit(parallel=True, cache=True)
def _split_quad_rows(fmt, x, a, b, out, x_block, parts):  # as _quad_rows, all rows, over ``parts`` threads
    for p in prange(parts):
        lo, hi = part_bounds(out.shape[1], p, parts, 4)
        _quad_rows(fmt, x, a, b, out, x_block, lo, hi)


def quad_rows(fmt: int, x: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out = x @ W.T`` by the quad kernel, in blocks of ``kernels_cpu.linear.X_BLOCK`` rows
    of x, its output rows split over the threads of ``kernels_cpu.split``."""
    if (parts := parts_for(out.shape[1], 4)) > 1:
        _run(_split_quad_rows, fmt, x, a, b, out, cpu_linear.X_BLOCK, parts)
    else:
        _run(_quad_rows, fmt, x, a, b, out, cpu_linear.X_BLOCK, 0, out.shape[1])
