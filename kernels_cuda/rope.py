"""Rotary position embedding on the GPU: one thread per rotated pair (t, h, i).

Same "rotate halves" layout as kernels_ref.rope: pair i of a head is (x[i], x[i + D/2]),
rotated by ``positions[t] * theta**(-2i/D)``. Every pair is independent, so this is a pure
element-wise kernel with a grid-stride loop over the T * H * D/2 pairs (no shared memory,
no barriers). Angles are computed in float64, as in the reference: at position 8000 a
float32 angle would already be off by ~5e-4 rad.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda, float32

from kernels_cuda._runtime import block_threads, contiguous, grid_stride_blocks, require_device, xp


@cuda.jit
def rope_kernel(x, positions, theta, out):  # [T, H, D] f32, [T] int, scalar -> [T, H, D] f32
    num_tokens, num_heads, head_dim = x.shape
    half = head_dim // 2
    for pair in range(cuda.grid(1), num_tokens * num_heads * half, cuda.gridsize(1)):
        t = pair // (num_heads * half)
        h = (pair // half) % num_heads
        i = pair % half
        angle = positions[t] * theta ** (-2.0 * i / head_dim)  # float64
        cos = float32(math.cos(angle))
        sin = float32(math.sin(angle))
        x1 = x[t, h, i]
        x2 = x[t, h, i + half]
        out[t, h, i] = x1 * cos - x2 * sin
        out[t, h, i + half] = x2 * cos + x1 * sin


def rope(x: Any, positions: Any, theta: float) -> Any:  # [T, H, D], [T] -> [T, H, D]
    """Rotate every head of token t by ``positions[t]``; same contract as kernels_ref.rope."""
    require_device()
    x = contiguous(x, xp.float32)
    out = xp.empty_like(x)
    pairs = x.shape[0] * x.shape[1] * (x.shape[2] // 2)
    if pairs:
        threads = block_threads(256)
        rope_kernel[grid_stride_blocks(pairs, threads), threads](
            x, contiguous(positions, xp.int64), float(theta), out
        )
    return out
