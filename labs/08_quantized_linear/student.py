"""Lab 08: a fused weight-only int4 linear, ``y = x @ dequant(W).T`` from the packed bytes.

Write the three bodies below. The grader uses this file as a kernel backend: with
``--weights int4`` every linear layer of the real engine (attention, MLP and the tied LM
head) calls your ``linear_int4``. Use NumPy, Numba (optional, for the fast version) and
the standard library; not kernels_ref, kernels_cpu, kernels_cuda or nanoserve.quant (the
answer keys).

The format (group-wise symmetric int4, ``g`` columns per group, ``G = in / g`` groups):

    qweight  uint8 [out, in/2]   byte k of a row holds column 2k in its LOW nibble
                                 (byte & 0xF) and column 2k+1 in its HIGH nibble (byte >> 4)
    scales   float32 [out, G]    one scale per row per group of g consecutive columns
    W[o, c] = (nibble(o, c) - 8) * scales[o, c // g]       nibbles 0..15 stand for -8..7

    python -m nanoserve lab check 08 student.py
"""

from __future__ import annotations

import numpy as np


def quantize_int4(w: np.ndarray, group_size: int = 32) -> tuple[np.ndarray, np.ndarray]:  # [out, in] -> uint8 [out, in/2], f32 [out, in/g]
    """Quantize a float32 matrix to the format above.

    For each row and each group of ``group_size`` consecutive columns: ``scale = max|w| / 7``
    (1.0 when the group is all zeros, so no division by zero), ``q = round(w / scale)``
    clipped to -8..7, stored as ``q + 8`` in 0..15, two columns per byte (even column low).
    Returns ``(qweight, scales)``. Raise an exception (ValueError, say) when ``in`` is not a
    multiple of ``group_size`` or not even.
    """
    raise NotImplementedError("Lab 08: write quantize_int4")


def dequantize_int4(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:  # uint8 [out, in/2], f32 [out, G] -> f32 [out, in]
    """The float32 matrix ``W[o, c] = (nibble(o, c) - 8) * scales[o, c // g]``, with
    ``g = in / G`` (``in = 2 * qweight.shape[1]``)."""
    raise NotImplementedError("Lab 08: write dequantize_int4")


def linear_int4(x: np.ndarray, qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:  # [T, in], uint8 [out, in/2], f32 [out, G] -> f32 [T, out]
    """``x @ dequantize_int4(qweight, scales).T`` in float32; ``T`` may be 0.

    Any group size ``g`` that divides ``in`` (the grader draws 2, 4, 8, 16 and 32). The
    inputs must not be modified. A first version may dequantize, then multiply; the fused
    version (optional, Numba) reads each byte once and never builds the float matrix.
    """
    raise NotImplementedError("Lab 08: write linear_int4")
