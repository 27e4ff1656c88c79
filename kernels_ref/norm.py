"""RMSNorm: scale each vector by the inverse of its root mean square, then by a learned gain."""

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    """``y = x / sqrt(mean(x**2, axis=-1) + eps) * w``.

    x: float32 [..., d]; w: float32 [d]; returns float32 [..., d]. The mean is taken in
    float32, as the model was trained with it.
    """
    x = x.astype(np.float32, copy=False)
    mean_square = np.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    return (x * (1.0 / np.sqrt(mean_square + eps))) * w
