"""How close is close: the :class:`Tolerance` of every kernel and what its error is measured against.

Each tolerance is ``atol + rtol * magnitude``; the magnitude functions here compute
that scale from a case's arguments where ``|ref|`` is not the right one (the table in
docs/kernels.md says why for each kernel). The kernel specs in
:mod:`nanoserve.check_kernels.cases` pair each kernel with one of these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """An element passes when ``|got - ref| <= atol + rtol * magnitude``.

    ``magnitude`` is stated per kernel in ``relative_to`` (usually ``|ref|``; for a dot
    product ``|x| @ |W|.T``, the size of the terms that were summed). Entries that are
    not finite (the filters' ``-inf``) must match exactly. atol = rtol = 0 means exact.
    """

    atol: float
    rtol: float
    relative_to: str = "|ref|"

    @property
    def exact(self) -> bool:
        return self.atol == 0 and self.rtol == 0

    def __str__(self) -> str:
        if self.exact:
            return "exact"
        return f"{self.atol:g} + {self.rtol:g}*{self.relative_to}"


#: store_kv and the logit filters: copies and masks, any difference is a bug.
EXACT = Tolerance(0.0, 0.0)
#: apply_penalties: a division or product, then two multiply-subtracts, each rounded to
#: float32 (a GPU compiler may fuse a multiply-subtract, rounding once where NumPy rounds
#: twice; magnitude: :func:`penalty_magnitude`).
PENALTY = Tolerance(0.0, 1e-6, "(|x|+|f|*count+|p|)")
#: rms_norm, silu_mul, softmax: float32 element-wise math, different reduction order.
CLOSE = Tolerance(1e-6, 1e-5)
#: rope: a rotation mixes a head's entries (magnitude: :func:`rope_magnitude`).
ROTATION = Tolerance(1e-6, 1e-5, "max|x| of the head")
#: linear and its quantized variants: a float32 dot product's rounding scales with its
#: terms, not its result (magnitude: :func:`dot_magnitude`).
DOT = Tolerance(1e-6, 2e-5, "|x|@|W|.T")
#: attention, paged_attention: outputs are convex combinations of value rows
#: (magnitude: :func:`value_magnitude`).
ATTENTION = Tolerance(1e-5, 1e-4, "max|v|")


def rope_magnitude(args: tuple, ref: np.ndarray) -> np.ndarray:  # rotation mixes a head's entries
    return np.abs(args[0]).max(axis=-1, keepdims=True)


def dot_magnitude(dequantize: Callable[..., np.ndarray]) -> Callable[[tuple, np.ndarray], np.ndarray]:
    """``|x| @ |W|.T``: the size of the summed terms, the scale of a dot product's rounding."""

    def magnitude(args: tuple, ref: np.ndarray) -> np.ndarray:
        w = dequantize(*args[1:]).astype(np.float64)
        return np.abs(args[0].astype(np.float64)) @ np.abs(w).T

    return magnitude


def penalty_magnitude(args: tuple, ref: np.ndarray) -> np.ndarray:  # -> [S, V]
    """The size of the terms apply_penalties sums: ``|x| + |frequency| * count + |presence|``,
    where x is the logit after the repetition penalty (a fused multiply-subtract rounds at
    the scale of its product)."""
    logits, prompt_mask, output_counts, presence, frequency, repetition = args
    x = logits.astype(np.float64)
    r = repetition.astype(np.float64)[:, None]
    with np.errstate(invalid="ignore"):
        x = np.where(prompt_mask | (output_counts > 0), np.where(x > 0, x / r, x * r), x)
        return (
            np.abs(x)
            + np.abs(frequency.astype(np.float64))[:, None] * output_counts
            + np.abs(presence.astype(np.float64))[:, None]
        )


def value_magnitude(position: int) -> Callable[[tuple, np.ndarray], float]:
    """Attention output is a convex combination of value rows: bounded by max |v|."""

    def magnitude(args: tuple, ref: np.ndarray) -> float:
        v = args[position]
        return float(np.abs(v.astype(np.float32)).max()) if v.size else 0.0

    return magnitude
