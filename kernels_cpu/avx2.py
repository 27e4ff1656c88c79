"""Int8-activation decode loops written with AVX2's byte multiply-add, llama.cpp's way.

``kernels_cpu.int8_activations`` holds the portable decode loops: each block's 32
integer products summed into one int32 (``vpmaddwd`` and a horizontal add, packed by
LLVM from plain Python loops), then one float multiply-add per block. Those return the
reference's bits, and on AVX2 they run no faster than the float-activation kernels: the
horizontal add of every block costs what the multiply saved. llama.cpp's AVX2 code
(``ggml_vec_dot_q4_1_q8_1`` and friends) never adds across lanes inside the loop:

    for b in blocks of the row:
        w   = the block's 32 weights as bytes: nibbles 0..15, or |q| for Q8_0   [32 x u8]
        x   = the activation block's 32 int8 values (sign-flipped where q < 0)  [32 x i8]
        p16 = vpmaddubsw(w, x)      u8 * i8, adjacent pairs summed        [16 x i16]
        p32 = vpmaddwd(p16, 1)      adjacent pairs summed again            [8 x i32]
        acc += float(p32) * (dw_b * dx_b)                                  [8 x f32]
    y = sum(acc) + the per-block terms that need no vector (Q4_1's mw_b * s_b, Q4_0's -8 qsum)

so lane l of ``p32`` is ``sum(w[j] * x[j] for j in 4l .. 4l+3)``, an exact integer
(at most 4 * 15 * 127 for nibbles, 4 * 128 * 127 for int8: no int16 pair overflows),
and a block costs some 8 vector instructions instead of ~25.

LLVM does not form ``vpmaddubsw`` from plain loops, and the float-lane version of the
portable loop came out as ``vpmulld`` (measured 6x slower; ``kernels_cpu.int8_activations``).
So the block step here is written as LLVM vector IR (Numba's ``@intrinsic``, through
llvmlite's IR builder): :func:`nibble_lanes` and :func:`int8_lanes`, each one block into
an 8-lane float32 accumulator. Everything around them is plain Numba.

They run only where the host has AVX2 (:data:`ENABLED`; ``NANOSERVE_AVX2=0`` turns them
off, as does a ``NUMBA_CPU_NAME`` other than the host's): the two instructions do not
exist elsewhere, and the portable loops serve instead.

Rounding: the integer lanes are exact; each lane is then scaled by ``dw * dx`` (rounded
once) and summed across blocks in float32, and the 8 lanes are added at the end. That is
a different order from the reference's ``float(block sum) * (dw * dx)``, so the result is
within ``check_kernels.cases.int8_activations.INT8_DOT`` of it, not its bits (as
llama.cpp's own SIMD code differs from its scalar code).

Measured (AMD EPYC Zen 3, AVX2, one thread, idle; random GGUF rows, 30 distinct matrices
per shape so that their bytes stream from memory; wall ms per call, median of 21), one
row of x, against the portable int8 loop and the float-activation lanes kernel
(``kernels_cpu.quant``)::

    fmt   [out, in]       here   portable a8   float activations
    q4_1  [3072, 576]     0.17      0.30           0.28
    q4_1  [576, 1536]     0.06      0.12           0.11
    q4_1  [960, 576]      0.05      0.10           0.09
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.split import part_bounds, parts_for
from kernels_ref.quant import Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK


def _host_has_avx2() -> bool:
    """True when Numba compiles for this host (no ``NUMBA_CPU_NAME``) and the host has AVX2."""
    if os.environ.get("NANOSERVE_AVX2", "1") == "0" or os.environ.get("NUMBA_CPU_NAME"):
        return False
    try:
        return bool(_llvm.get_host_cpu_features().get("avx2", False))
    except RuntimeError:  # a host LLVM cannot describe
        return False


#: Whether ``kernels_cpu.int8_activations`` takes these decode loops (else its portable ones).
ENABLED = _host_has_avx2()

#: Float32 lanes of the accumulator: one 256-bit register.
LANES = 8

f32 = np.float32

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vector(element: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(element, n)


def _splat(element: ir.Type, n: int, value: int) -> ir.Constant:
    return ir.Constant(_vector(element, n), [value] * n)


def _pointer_at(context, builder, array_type, array, index, vector_type):  # -> vector_type* at array.data + index
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer())


def _accumulate(context, builder, signature, args, weights_u8, x_i8) -> None:
    """*acc += scale * float(vpmaddwd(vpmaddubsw(weights_u8, x_i8), 1)), for args (.., acc, scale)."""
    module = builder.module
    v32i8, v16i16, v8i32, v8f32 = _vector(_I8, 32), _vector(_I16, 16), _vector(_I32, 8), _vector(_F32, 8)
    maddubs = cgutils.get_or_insert_function(module, ir.FunctionType(v16i16, [v32i8, v32i8]), "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(module, ir.FunctionType(v8i32, [v16i16, v16i16]), "llvm.x86.avx2.pmadd.wd")
    pairs = builder.call(maddubs, [weights_u8, x_i8])  # [16 x i16]: w[2i] x[2i] + w[2i+1] x[2i+1]
    lanes = builder.call(maddwd, [pairs, _splat(_I16, 16, 1)])  # [8 x i32]: lane l sums j = 4l .. 4l+3
    scale = builder.insert_element(ir.Constant(v8f32, None), args[5], ir.Constant(_I32, 0))
    scale = builder.shuffle_vector(scale, scale, ir.Constant(v8i32, [0] * 8))  # broadcast
    acc = builder.bitcast(args[4], v8f32.as_pointer())
    product = builder.fmul(scale, builder.sitofp(lanes, v8f32), flags=("contract",))
    builder.store(builder.fadd(builder.load(acc), product, flags=("contract",)), acc)


#: An accumulator: a pointer to 8 float32 lanes on the kernel's stack (:func:`new_lanes`).
Lanes = types.CPointer(types.float32)


@intrinsic
def new_lanes(typingctx):
    """Eight float32 lanes on the calling kernel's stack, set to 0: an accumulator.

    A stack slot, unlike a NumPy array, is one LLVM promotes to a vector register, so the
    block loop's additions never go through memory, and two accumulators never alias.
    """
    sig = Lanes()

    def codegen(context, builder, signature, args):
        v8f32 = _vector(_F32, 8)
        slot = cgutils.alloca_once(builder, v8f32)  # in the kernel's entry block
        builder.store(ir.Constant(v8f32, [0.0] * 8), slot)
        return builder.bitcast(slot, _F32.as_pointer())

    return sig, codegen


@intrinsic
def zero_lanes(typingctx, acc):
    """Set the 8 lanes of ``acc`` to 0."""
    sig = types.void(acc)

    def codegen(context, builder, signature, args):
        v8f32 = _vector(_F32, 8)
        builder.store(ir.Constant(v8f32, [0.0] * 8), builder.bitcast(args[0], v8f32.as_pointer()))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def lane_sum(typingctx, acc):
    """``acc[0] + acc[1] + ... + acc[7]``, in that order (float32)."""
    sig = types.float32(acc)

    def codegen(context, builder, signature, args):
        vector = builder.load(builder.bitcast(args[0], _vector(_F32, 8).as_pointer()))
        total = builder.extract_element(vector, ir.Constant(_I32, 0))
        for lane in range(1, 8):
            total = builder.fadd(total, builder.extract_element(vector, ir.Constant(_I32, lane)))
        return total

    return sig, codegen


@intrinsic
def nibble_lanes(typingctx, raw, at, x, x_at, acc, scale):
    """``acc[l] += scale * sum(n[j] * x[x_at + j] for j in 4l .. 4l+3)``, l = 0..7, for the 32
    4-bit codes of one block, ``raw[at .. at+15]``: byte j holds n[j] (low) and n[j+16] (high).

    raw: uint8 [*]; x: int8 [*]; acc: :data:`Lanes`, read and written; scale: float32.
    """
    sig = types.void(raw, at, x, x_at, acc, scale)

    def codegen(context, builder, signature, args):
        v16i8, v32i8 = _vector(_I8, 16), _vector(_I8, 32)
        codes = builder.load(_pointer_at(context, builder, signature.args[0], args[0], args[1], v16i8), align=1)
        low = builder.and_(codes, _splat(_I8, 16, 0xF))
        high = builder.lshr(codes, _splat(_I8, 16, 4))
        nibbles = builder.shuffle_vector(low, high, ir.Constant(_vector(_I32, 32), list(range(32))))  # n[0..31]
        xv = builder.load(_pointer_at(context, builder, signature.args[2], args[2], args[3], v32i8), align=1)
        _accumulate(context, builder, signature, args, nibbles, xv)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def int8_lanes(typingctx, q, at, x, x_at, acc, scale):
    """``acc[l] += scale * sum(q[at + j] * x[x_at + j] for j in 4l .. 4l+3)``, l = 0..7: one
    block of 32 int8 weights (Q8_0). As llama.cpp does, ``|q|`` meets ``x`` with q's sign
    (``vpsignb``), so that the unsigned-times-signed ``vpmaddubsw`` takes signed weights.

    q: int8 [*]; x: int8 [*] (|x| <= 127, as the activation quantizer gives); acc: :data:`Lanes`; scale: float32.
    """
    sig = types.void(q, at, x, x_at, acc, scale)

    def codegen(context, builder, signature, args):
        v32i8 = _vector(_I8, 32)
        sign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32i8, [v32i8, v32i8]), "llvm.x86.avx2.psign.b")
        qv = builder.load(_pointer_at(context, builder, signature.args[0], args[0], args[1], v32i8), align=1)
        xv = builder.load(_pointer_at(context, builder, signature.args[2], args[2], args[3], v32i8), align=1)
        magnitude = builder.call(sign, [qv, qv])  # |q| (-128 stays 0x80: 128 unsigned)
        signed_x = builder.call(sign, [xv, qv])  # x * sign(q)
        _accumulate(context, builder, signature, args, magnitude, signed_x)
        return context.get_dummy_value()

    return sig, codegen


# --- the decode loops: the arguments of kernels_cpu.int8_activations' portable ones ---------------


@njit(fastmath={"contract"}, cache=True)
def _rows_q8_0(q, d, raw, table, out, lo, hi):  # int8 [T, in], f32 [T, nb], uint8 [out, nb*34], [65536], [T, out] (columns lo..hi written)
    rows, n = q.shape
    w8 = raw.view(np.int8)
    h = raw.view(np.uint16)  # a block's scale is its first 16-bit word
    acc = new_lanes()
    for o in range(lo, hi):
        w, scales = w8[o], h[o]
        for t in range(rows):
            qt, dt = q[t], d[t]
            zero_lanes(acc)
            for b in range(n // QK):
                at = b * Q8_0_BLOCK_BYTES  # | d: f16 | q[0..31]: int8 |
                int8_lanes(w, at + 2, qt, b * QK, acc, table[scales[at // 2]] * dt[b])
            out[t, o] = lane_sum(acc)


@njit(fastmath={"contract"}, cache=True)
def _rows_q4_0(q, d, qsum, raw, table, out, lo, hi):  # int8 [T, in], f32 [T, nb], int32 [T, nb], uint8 [out, nb*18], ..., rows lo..hi
    rows, n = q.shape
    h = raw.view(np.uint16)
    acc = new_lanes()
    for o in range(lo, hi):
        w, scales = raw[o], h[o]
        for t in range(rows):
            qt, dt, sums = q[t], d[t], qsum[t]
            zero_lanes(acc)
            offsets = f32(0.0)  # sum (n - 8) q = sum n q - 8 qsum: the second term, per block
            for b in range(n // QK):
                at = b * Q4_0_BLOCK_BYTES  # | d: f16 | qs[0..15] |
                scale = table[scales[at // 2]] * dt[b]
                nibble_lanes(w, at + 2, qt, b * QK, acc, scale)
                offsets += scale * f32(-8 * sums[b])
            out[t, o] = lane_sum(acc) + offsets


@njit(fastmath={"contract"}, cache=True)
def _rows_q4_1(q, d, s, raw, table, out, lo, hi):  # int8 [T, in], f32 [T, nb] x2, uint8 [out, nb*20], [65536], [T, out], rows lo..hi
    rows, n = q.shape
    h = raw.view(np.uint16)
    acc = new_lanes()
    for o in range(lo, hi):
        w, scales = raw[o], h[o]
        for t in range(rows):
            qt, dt, st = q[t], d[t], s[t]
            zero_lanes(acc)
            minimums = f32(0.0)  # sum of mw_b * s_b
            for b in range(n // QK):
                at = b * Q4_1_BLOCK_BYTES  # | d: f16 | m: f16 | qs[0..15] |
                nibble_lanes(w, at + 4, qt, b * QK, acc, table[scales[at // 2]] * dt[b])
                minimums += table[scales[at // 2 + 1]] * st[b]
            out[t, o] = lane_sum(acc) + minimums


# --- the same, output rows split over threads (kernels_cpu.split: every bit as above) --------------


@njit(parallel=True, cache=True)
def _split_q8_0(q, d, raw, table, out, parts):  # as _rows_q8_0, all rows; parts >= 1 threads
    for p in prange(parts):
        lo, hi = part_bounds(raw.shape[0], p, parts, 1)
        _rows_q8_0(q, d, raw, table, out, lo, hi)


@njit(parallel=True, cache=True)
def _split_q4_0(q, d, qsum, raw, table, out, parts):  # as _rows_q4_0, all rows
    for p in prange(parts):
        lo, hi = part_bounds(raw.shape[0], p, parts, 1)
        _rows_q4_0(q, d, qsum, raw, table, out, lo, hi)


@njit(parallel=True, cache=True)
def _split_q4_1(q, d, s, raw, table, out, parts):  # as _rows_q4_1, all rows
    for p in prange(parts):
        lo, hi = part_bounds(raw.shape[0], p, parts, 1)
        _rows_q4_1(q, d, s, raw, table, out, lo, hi)


def decode(fmt: str, q: np.ndarray, middle: tuple, raw: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """Run ``fmt``'s decode loop on all rows of ``raw`` (``middle``: d, then qsum or s where the
    format takes one), split over ``kernels_cpu.split``'s threads when that is more than 1."""
    if (parts := parts_for(raw.shape[0])) > 1:
        _SPLIT[fmt](q, *middle, raw, table, out, parts)
    else:
        _ROWS[fmt](q, *middle, raw, table, out, 0, raw.shape[0])


_ROWS = {"q8_0": _rows_q8_0, "q4_0": _rows_q4_0, "q4_1": _rows_q4_1}
_SPLIT = {"q8_0": _split_q8_0, "q4_0": _split_q4_0, "q4_1": _split_q4_1}
