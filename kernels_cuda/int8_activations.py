"""Int8 activations on the GPU: ``linear_q8_0_a8``, ``linear_q4_0_a8``, ``linear_q4_1_a8``
(spec, block layout and error bound: kernels_ref.int8_activations).

Two launches per call::

    quantize_kernel     one thread per (row t, block b) of x, grid-stride over T * nb:
                        amax, d32 = amax / 127, q = roundf(x / d32), d = float16(d32),
                        s = float16(sum(q) * d32), qsum = sum(q); IEEE float32 (no
                        fastmath) and exact roundings, so q, d and s equal the reference's
    a8_linear_kernel    one thread per output (t, o), grid-stride over T * out:
                        acc += float32(sum_j w_j * q_j) * (dw_b * d_b)  (+ mw_b * s_b)
                        block by block, the integer sum in int32

This is the readable version of the path, not a fast one: a thread walks a whole row of
W alone. Where it runs (GPU with CuPy, GPU without, simulator) is ``kernels_cuda._runtime``'s
choice, as for every kernel of this package.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from numba import cuda, float32, float64, int32

from kernels_cuda._runtime import block_threads, contiguous, grid_stride_blocks, require_device, xp
from kernels_cuda.linear import f16_to_f32
from kernels_ref.int8_activations import INT8_MAX
from kernels_ref.quant import Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK

F16_MAX = 65504.0


@cuda.jit(device=True)
def _f16_value(v):  # float32 -> float32: the nearest float16 value (ties to even; inf past float16's range)
    a = abs(float64(v))
    if a == 0.0:
        return float32(v)
    _, e = math.frexp(a)  # a = m * 2**e, 0.5 <= m < 1: the float16 ulp is 2**(e - 11), or 2**-24
    shift = max(e - 11, -24)
    y = math.ldexp(a, -shift)  # < 2**11, exact
    r = math.floor(y + 0.5)
    if r - y == 0.5 and r % 2 != 0:  # a tie: to even
        r -= 1.0
    r = math.ldexp(r, shift)
    if r > F16_MAX:
        r = math.inf
    return float32(-r) if v < 0 else float32(r)


@cuda.jit
def quantize_kernel(x, q, d, s, qsum):  # f32 [T, in] -> int8 [T, in], f32 [T, nb] x2, int32 [T, nb]
    rows, n = x.shape
    blocks = n // QK
    for item in range(cuda.grid(1), rows * blocks, cuda.gridsize(1)):
        t = item // blocks
        base = (item % blocks) * QK
        amax = float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[t, base + j]))
        d32 = amax / float32(INT8_MAX)
        inverse = float32(1.0) / d32 if d32 != float32(0.0) else float32(0.0)
        total = 0
        for j in range(QK):
            v = x[t, base + j] * inverse
            r = int32(math.floor(abs(float64(v)) + 0.5))  # round half away from zero, exact in float64
            qj = r if v >= float32(0.0) else -r
            q[t, base + j] = qj
            total += qj
        d[t, item % blocks] = _f16_value(d32)
        s[t, item % blocks] = _f16_value(float32(total) * d32)
        qsum[t, item % blocks] = total


@cuda.jit(device=True)
def _block_q8_0(raw, o, b, q, t):  # -> (int32 sum of w * q, dw, 0): | d: f16 | q[0..31]: int8 |
    base = b * Q8_0_BLOCK_BYTES
    total = int32(0)
    for j in range(QK):
        w = int32(raw[o, base + 2 + j])
        if w > 127:  # the byte is a two's-complement int8
            w -= 256
        total += w * int32(q[t, b * QK + j])
    return total, f16_to_f32(raw[o, base], raw[o, base + 1]), float32(0.0)


@cuda.jit(device=True)
def _block_q4_0(raw, o, b, q, t):  # | d: f16 | qs[0..15] |: byte j holds weights j (low) and j + 16 (high)
    base = b * Q4_0_BLOCK_BYTES
    total = int32(0)
    for j in range(QK // 2):
        byte = int32(raw[o, base + 2 + j])
        total += ((byte & 0xF) - 8) * int32(q[t, b * QK + j]) + ((byte >> 4) - 8) * int32(q[t, b * QK + QK // 2 + j])
    return total, f16_to_f32(raw[o, base], raw[o, base + 1]), float32(0.0)


@cuda.jit(device=True)
def _block_q4_1(raw, o, b, q, t):  # | d: f16 | m: f16 | qs[0..15] |
    base = b * Q4_1_BLOCK_BYTES
    total = int32(0)
    for j in range(QK // 2):
        byte = int32(raw[o, base + 4 + j])
        total += (byte & 0xF) * int32(q[t, b * QK + j]) + (byte >> 4) * int32(q[t, b * QK + QK // 2 + j])
    return total, f16_to_f32(raw[o, base], raw[o, base + 1]), f16_to_f32(raw[o, base + 2], raw[o, base + 3])


_BLOCK_READERS = {"q8_0": _block_q8_0, "q4_0": _block_q4_0, "q4_1": _block_q4_1}


@functools.cache
def a8_linear_kernel(fmt: str) -> Any:
    """The compiled-on-first-use kernel for weight format ``fmt`` (q8_0, q4_0, q4_1)."""
    block_dot = _BLOCK_READERS[fmt]

    @cuda.jit
    def a8_linear(q, d, s, raw, out):  # int8 [T, in], f32 [T, nb] x2, uint8 [out, nb*bytes] -> f32 [T, out]
        rows, n = q.shape
        num_out = out.shape[1]
        for item in range(cuda.grid(1), rows * num_out, cuda.gridsize(1)):
            t = item // num_out
            o = item % num_out
            acc = float32(0.0)
            for b in range(n // QK):
                total, dw, mw = block_dot(raw, o, b, q, t)
                acc += float32(total) * (dw * d[t, b]) + mw * s[t, b]  # mw = 0 but for Q4_1
            out[t, o] = acc

    return a8_linear


def _a8_linear(fmt: str, x: Any, raw: Any, block_bytes: int, name: str) -> Any:  # [T, in] -> [T, out]
    require_device()
    if raw.dtype != xp.uint8 or raw.ndim != 2 or raw.shape[1] % block_bytes:
        raise ValueError(f"{name}: expected uint8 [out, n*{block_bytes}] raw blocks, got {raw.dtype} {raw.shape}")
    x = contiguous(x, xp.float32)
    if x.ndim != 2 or x.shape[1] != raw.shape[1] // block_bytes * QK:
        raise ValueError(f"{name}: x {x.shape} does not match the {raw.shape[1] // block_bytes * QK} features of the blocks")
    rows, n = x.shape
    q = xp.empty((rows, n), dtype=xp.int8)
    d = xp.empty((rows, n // QK), dtype=xp.float32)
    s = xp.empty_like(d)
    qsum = xp.empty((rows, n // QK), dtype=xp.int32)
    out = xp.empty((rows, raw.shape[0]), dtype=xp.float32)
    if out.size == 0:
        return out
    threads = block_threads(128)
    quantize_kernel[grid_stride_blocks(rows * (n // QK), threads), threads](x, q, d, s, qsum)
    a8_linear_kernel(fmt)[grid_stride_blocks(out.size, threads), threads](q, d, s, contiguous(raw), out)
    return out


def linear_q8_0_a8(x: Any, raw: Any) -> Any:  # [T, in], uint8 [out, in/32*34] -> [T, out]
    """Q8_0 weights times Q8_0 activations; same contract as kernels_ref.linear_q8_0_a8."""
    return _a8_linear("q8_0", x, raw, Q8_0_BLOCK_BYTES, "linear_q8_0_a8")


def linear_q4_0_a8(x: Any, raw: Any) -> Any:  # [T, in], uint8 [out, in/32*18] -> [T, out]
    """Q4_0 weights times Q8_0 activations; same contract as kernels_ref.linear_q4_0_a8."""
    return _a8_linear("q4_0", x, raw, Q4_0_BLOCK_BYTES, "linear_q4_0_a8")


def linear_q4_1_a8(x: Any, raw: Any) -> Any:  # [T, in], uint8 [out, in/32*20] -> [T, out]
    """Q4_1 weights times Q8_1 activations; same contract as kernels_ref.linear_q4_1_a8."""
    return _a8_linear("q4_1", x, raw, Q4_1_BLOCK_BYTES, "linear_q4_1_a8")


def ptx_signatures() -> list[tuple[str, Any, tuple]]:
    """(label, kernel, argument types) of this module's kernels for ``cuda.compile_ptx``,
    in the form of ``kernels_cuda.ptx.kernel_signatures``."""
    from numba import int8, uint8

    f32_2, i8_2, u8_2 = float32[:, ::1], int8[:, ::1], uint8[:, ::1]
    return [("quantize_activations", quantize_kernel, (f32_2, i8_2, f32_2, f32_2, int32[:, ::1]))] + [
        (f"linear_{fmt}_a8", a8_linear_kernel(fmt), (i8_2, f32_2, f32_2, u8_2, f32_2)) for fmt in _BLOCK_READERS
    ]
