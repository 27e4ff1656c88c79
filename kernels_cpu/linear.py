"""``y = x @ W.T`` through BLAS, with the operand order that is faster for a few rows.

A decode step multiplies a handful of rows (one per sequence) by each weight matrix.
For such a short, wide ``x`` OpenBLAS ran the same product faster when the weight is the
left operand, ``(W @ x.T).T``: 20-25% at 4-32 rows, 7-11% at 48-128 (a layer's four
matmuls, 30 layers of distinct weights); at 512 rows the usual order was 25% faster.
``python bench/kernels.py --backend cpu`` times both backends' ``linear`` at decode and
prefill shapes on your machine.
"""

from __future__ import annotations

import numpy as np

import kernels_ref

#: Up to this many rows, compute ``(W @ x.T).T`` (measured on OpenBLAS, AVX-512, 2 cores).
FEW_ROWS = 128


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, in], [out, in] -> [T, out]
    """``x @ w.T`` with w float32 or float16 (upcast; accumulation is float32)."""
    if x.shape[0] > FEW_ROWS:
        return kernels_ref.linear(x, w)
    if w.dtype != np.float32:
        w = w.astype(np.float32)
    return np.ascontiguousarray((w @ x.T).T)
