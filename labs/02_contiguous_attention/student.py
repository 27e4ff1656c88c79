"""Lab 02: causal, grouped-query attention over a contiguous KV cache, in NumPy.

Write the two bodies below. ``attention`` is a kernel of nanoserve's contract: the grader
uses this file as a kernel backend, so the model calls your function in every layer, for
every token. Use NumPy and the standard library only (not kernels_ref, the answer key).

    python -m nanoserve lab check 02 student.py
"""

from __future__ import annotations

import numpy as np


def causal_mask(num_q: int, num_k: int) -> np.ndarray:  # -> [Tq, Tk] bool
    """Which keys each query may see: True at [i, j] when query i may attend to key j.

    The ``num_q`` queries are the LAST ``num_q`` of the ``num_k`` positions in the cache,
    so query i sits at position ``num_k - num_q + i`` and sees keys
    ``0 .. num_k - num_q + i`` (itself included). num_q == num_k is a whole prefill (a
    lower triangle); num_q == 1 is a decode step (one row, all True).
    """
    raise NotImplementedError("Lab 02: write causal_mask")


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:  # [Tq, H, D], [Tk, Hkv, D], [Tk, Hkv, D] -> [Tq, H, D]
    """Causal attention of Tq new queries against the Tk keys and values in the cache (Tk >= Tq).

    Grouped-query attention: H query heads share Hkv key/value heads (H % Hkv == 0);
    query head h reads KV head ``h // (H // Hkv)``. With ``allowed = causal_mask(Tq, Tk)``:

        scores[i, j] = scale * q[i, h] . k[j, h // g]        (g = H // Hkv)
        weights[i]   = softmax(scores[i] where allowed[i], -inf elsewhere)
        out[i, h]    = sum_j weights[i, j] * v[j, h // g]

    q: float32; k, v: float32 or float16 (compute in float32); scale: usually 1/sqrt(D).
    Returns a new float32 array of q's shape; the inputs are not modified. Tq may be 0.
    """
    raise NotImplementedError("Lab 02: write attention")
