"""Lab 01: the pointwise kernels of a Llama forward pass, in NumPy.

Write the four bodies below. Each is a kernel of nanoserve's contract: the grader uses
this file as a kernel backend, so the real engine calls your functions for every token.
Use NumPy and the standard library only (not kernels_ref, the answer key).

    python -m nanoserve lab check 01 student.py
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    """``y = x / sqrt(mean(x**2, axis=-1) + eps) * w``.

    x: float32 [..., d]; w: float32 [d] (the learned gain); returns a new float32 array.
    The mean is over the last axis, in float32.
    """
    raise NotImplementedError("Lab 01: write rms_norm")


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:  # [T, H, D], [T] -> [T, H, D]
    """Rotary position embedding, "rotate halves" layout (HF Llama).

    Split each head vector into ``x1 = x[..., :D/2]`` and ``x2 = x[..., D/2:]``; pair i is
    rotated by the angle ``positions[t] * theta**(-2i/D)`` (compute the angles in float64,
    then cos and sin as float32):

        out[..., :D/2] = x1 * cos - x2 * sin
        out[..., D/2:] = x2 * cos + x1 * sin

    x: float32 [T, H, D] (D even); positions: integer [T]. Returns a new float32 array.
    """
    raise NotImplementedError("Lab 01: write rope")


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:  # [T, F], [T, F] -> [T, F]
    """SwiGLU's ``silu(gate) * up``, where ``silu(g) = g / (1 + exp(-g))``. float32 in and out."""
    raise NotImplementedError("Lab 01: write silu_mul")


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:  # [..., n] -> [..., n]
    """``exp(x - max(x)) / sum(exp(x - max(x)))`` along ``axis``; at least one entry per row is finite."""
    raise NotImplementedError("Lab 01: write softmax")
