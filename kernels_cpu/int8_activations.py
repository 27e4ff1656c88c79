"""Int8 activations with integer dot products on the CPU: llama.cpp's Q8_0 / Q8_1 path, compiled.

The contract is ``kernels_ref.int8_activations`` (block layout, formulas, error bound);
here the same three kernels run as Numba loops. Each call first quantizes its
activations, bit for bit as the reference does, then takes integer dot products with the
weight blocks where they lie:

    quantize   x [T, in] f32 -> q int8 [T, in], d f32 [T, nb], s f32 [T, nb], qsum int32 [T, nb]
        amax, d32 = amax / 127, q = roundf(x / d32)       float32, as the reference
        d = float16(d32), s = float16(sum(q) * d32)        :func:`_f16_value`: round to
                                                          nearest even without float16 types
    decode shapes, T <= R_MAX_A8 rows: nothing materialised but the int8 rows of x
        for o in range(out):                              the hot loop
            for t in range(T):                            the row's bytes stay in L1 after t = 0
                acc = 0 (float32)
                for b in blocks of W[o]:
                    sumi = sum_j int16(w_j) * int16(q_j)  32 products, int32 sum: one vpmaddwd
                    acc += float32(sumi) * (dw_b * d_b)   (+ mw_b * s_b for Q4_1)
                y[t, o] = acc
    prefill shapes, T > R_MAX_A8: the quantized activations, dequantized (``q * d``, exact
        in float32), times float32 tiles of W into BLAS (``kernels_cpu.quant_tiles.linear_tiled``)

Q4_0's ``nibble - 8`` is taken out of the block's sum as llama.cpp's SIMD code does:
``sum (n_j - 8) q_j = sum n_j q_j - 8 * qsum``, with ``qsum = sum q_j`` of the
activation block computed once by the quantizer. Written with the ``- 8`` inside the
product, LLVM kept 16-bit multiplies (``vpmullw``) and a separate widening add, not the
pairwise ``vpmaddwd``.

Assembly (:func:`decode_kernel_asm`: ``inspect_asm`` of an uncached ``_rows_*``; AMD EPYC
Zen 4, AVX-512 with VNNI, Numba 0.68, llvmlite 0.50 on LLVM 22): each block's 32-product
loop becomes ``vpmovsxbw`` (int8 -> int16, the activations and Q8_0 weights) or
``vpmovzxbw`` (the nibbles), one 512-bit ``vpmaddwd`` (32 int16 products summed
pairwise into 16 int32 lanes), a horizontal add of the 16 lanes, and a conversion of
the block sum to float32 (``vcvtdq2ps`` or a scalar form). LLVM emits no ``vpdpwssd`` /
``vpdpbusd`` here: VNNI fuses a multiply-add into an *accumulator*, and each block's sum
is consumed in the same block (the scale differs per block), so there is none to fuse into. Two things matter,
both measured on SmolLM2's [3072, 576] Q8_0 matrix at T = 1:

* The 32-product loop is fully unrolled and then packed by LLVM's SLP vectorizer, which
  Numba leaves off unless told; :func:`kernels_cpu.quant_tiles._run` turns it on while these
  kernels compile. Off, the same source ran as scalar code: 0.77 ms instead of 0.15.
  :func:`decode_kernel_asm` returns the assembly (tests/test_int8_activations.py
  checks it for ``vpmaddwd`` / ``vpdpwssd`` / ``vpdpbusd`` on AVX2 hosts).
* The products are written ``int32(acc + int16(a) * int16(b))``: Numba types integer
  arithmetic as int64, and the casts let LLVM narrow it back to the pattern its x86
  backend turns into ``vpmaddwd``. Without them (plain ``int32(a) * int32(b)``) nothing
  vectorised. 16 written-out float lanes across blocks (llama.cpp's order: convert the
  int32 lanes, then one fused multiply-add per block into float lanes) came out as
  ``vpmulld`` and ran 6x slower; two rows of x per pass over the weights, 1.4x slower.

Measured: ms of thread CPU time, median of 15 runs (3 where T * out > 1e6) after one
warm-up call; random GGUF rows (``check_kernels.cases.quant.gguf_raw``), x standard
normal; float-activation kernels of ``kernels_cpu.quant`` (fp) against these (a8);
AMD EPYC Zen 4, 2 cores shared with other work (load average 0.4), OpenBLAS on one
thread as ``nanoserve.threads`` sets it, matrices in cache::

    fmt   in->out       T=1 fp / a8     T=4 fp / a8     T=32 fp / a8     T=512 fp / a8
    q8_0   576->576     0.05   0.04     0.17   0.12     0.43   0.51        3.33    4.64
    q8_0   576->192     0.02   0.02     0.06   0.05     0.17   0.24        1.26    2.29
    q8_0   576->1536    0.13   0.09     0.46   0.32     2.25   2.23       11.82   12.07
    q8_0  1536->576     0.09   0.09     0.36   0.34     1.14   1.28        9.52   12.01
    q8_0   576->49152   4.54   4.36    15.05  10.13    68.15  67.94      434.14  494.51
    q4_0   576->576     0.05   0.05     0.22   0.17     1.59   1.65        5.00    4.07
    q4_0   576->192     0.02   0.02     0.07   0.07     0.21   0.27        1.10    1.83
    q4_0   576->1536    0.08   0.09     0.32   0.33     1.61   1.94        9.00    9.62
    q4_0  1536->576     0.08   0.11     0.24   0.39     1.19   1.47        8.09   10.62
    q4_0   576->49152   4.18   4.10    16.68  13.93    58.62  63.86      389.25  474.88
    q4_1   576->576     0.04   0.05     0.21   0.17     1.20   1.30        4.90    6.39
    q4_1   576->192     0.02   0.02     0.07   0.08     0.53   0.59        2.21    3.27
    q4_1   576->1536    0.15   0.12     0.55   0.46     3.93   3.60       11.96   14.02
    q4_1  1536->576     0.08   0.09     0.31   0.36     2.77   3.87       12.83   15.38
    q4_1   576->49152   5.10   4.30    18.50  14.25    53.08  60.79      502.33  405.56

Decode rows gain little at T = 1 (a block costs about the same either way: one
``vpmaddwd`` plus a horizontal add, against the float kernel's two multiply-adds per
lane) and up to 1.5x at T = 4, where the float kernel re-widens the weights for every
row. Prefill rows take the float path's BLAS tiles, on the dequantized int8 x, so they
cost what it costs plus the quantizing (T = 32, 512: within the noise of the machine
to 1.7x slower on the small matrices). ``R_MAX_A8``: on Q8_0 at T = 8 / 12 / 16 the decode
loop took 0.63 / 0.93 / 1.26 ms on [1536, 576] (576 -> 1536), the float path's tiles 0.89 / 0.94 /
0.92 ms.

Rounding: the decode loops do exactly the reference's float32 operations in its order
(block sum, ``dw * d``, product, add; Q4_1's ``mw * s`` added to that block's term
before it joins the sum), so they return the reference's bits. The prefill path sums
the same products in BLAS order instead: within
``check_kernels.cases.int8_activations.INT8_DOT`` of the reference.

Threads: every kernel runs on the calling thread (not split over ``--threads``, as
``kernels_cpu.quant``'s are: int8 activations are opt-in and off the default path).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels_cpu import avx2
from kernels_cpu.quant_tiles import F16_TABLE, _f16, _run, _tile_q4_0, _tile_q8_0, linear_tiled
from kernels_ref.quant import Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK

#: Up to this many rows the integer decode loops run; above, float32 tiles into BLAS
#: (measured crossover: the module docstring).
R_MAX_A8 = 12

i16 = np.int16  # short, for the product lines below
i32 = np.int32
f32 = np.float32
F16_MAX = 65504.0


# --- quantizing the activations -------------------------------------------------------------------


@njit(cache=True)
def _f16_value(v):  # f32 -> f32: the nearest float16 value (ties to even; inf beyond float16's range)
    """``float32(float16(v))`` without a float16 type: round ``v``'s significand to 11 bits.

    ``v = m * 2**e`` (frexp, 0.5 <= m < 1) has its float16 ulp at ``2**(e - 11)``, or at
    ``2**-24`` in float16's subnormal range; ``rint(v / ulp) * ulp`` in float64 is exact.
    """
    a = abs(np.float64(v))
    if a == 0.0:
        return f32(v)
    _, e = math.frexp(a)
    shift = max(e - 11, -24)
    r = math.ldexp(np.rint(math.ldexp(a, -shift)), shift)
    if r > F16_MAX:
        r = np.inf
    return f32(-r) if v < 0 else f32(r)


@njit(cache=True)
def _quantize(x, q, d, s, qsum):  # f32 [T, in] -> int8 [T, in], f32 [T, nb] x2, int32 [T, nb] (written)
    """Q8_0 / Q8_1 blocks of every row of ``x``, exactly as ``kernels_ref.int8_activations``."""
    rows, n = x.shape
    for t in range(rows):
        for b in range(n // QK):
            base = b * QK
            amax = f32(0.0)
            for j in range(QK):
                amax = max(amax, abs(x[t, base + j]))
            d32 = amax / f32(127.0)
            inverse = f32(1.0) / d32 if d32 != 0 else f32(0.0)
            total = 0
            for j in range(QK):
                v = x[t, base + j] * inverse  # float32, as the reference rounds it
                r = np.int32(math.floor(abs(np.float64(v)) + 0.5))  # half away from zero, exact
                qj = r if v >= 0 else -r
                q[t, base + j] = qj
                total += qj
            d[t, b] = _f16_value(d32)
            s[t, b] = _f16_value(f32(total) * d32)
            qsum[t, b] = total


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x`` [T, in] -> q int8 [T, in], d f32 [T, nb], s f32 [T, nb], qsum int32 [T, nb] (compiled)."""
    rows, n = x.shape
    q = np.empty((rows, n), dtype=np.int8)
    d = np.empty((rows, n // QK), dtype=np.float32)
    s = np.empty_like(d)
    qsum = np.empty((rows, n // QK), dtype=np.int32)
    _quantize(x, q, d, s, qsum)
    return q, d, s, qsum


# --- decode shapes: integer block sums, one float32 accumulator per output ------------------------


@njit(cache=True)
def _rows_q8_0(q, d, raw, table, out):  # int8 [T, in], f32 [T, nb], uint8 [out, nb*34], [65536], [T, out] (written)
    rows, n = q.shape
    w = raw.view(np.int8)
    for o in range(raw.shape[0]):
        for t in range(rows):
            acc = f32(0.0)
            for b in range(n // QK):
                base = b * Q8_0_BLOCK_BYTES  # | d: f16 | q[0..31]: int8 |
                sumi = i32(0)
                for j in range(QK):
                    sumi = i32(sumi + i16(w[o, base + 2 + j]) * i16(q[t, b * QK + j]))
                acc += f32(sumi) * (_f16(table, raw[o, base], raw[o, base + 1]) * d[t, b])
            out[t, o] = acc


@njit(cache=True)
def _rows_q4_0(q, d, qsum, raw, table, out):  # int8 [T, in], f32 [T, nb], int32 [T, nb], uint8 [out, nb*18], ...
    rows, n = q.shape
    for o in range(raw.shape[0]):
        for t in range(rows):
            acc = f32(0.0)
            for b in range(n // QK):
                base = b * Q4_0_BLOCK_BYTES  # | d: f16 | qs[0..15] |: byte j holds weights j and j + 16
                sumi = i32(0)
                for j in range(QK // 2):
                    byte = raw[o, base + 2 + j]
                    sumi = i32(sumi + i16(byte & 0xF) * i16(q[t, b * QK + j])
                               + i16(byte >> 4) * i16(q[t, b * QK + QK // 2 + j]))  # fmt: skip
                sumi = i32(sumi - 8 * qsum[t, b])  # sum (nibble - 8) * q
                acc += f32(sumi) * (_f16(table, raw[o, base], raw[o, base + 1]) * d[t, b])
            out[t, o] = acc


@njit(cache=True)
def _rows_q4_1(q, d, s, raw, table, out):  # int8 [T, in], f32 [T, nb] x2, uint8 [out, nb*20], [65536], [T, out]
    rows, n = q.shape
    for o in range(raw.shape[0]):
        for t in range(rows):
            acc = f32(0.0)
            for b in range(n // QK):
                base = b * Q4_1_BLOCK_BYTES  # | d: f16 | m: f16 | qs[0..15] |
                sumi = i32(0)
                for j in range(QK // 2):
                    byte = raw[o, base + 4 + j]
                    sumi = i32(sumi + i16(byte & 0xF) * i16(q[t, b * QK + j])
                               + i16(byte >> 4) * i16(q[t, b * QK + QK // 2 + j]))  # fmt: skip
                dw = _f16(table, raw[o, base], raw[o, base + 1])
                mw = _f16(table, raw[o, base + 2], raw[o, base + 3])
                acc += f32(sumi) * (dw * d[t, b]) + mw * s[t, b]
            out[t, o] = acc


#: The portable decode loops (the reference's bits). Where the host has AVX2
#: (``kernels_cpu.avx2.ENABLED``) the kernels take ``kernels_cpu.avx2``'s instead.
PORTABLE_DECODE_LOOPS = {"q8_0": _rows_q8_0, "q4_0": _rows_q4_0, "q4_1": _rows_q4_1}


# --- prefill shapes: the dequantized int8 activations times float32 weight tiles, by BLAS --------


@njit(cache=True)
def _dequantize(q, d, x8):  # int8 [T, in], f32 [T, nb], f32 [T, in] (written): q * d, exact
    for t in range(q.shape[0]):
        for i in range(q.shape[1]):
            x8[t, i] = f32(q[t, i]) * d[t, i // QK]


@njit(cache=True)
def _block_q4_1_scaled(qb, table, db):  # uint8 [20], [65536], f32 [32] (written)
    """One Q4_1 block as 32 float32 values ``d * nibble``: its minimum meets ``s`` separately.

    Written as ``kernels_cpu.quant_tiles._block_q4_1``: the 16 bytes read into locals
    before the 32 floats are stored, so that the SLP vectorizer packs the block.
    """
    d = _f16(table, qb[0], qb[1])
    v0, v1, v2, v3, v4, v5, v6, v7 = qb[4], qb[5], qb[6], qb[7], qb[8], qb[9], qb[10], qb[11]
    v8, v9, v10, v11, v12, v13, v14, v15 = qb[12], qb[13], qb[14], qb[15], qb[16], qb[17], qb[18], qb[19]
    db[0], db[1], db[2], db[3] = d * f32(v0 & 0xF), d * f32(v1 & 0xF), d * f32(v2 & 0xF), d * f32(v3 & 0xF)
    db[4], db[5], db[6], db[7] = d * f32(v4 & 0xF), d * f32(v5 & 0xF), d * f32(v6 & 0xF), d * f32(v7 & 0xF)
    db[8], db[9], db[10], db[11] = d * f32(v8 & 0xF), d * f32(v9 & 0xF), d * f32(v10 & 0xF), d * f32(v11 & 0xF)
    db[12], db[13], db[14], db[15] = d * f32(v12 & 0xF), d * f32(v13 & 0xF), d * f32(v14 & 0xF), d * f32(v15 & 0xF)
    db[16], db[17], db[18], db[19] = d * f32(v0 >> 4), d * f32(v1 >> 4), d * f32(v2 >> 4), d * f32(v3 >> 4)
    db[20], db[21], db[22], db[23] = d * f32(v4 >> 4), d * f32(v5 >> 4), d * f32(v6 >> 4), d * f32(v7 >> 4)
    db[24], db[25], db[26], db[27] = d * f32(v8 >> 4), d * f32(v9 >> 4), d * f32(v10 >> 4), d * f32(v11 >> 4)
    db[28], db[29], db[30], db[31] = d * f32(v12 >> 4), d * f32(v13 >> 4), d * f32(v14 >> 4), d * f32(v15 >> 4)


@njit(cache=True)
def _tile_q4_1_scaled(raw, table, o0, tile):  # uint8 [out, in/32*20], [65536], int, f32 [rows, in] C-contiguous (written)
    """Rows ``o0 ..`` of ``d * nibble`` (Q4_1 without its minimum: that meets ``s`` separately)."""
    nb = tile.shape[1] // QK
    r3 = raw.reshape(raw.shape[0], nb, Q4_1_BLOCK_BYTES)
    t3 = tile.reshape(tile.shape[0], nb, QK)
    for r in range(tile.shape[0]):
        for b in range(nb):
            _block_q4_1_scaled(r3[o0 + r, b], table, t3[r, b])


def _x8(q: np.ndarray, d: np.ndarray) -> np.ndarray:  # int8 [T, in], f32 [T, nb] -> f32 [T, in]
    x8 = np.empty(q.shape, dtype=np.float32)
    _dequantize(q, d, x8)
    return x8


def _minimums(raw: np.ndarray) -> np.ndarray:  # uint8 [out, nb*20] -> f32 [out, nb]: every block's m
    b = raw.reshape(raw.shape[0], -1, Q4_1_BLOCK_BYTES)
    return np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)


# --- what LLVM made of the decode loops --------------------------------------------------------------


def decode_kernel_asm(fmt: str) -> str:
    """The x86 (or host) assembly of the ``_rows_<fmt>`` decode loop, as the kernels compile it.

    Cached code cannot be inspected, so an uncached copy is compiled here (SLP vectorizer
    on, as :func:`kernels_cpu.quant_tiles._run` compiles the real one) for int8 / float32 /
    uint8 C-contiguous 2-D arguments.
    """
    import numba
    from numba import types

    kernels = avx2._ROWS if avx2.ENABLED else PORTABLE_DECODE_LOOPS
    if fmt not in kernels:
        raise ValueError(f"decode_kernel_asm: unknown format {fmt!r}; choose from {', '.join(kernels)}")
    i8, f32_2, u8, table = types.int8[:, ::1], types.float32[:, ::1], types.uint8[:, ::1], types.float32[::1]
    middle = {"q8_0": (f32_2,), "q4_0": (f32_2, types.int32[:, ::1]), "q4_1": (f32_2, f32_2)}[fmt]
    signature = (i8, *middle, u8, table, f32_2) + ((types.int64, types.int64) if avx2.ENABLED else ())
    options = {k: v for k, v in kernels[fmt].targetoptions.items() if k not in ("cache", "nopython")}
    copy = numba.njit(**options)(kernels[fmt].py_func)
    _run(copy.compile, signature)
    return copy.inspect_asm(signature)


# --- the kernels ----------------------------------------------------------------------------------


def _prepare(x: np.ndarray, raw: np.ndarray, block_bytes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"{name}: expected float32 x [T, in] with in a multiple of {QK}, got {x.shape}")
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % block_bytes:
        raise ValueError(f"{name}: expected uint8 [out, n*{block_bytes}] raw blocks, got {raw.dtype} {raw.shape}")
    if raw.shape[1] // block_bytes * QK != x.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[1]} features, the blocks hold {raw.shape[1] // block_bytes * QK}")
    return x, np.ascontiguousarray(raw)


def _decode(fmt: str, rows: int, raw: np.ndarray, q: np.ndarray, *middle: np.ndarray) -> np.ndarray:
    """``fmt``'s decode loop: ``kernels_cpu.avx2``'s (split over ``--threads``) where enabled, else the portable one."""
    out = np.empty((rows, raw.shape[0]), dtype=np.float32)
    if avx2.ENABLED:
        avx2.decode(fmt, q, middle, raw, F16_TABLE, out)
    else:
        _run(PORTABLE_DECODE_LOOPS[fmt], q, *middle, raw, F16_TABLE, out)
    return out


def linear_q8_0_a8(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*34] -> [T, out]
    """Q8_0 weights times Q8_0 activations; same contract as ``kernels_ref.linear_q8_0_a8``."""
    x, raw = _prepare(x, raw, Q8_0_BLOCK_BYTES, "linear_q8_0_a8")
    q, d, _, _ = quantize_activations(x)
    if x.shape[0] > R_MAX_A8:
        return linear_tiled(_x8(q, d), raw.shape[0], _tile_q8_0, raw, F16_TABLE)
    return _decode("q8_0", x.shape[0], raw, q, d)


def linear_q4_0_a8(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*18] -> [T, out]
    """Q4_0 weights times Q8_0 activations; same contract as ``kernels_ref.linear_q4_0_a8``."""
    x, raw = _prepare(x, raw, Q4_0_BLOCK_BYTES, "linear_q4_0_a8")
    q, d, _, qsum = quantize_activations(x)
    if x.shape[0] > R_MAX_A8:
        return linear_tiled(_x8(q, d), raw.shape[0], _tile_q4_0, raw, F16_TABLE)
    return _decode("q4_0", x.shape[0], raw, q, d, qsum)


def linear_q4_1_a8(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*20] -> [T, out]
    """Q4_1 weights times Q8_1 activations; same contract as ``kernels_ref.linear_q4_1_a8``.

    Prefill: ``x8 @ (d * nibble).T + s @ m.T``, the block minimums meeting ``s`` as in
    the reference (not ``sum x8``, which differs from ``s`` by ``s``'s float16 rounding).
    """
    x, raw = _prepare(x, raw, Q4_1_BLOCK_BYTES, "linear_q4_1_a8")
    q, d, s, _ = quantize_activations(x)
    if x.shape[0] > R_MAX_A8:
        y = linear_tiled(_x8(q, d), raw.shape[0], _tile_q4_1_scaled, raw, F16_TABLE)
        y += s @ _minimums(raw).T
        return y
    return _decode("q4_1", x.shape[0], raw, q, d, s)
