"""RMSNorm and RoPE as single compiled passes over the rows (spec: kernels_ref.norm, .rope).

NumPy evaluates ``x / sqrt(mean(x*x) + eps) * w`` as five passes over memory with a
temporary array each; here every row is read twice (sum of squares, then scale) and
written once. For RoPE the cos/sin tables [T, D/2] still come from NumPy, as in the
reference; one compiled pass then rotates every head, where the reference makes four
products, two sums and a concatenation. Every layer of a forward pass rotates the same
positions, so the last tables are kept and reused while the positions, head size and
base are equal (:func:`_tables`): one table computation per step instead of one per
layer.

Both run on one thread: a decode step has a few dozen rows of a few hundred floats, and
waking a thread pool would cost more than the work.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels_ref.rope import rotation_tables

# reassoc + contract let LLVM vectorise sums and fuse multiply-adds; no "fast" flags that
# assume finite values (an overflowing activation must stay inf, as in the reference)
FASTMATH = {"reassoc", "contract"}


@njit(fastmath=FASTMATH, cache=True)
def _rms_norm_rows(x, w, eps, out):  # [R, d] f32, [d] f32, float, [R, d] f32 (written)
    rows, d = x.shape
    for r in range(rows):
        sum_sq = 0.0  # float64: the mean of d squares, rounded once
        for i in range(d):
            sum_sq += np.float64(x[r, i]) * x[r, i]
        inv_rms = np.float32(1.0 / math.sqrt(np.float32(sum_sq / d) + eps))
        for i in range(d):
            out[r, i] = x[r, i] * inv_rms * w[i]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    """``y = x / sqrt(mean(x**2, axis=-1) + eps) * w`` (float32 out, like the reference)."""
    d = x.shape[-1]
    rows = np.ascontiguousarray(x.reshape(-1, d), dtype=np.float32)
    out = np.empty(rows.shape, dtype=np.float32)
    _rms_norm_rows(rows, np.ascontiguousarray(w, dtype=np.float32), float(eps), out)
    return out.reshape(x.shape)


@njit(fastmath=FASTMATH, cache=True)
def _rope_rows(x, cos, sin, out):  # [T, H, D] f32, [T, D/2] f32 x2, [T, H, D] f32 (written)
    tokens, heads, dim = x.shape
    half = dim // 2
    for t in range(tokens):
        for h in range(heads):
            for i in range(half):
                x1, x2 = x[t, h, i], x[t, h, i + half]
                out[t, h, i] = x1 * cos[t, i] - x2 * sin[t, i]
                out[t, h, i + half] = x2 * cos[t, i] + x1 * sin[t, i]


#: The last tables :func:`_tables` computed: (key, (cos, sin)), or None.
_last_tables: tuple[tuple, tuple[np.ndarray, np.ndarray]] | None = None


def _tables(positions: np.ndarray, dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:  # [T] -> [T, D/2] x2
    """``rotation_tables(positions, dim, theta)``, reused from the previous call when its
    positions (their bytes and dtype), ``dim`` and ``theta`` were the same.

    The key holds a copy of the positions' bytes, so a caller that changes its array in
    place gets new tables. The tables are never written (``_rope_rows`` only reads them).
    The (key, tables) pair is replaced in one assignment, so threads never see half of one.
    """
    global _last_tables
    positions = np.asarray(positions)
    key = (positions.tobytes(), positions.dtype.str, dim, float(theta))
    last = _last_tables
    if last is not None and last[0] == key:
        return last[1]
    tables = rotation_tables(positions, dim, theta)
    _last_tables = (key, tables)
    return tables


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:  # [T, H, D], [T] -> [T, H, D]
    """Rotate pair (x[i], x[i + D/2]) of every head of token t by ``positions[t] * theta**(-2i/D)``.

    The angle tables are the reference's (``rotation_tables``: NumPy's vectorised cos/sin
    beat a compiled scalar loop), computed once per step for all layers (:func:`_tables`);
    the rotation of every head is the compiled pass.
    """
    cos, sin = _tables(positions, x.shape[-1], theta)  # [T, D/2] x2
    out = np.empty(x.shape, dtype=np.float32)
    _rope_rows(x.astype(np.float32, copy=False), cos, sin, out)
    return out
