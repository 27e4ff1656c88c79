"""Linear layers ``y = x @ W.T`` for every weight format nanoserve stores.

Weights are [out, in] (PyTorch's convention). The quantized variants take the format's
raw arrays (see kernels_ref.quant for the layouts) and, in this reference, simply
dequantize then multiply: that is the definition a fused GPU kernel must match.
"""

import numpy as np

from kernels_ref.quant import (
    dequantize_int4,
    dequantize_int8,
    dequantize_q4_0,
    dequantize_q4_1,
    dequantize_q8_0,
)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, in], [out, in] -> [T, out]
    """``x @ w.T`` with w float32 or float16 (float16 is upcast; accumulation is float32)."""
    if w.dtype != np.float32:
        w = w.astype(np.float32)
    return x @ w.T


def linear_int8(x: np.ndarray, qweight: np.ndarray, scale: np.ndarray) -> np.ndarray:  # [T, in], int8 [out, in], [out] -> [T, out]
    """``x @ (qweight * scale[:, None]).T``; equal to ``(x @ qweight.T) * scale``."""
    return x @ dequantize_int8(qweight, scale).T


def linear_int4(x: np.ndarray, qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/2], [out, G] -> [T, out]
    """``x @ dequantize_int4(qweight, scales).T`` (group-wise int4, see kernels_ref.quant)."""
    return x @ dequantize_int4(qweight, scales).T


def linear_q8_0(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*34] -> [T, out]
    """``x @ dequantize_q8_0(raw).T``."""
    return x @ dequantize_q8_0(raw).T


def linear_q4_0(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*18] -> [T, out]
    """``x @ dequantize_q4_0(raw).T``."""
    return x @ dequantize_q4_0(raw).T


def linear_q4_1(x: np.ndarray, raw: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/32*20] -> [T, out]
    """``x @ dequantize_q4_1(raw).T``."""
    return x @ dequantize_q4_1(raw).T
