"""SwiGLU and softmax on the GPU.

``silu_mul`` is element-wise: a grid-stride loop, one element per thread per step.

``softmax`` reduces along a row, so one thread block owns one row::

    grid  = rows                 (softmax's axis moved last, every other axis flattened)
    block = threads striding over the row's n entries

    pass 1  m = block_max(x)                       every thread gets the row max
    pass 2  s = block_sum(exp(x - m))              every thread gets the row sum
    pass 3  out = exp(x - m) / s                   each thread writes its own entries

Reductions use float64 scratch so one compiled kernel serves float32 and float64 rows.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda, float64

from kernels_cuda._reduce import block_max, block_sum
from kernels_cuda._runtime import (
    MAX_BLOCK_THREADS,
    block_threads,
    contiguous,
    grid_stride_blocks,
    require_device,
    xp,
)


@cuda.jit(device=True)
def sigmoid(g):  # scalar -> scalar
    """``1 / (1 + exp(-g))`` without overflow: exp is only taken of a non-positive number."""
    if g >= 0:
        return 1.0 / (1.0 + math.exp(-g))
    e = math.exp(g)
    return e / (1.0 + e)


@cuda.jit
def silu_mul_kernel(gate, up, out):  # [n], [n] -> [n]  (flattened [T, F])
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        g = gate[i]
        out[i] = g * sigmoid(g) * up[i]


def silu_mul(gate: Any, up: Any) -> Any:  # [T, F], [T, F] -> [T, F]
    """SwiGLU ``silu(gate) * up``; same contract as kernels_ref.silu_mul."""
    require_device()
    gate = contiguous(gate)
    up = contiguous(up, gate.dtype)
    out = xp.empty_like(gate)
    if out.size:
        threads = block_threads(256)
        silu_mul_kernel[grid_stride_blocks(out.size, threads), threads](
            gate.reshape(-1), up.reshape(-1), out.reshape(-1)
        )
    return out


@cuda.jit
def softmax_kernel(x, out):  # [R, n] -> [R, n]
    scratch = cuda.shared.array(MAX_BLOCK_THREADS, float64)
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n = x.shape[1]
    local_max = -math.inf
    for i in range(tid, n, cuda.blockDim.x):
        local_max = max(local_max, x[row, i])
    row_max = block_max(scratch, local_max)
    local_sum = 0.0
    for i in range(tid, n, cuda.blockDim.x):
        local_sum += math.exp(x[row, i] - row_max)
    row_sum = block_sum(scratch, local_sum)
    for i in range(tid, n, cuda.blockDim.x):
        out[row, i] = math.exp(x[row, i] - row_max) / row_sum


def softmax(x: Any, axis: int = -1) -> Any:  # [..., n] -> [..., n]
    """Numerically stable softmax along ``axis``; same contract as kernels_ref.softmax."""
    require_device()
    moved = xp.moveaxis(xp.asarray(x), axis, -1)
    rows = contiguous(moved).reshape(-1, moved.shape[-1])  # [R, n]
    out = xp.empty_like(rows)
    if rows.size:
        softmax_kernel[rows.shape[0], block_threads(128)](rows, out)
    return xp.ascontiguousarray(xp.moveaxis(out.reshape(moved.shape), -1, axis))
