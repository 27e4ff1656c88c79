"""Linear layers ``y = x @ W.T`` on the GPU, dequantizing the weight on the fly.

One tiled matrix-multiply kernel serves every weight format; only the function that
reads one weight ``W[o, i]`` out of the format's raw arrays changes (``weight_*`` below,
the GPU twin of kernels_ref.quant). The full float32 matrix is never materialised.

Parallel decomposition (TILE x TILE threads per block)::

    grid  = (ceil(out / TILE), ceil(T / TILE))    block (bx, by) computes out[by*TILE.., bx*TILE..]
    thread (ty, tx) accumulates out[t0 + ty, o0 + tx]

    for each slice k0 .. k0+TILE of the input dimension:
        x_tile[ty, tx] = x[t0 + ty, k0 + tx]                  cooperative loads, coalesced
        w_tile[ty, tx] = dequantize W[o0 + ty, k0 + tx]       along k (the contiguous axis)
        syncthreads                                           both tiles complete
        acc += sum_kk x_tile[ty, kk] * w_tile[tx, kk]
        syncthreads                                           all reads done before reload

Each weight is dequantized once per block and reused by TILE tokens; each activation is
reused by TILE output rows. ``w_tile`` has one padding column so that the threads of a
warp, reading a column of it, hit different shared-memory banks.

fp32/fp16 ``linear`` uses cuBLAS (through CuPy) when a real GPU is present, and the same
tiled kernel otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from numba import cuda, float32, int32

from kernels_cuda._runtime import SIMULATOR, contiguous, cupy, require_device, xp

#: Tile edge: 16 x 16 = 256 threads per block on a GPU; 4 x 4 under the simulator.
TILE = 4 if SIMULATOR else 16


@cuda.jit(device=True)
def f16_to_f32(lo, hi):  # two little-endian bytes of an IEEE float16 -> float32
    """Decode sign | 5-bit exponent | 10-bit mantissa by hand (GGUF stores scales this way)."""
    bits = (int32(hi) << 8) | int32(lo)
    sign = -1.0 if bits & 0x8000 else 1.0
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:  # zero or subnormal: mantissa * 2**-24
        return float32(sign * mantissa * 5.960464477539063e-08)
    if exponent == 31:  # infinity or NaN
        return float32(sign * math.inf) if mantissa == 0 else float32(math.nan)
    return float32(sign * (1024 + mantissa) * 2.0 ** (exponent - 25))


@cuda.jit(device=True)
def weight_fp(w, unused, o, i):  # fp32/fp16 [out, in] -> W[o, i]
    return float32(w[o, i])


@cuda.jit(device=True)
def weight_int8(qweight, scale, o, i):  # int8 [out, in], f32 [out] -> W[o, i]
    return float32(qweight[o, i]) * scale[o]


@cuda.jit(device=True)
def weight_int4(qweight, scales, o, i):  # uint8 [out, in/2], f32 [out, G] -> W[o, i]
    byte = int32(qweight[o, i // 2])
    q = (byte >> 4) if i % 2 else (byte & 0xF)  # column 2c: low nibble, 2c+1: high nibble
    group_size = (2 * qweight.shape[1]) // scales.shape[1]
    return float32(q - 8) * scales[o, i // group_size]


@cuda.jit(device=True)
def weight_q8_0(raw, unused, o, i):  # uint8 [out, in/32*34] -> W[o, i]
    base = (i // 32) * 34  # | d: f16 | q[0..31]: int8 |
    d = f16_to_f32(raw[o, base], raw[o, base + 1])
    q = int32(raw[o, base + 2 + i % 32])
    if q > 127:  # the byte is a two's-complement int8
        q -= 256
    return d * float32(q)


@cuda.jit(device=True)
def weight_q4_0(raw, unused, o, i):  # uint8 [out, in/32*18] -> W[o, i]
    base = (i // 32) * 18  # | d: f16 | qs[0..15] |
    d = f16_to_f32(raw[o, base], raw[o, base + 1])
    j = i % 32
    byte = int32(raw[o, base + 2 + j % 16])
    q = (byte & 0xF) if j < 16 else (byte >> 4)  # low nibbles: weights 0..15, high: 16..31
    return d * float32(q - 8)


@cuda.jit(device=True)
def weight_q4_1(raw, unused, o, i):  # uint8 [out, in/32*20] -> W[o, i]
    base = (i // 32) * 20  # | d: f16 | m: f16 | qs[0..15] |
    d = f16_to_f32(raw[o, base], raw[o, base + 1])
    m = f16_to_f32(raw[o, base + 2], raw[o, base + 3])
    j = i % 32
    byte = int32(raw[o, base + 4 + j % 16])
    q = (byte & 0xF) if j < 16 else (byte >> 4)
    return d * float32(q) + m


def make_linear_kernel(weight_at: Callable, tile: int) -> Any:
    """The tiled ``x @ W.T`` kernel for the format whose weights ``weight_at`` reads."""
    padded = tile + 1  # shared-array shapes must be compile-time constants: no arithmetic inside

    @cuda.jit
    def linear_tiled(x, w_data, w_aux, out):  # [T, K] f32, format arrays -> [T, O] f32
        x_tile = cuda.shared.array((tile, tile), float32)  # x[t0 + ty, k0 + tx]
        w_tile = cuda.shared.array((tile, padded), float32)  # W[o0 + ty, k0 + tx], padded
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        t0 = cuda.blockIdx.y * tile
        o0 = cuda.blockIdx.x * tile
        num_tokens, k_total = x.shape
        num_out = out.shape[1]
        acc = float32(0.0)
        for k0 in range(0, k_total, tile):
            k = k0 + tx
            in_k = k < k_total
            x_tile[ty, tx] = x[t0 + ty, k] if (t0 + ty < num_tokens and in_k) else float32(0.0)
            w_tile[ty, tx] = weight_at(w_data, w_aux, o0 + ty, k) if (o0 + ty < num_out and in_k) else float32(0.0)
            cuda.syncthreads()  # both tiles are complete
            for kk in range(tile):
                acc += x_tile[ty, kk] * w_tile[tx, kk]
            cuda.syncthreads()  # every thread is done reading before the next loads
        t = t0 + ty
        o = o0 + tx
        if t < num_tokens and o < num_out:
            out[t, o] = acc

    return linear_tiled


_WEIGHT_READERS: dict[str, Callable] = {
    "fp": weight_fp,
    "int8": weight_int8,
    "int4": weight_int4,
    "q8_0": weight_q8_0,
    "q4_0": weight_q4_0,
    "q4_1": weight_q4_1,
}


@functools.cache
def linear_kernel(fmt: str) -> Any:
    """The compiled-on-first-use tiled kernel for weight format ``fmt``."""
    return make_linear_kernel(_WEIGHT_READERS[fmt], TILE)


def _run_tiled(fmt: str, x: Any, w_data: Any, w_aux: Any, num_out: int) -> Any:  # [T, K] -> [T, out]
    require_device()
    x = contiguous(x, xp.float32)
    out = xp.empty((x.shape[0], num_out), dtype=xp.float32)
    if out.size:
        grid = (-(-num_out // TILE), -(-x.shape[0] // TILE))
        linear_kernel(fmt)[grid, (TILE, TILE)](x, contiguous(w_data), contiguous(w_aux), out)
    return out


def _check_raw(raw: Any, block_bytes: int) -> None:
    """Same check as kernels_ref.quant: uint8 rows of whole GGUF blocks."""
    if raw.dtype != xp.uint8 or raw.ndim != 2 or raw.shape[1] % block_bytes:
        raise ValueError(f"expected uint8 [out, n*{block_bytes}] raw blocks, got {raw.dtype} {raw.shape}")


def _no_scales() -> Any:  # formats whose scales live inside the raw bytes take a dummy
    return xp.zeros(1, dtype=xp.float32)


def linear(x: Any, w: Any) -> Any:  # [T, in], [out, in] -> [T, out]
    """``x @ w.T``, w float32 or float16; cuBLAS on a GPU with CuPy, else the tiled kernel."""
    if cupy is not None:
        return contiguous(x, xp.float32) @ contiguous(w, xp.float32).T
    return _run_tiled("fp", x, w, _no_scales(), w.shape[0])


def linear_int8(x: Any, qweight: Any, scale: Any) -> Any:  # [T, in], int8 [out, in], [out] -> [T, out]
    """``x @ (qweight * scale[:, None]).T``; same contract as kernels_ref.linear_int8."""
    return _run_tiled("int8", x, qweight, contiguous(scale, xp.float32), qweight.shape[0])


def linear_int4(x: Any, qweight: Any, scales: Any) -> Any:  # [T, in], uint8 [out, in/2], [out, G] -> [T, out]
    """Group-wise int4; same contract as kernels_ref.linear_int4."""
    return _run_tiled("int4", x, qweight, contiguous(scales, xp.float32), qweight.shape[0])


def linear_q8_0(x: Any, raw: Any) -> Any:  # [T, in], uint8 [out, in/32*34] -> [T, out]
    """GGUF Q8_0; same contract as kernels_ref.linear_q8_0."""
    _check_raw(raw, 34)
    return _run_tiled("q8_0", x, raw, _no_scales(), raw.shape[0])


def linear_q4_0(x: Any, raw: Any) -> Any:  # [T, in], uint8 [out, in/32*18] -> [T, out]
    """GGUF Q4_0; same contract as kernels_ref.linear_q4_0."""
    _check_raw(raw, 18)
    return _run_tiled("q4_0", x, raw, _no_scales(), raw.shape[0])


def linear_q4_1(x: Any, raw: Any) -> Any:  # [T, in], uint8 [out, in/32*20] -> [T, out]
    """GGUF Q4_1; same contract as kernels_ref.linear_q4_1."""
    _check_raw(raw, 20)
    return _run_tiled("q4_1", x, raw, _no_scales(), raw.shape[0])
