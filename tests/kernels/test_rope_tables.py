"""The cpu backend's RoPE reuses its angle tables across the layers of a step
(``kernels_cpu.pointwise._tables``); a reused table must never be a stale one."""

from __future__ import annotations

import numpy as np

import kernels_ref
from kernels_cpu import pointwise


def _heads(tokens: int, dim: int, seed: int) -> np.ndarray:  # [T, H, D] float32
    return np.random.default_rng(seed).standard_normal((tokens, 4, dim)).astype(np.float32)


def _assert_reference(x: np.ndarray, positions: np.ndarray, theta: float) -> None:
    np.testing.assert_allclose(
        pointwise.rope(x, positions, theta), kernels_ref.rope(x, positions, theta), rtol=1e-6, atol=1e-6
    )


def test_equal_positions_reuse_the_tables_and_any_change_recomputes_them():
    positions = np.array([0, 5, 17, 300], dtype=np.int64)
    x = _heads(4, 64, seed=0)
    first = pointwise._tables(positions, 64, 100000.0)
    assert (
        pointwise._tables(positions.copy(), 64, 100000.0) is first
    )  # equal positions, another array: reused
    _assert_reference(x, positions, 100000.0)
    changed = positions.copy()
    changed[2] = 18
    for args in [
        (changed, 64, 100000.0),
        (positions, 32, 100000.0),
        (positions, 64, 10000.0),
        (positions.astype(np.int32), 64, 100000.0),
    ]:
        assert pointwise._tables(*args) is not first
        _assert_reference(_heads(4, args[1], seed=1), args[0], args[2])


def test_positions_changed_in_place_get_new_tables():
    positions = np.arange(8, dtype=np.int64)
    x = _heads(8, 64, seed=2)
    _assert_reference(x, positions, 100000.0)
    positions += 40  # the same array object, new values
    _assert_reference(x, positions, 100000.0)
