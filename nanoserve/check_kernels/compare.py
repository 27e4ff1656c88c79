"""Comparing one output of a backend's kernel with the reference's, within a :class:`Tolerance`.

:func:`compare` checks shape and dtype, then every element; non-finite entries must
match exactly. The driver (:mod:`nanoserve.check_kernels.driver`) calls it on each
output of each case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoserve.check_kernels.tolerances import Tolerance


@dataclass
class CaseOutcome:
    """One example: the largest error, its ratio to the allowed error, what was wrong."""

    max_abs_error: float = 0.0
    worst_ratio: float = 0.0  # max of error / allowed error; <= 1 passes
    problem: str | None = None


def _index(flat: int, shape: tuple) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def compare(got: Any, want: np.ndarray, tolerance: Tolerance, magnitude: Any = None) -> CaseOutcome:
    """Compare one output with the reference's; ``magnitude`` defaults to ``|want|``."""
    got = np.asarray(got)
    if got.shape != want.shape:
        return CaseOutcome(problem=f"output shape {got.shape}, expected {want.shape}")
    if got.dtype != want.dtype:
        return CaseOutcome(problem=f"output dtype {got.dtype}, expected {want.dtype}")
    if got.size == 0:
        return CaseOutcome()
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _compare_values(got, want, tolerance, magnitude)


def _compare_values(got: np.ndarray, want: np.ndarray, tolerance: Tolerance, magnitude: Any) -> CaseOutcome:
    g, w = got.astype(np.float64), want.astype(np.float64)
    special = ~np.isfinite(g) | ~np.isfinite(w)
    mismatched = special & ~((g == w) | (np.isnan(g) & np.isnan(w)))
    if mismatched.any():
        where = _index(int(np.argmax(mismatched)), got.shape)
        return CaseOutcome(
            math.inf, math.inf,
            f"{int(mismatched.sum())} non-finite entries differ, first at {where}: "
            f"got {g[where]}, expected {w[where]}",
        )  # fmt: skip
    err = np.where(special, 0.0, np.abs(g - w))
    if magnitude is None:
        scale = np.abs(w)
    else:
        scale = np.broadcast_to(np.asarray(magnitude, dtype=np.float64), w.shape)
    allowed = tolerance.atol + tolerance.rtol * np.where(special, 0.0, scale)
    ratio = np.where(err == 0, 0.0, err / allowed)
    worst = int(np.argmax(ratio))
    outcome = CaseOutcome(float(err.max()), float(ratio.flat[worst]))
    if outcome.worst_ratio > 1.0:
        where = _index(worst, got.shape)
        outcome.problem = (
            f"|error| {err[where]:.3g} at {where} (got {g[where]:.7g}, expected {w[where]:.7g}), "
            f"allowed {allowed[where]:.3g} ({tolerance})"
        )
    return outcome
