"""Helpers every case generator shares: a case's random generator, random arrays, strategies.

A case is a small dictionary of parameters plus a seed; :func:`case_rng` turns the seed
into the generator that builds the arrays, so the same dictionary always builds the same
arguments. Hypothesis is imported only when a strategy is asked for.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def case_rng(params: dict) -> np.random.Generator:
    return np.random.default_rng(params["seed"])


def normal(rng: np.random.Generator, shape: tuple, scale: float = 1.0, dtype: Any = np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def strategies() -> Any:
    from hypothesis import strategies

    return strategies


def seeds() -> Any:
    return strategies().integers(0, 2**16)
