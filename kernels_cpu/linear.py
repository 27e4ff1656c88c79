"""``y = x @ W.T`` through BLAS, with the operand order that is faster for a few rows.

A decode step multiplies a handful of rows (one per sequence) by each weight matrix.
For such a short, wide ``x`` OpenBLAS runs the same product 15-25% faster when the weight
is the left operand, ``(W @ x.T).T``; for a prefill chunk of hundreds of rows the usual
order wins. ``python bench/kernels.py --backend cpu`` times both backends' ``linear``
at decode and prefill shapes on your machine.
"""

from __future__ import annotations

import numpy as np

#: Up to this many rows, compute ``(W @ x.T).T`` (measured on OpenBLAS, AVX-512, 2 cores).
FEW_ROWS = 128


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, in], [out, in] -> [T, out]
    """``x @ w.T`` with w float32 or float16 (upcast; accumulation is float32)."""
    if w.dtype != np.float32:
        w = w.astype(np.float32)
    if x.shape[0] <= FEW_ROWS:
        return np.ascontiguousarray((w @ x.T).T)
    return x @ w.T
