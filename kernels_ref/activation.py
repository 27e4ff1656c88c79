"""Element-wise activations: SwiGLU's ``silu(gate) * up`` and a numerically stable softmax."""

import numpy as np


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:  # [T, F], [T, F] -> [T, F]
    """SwiGLU: ``silu(gate) * up`` with ``silu(g) = g * sigmoid(g) = g / (1 + exp(-g))``.

    float32 in, float32 out. ``exp(-g)`` overflows to inf for g < -88, which gives the
    correct limit 0, so the warning is silenced.
    """
    with np.errstate(over="ignore"):
        return gate / (1.0 + np.exp(-gate)) * up


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:  # [..., n] -> [..., n]
    """``exp(x - max(x)) / sum(exp(x - max(x)))`` along ``axis``.

    Subtracting the max keeps exp() from overflowing; rows that are all ``-inf`` are not
    allowed (at least one entry must be finite).
    """
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)
