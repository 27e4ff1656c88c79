"""Rotary position embedding (RoPE), in the "rotate halves" layout of HF Llama.

For a head vector ``x`` of even size D, split it into halves ``x1 = x[:D/2]`` and
``x2 = x[D/2:]``. Pair i (x1[i], x2[i]) is rotated by the angle ``pos * theta**(-2i/D)``:

    out[:D/2] = x1 * cos - x2 * sin
    out[D/2:] = x2 * cos + x1 * sin

GGUF files permute the rows of Wq and Wk so that llama.cpp can rotate *adjacent* pairs
instead; nanoserve undoes that permutation on load, so this one layout serves both.
"""

import numpy as np


def rotation_tables(positions: np.ndarray, dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:  # [T] -> [T, D/2] x2
    """cos and sin (float32) of the angle ``positions[t] * theta**(-2i/D)`` of every pair i.

    The angles are computed in float64 and rounded to float32 once, at the end.
    """
    inv_freq = theta ** (-np.arange(dim // 2, dtype=np.float64) * 2.0 / dim)  # [D/2]
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:  # [T, H, D], [T] -> [T, H, D]
    """Rotate every head of token t by its position ``positions[t]``.

    x: float32 [T, H, D] (D even); positions: integer [T]; theta: the base (10000 for
    Llama 2, 100000 for SmolLM2). Returns a new float32 array [T, H, D].
    """
    half = x.shape[-1] // 2
    cos, sin = rotation_tables(positions, x.shape[-1], theta)  # [T, D/2] x2
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]: the same angle for every head
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
