"""RMSNorm on the GPU: one thread block per row, a block-wide sum of squares.

Parallel decomposition::

    grid  = rows (every leading index of x, flattened)      one block normalises one row
    block = threads striding over the row's d elements       thread i reads i, i+n, i+2n, ...

Each thread sums the squares of its elements, ``block_sum`` (shared memory, two barriers)
gives every thread the row total, and each thread then scales its own elements. A row is
read twice from global memory; for d = 576 it stays in L1/L2 between the passes.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda, float32

from kernels_cuda._reduce import block_sum
from kernels_cuda._runtime import MAX_BLOCK_THREADS, block_threads, contiguous, require_device, xp


@cuda.jit
def rms_norm_kernel(x, w, eps, out):  # [R, d] f32, [d] f32, scalar -> [R, d] f32
    scratch = cuda.shared.array(MAX_BLOCK_THREADS, float32)
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    d = x.shape[1]
    partial = float32(0.0)
    for i in range(tid, d, cuda.blockDim.x):
        partial += x[row, i] * x[row, i]
    total = block_sum(scratch, partial)  # every thread gets sum(x[row]**2)
    inv_rms = float32(1.0 / math.sqrt(total / d + eps))
    for i in range(tid, d, cuda.blockDim.x):
        out[row, i] = x[row, i] * inv_rms * w[i]


def rms_norm(x: Any, w: Any, eps: float) -> Any:  # [..., d], [d] -> [..., d]
    """``x / sqrt(mean(x**2, -1) + eps) * w`` in float32; same contract as kernels_ref.rms_norm."""
    require_device()
    shape = x.shape
    rows = contiguous(x, xp.float32).reshape(-1, shape[-1])  # [R, d]
    out = xp.empty_like(rows)
    if rows.shape[0] and rows.shape[1]:
        threads = block_threads(128)
        rms_norm_kernel[rows.shape[0], threads](rows, contiguous(w, xp.float32), float(eps), out)
    return out.reshape(shape)
