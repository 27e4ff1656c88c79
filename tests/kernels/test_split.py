"""Output rows split over threads (``kernels_cpu.split``) change no bit of any product.

Each output row is one dot product that the split kernel gives to exactly one thread,
which runs the one-thread loop on it, so every linear of the cpu backend must return the
same bits at 1, 2 and 3 threads: float32 and float16 weights (the few-row loop), and every
quantized format at one row (the lanes kernels) and at several (the quad kernels). Row
counts that do not divide evenly, fewer rows than threads, and the rows after the last
group of four are all covered; a part left unwritten would show as garbage from
``np.empty``, a part written twice with a different block of rows as different bits.
"""

from __future__ import annotations

import importlib

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_cpu import quant, split
from tests.kernels.test_quant_cpu import FORMATS, weight_arrays

# the module; ``kernels_cpu.linear`` is the package's function
cpu_linear = importlib.import_module("kernels_cpu.linear")
THREAD_COUNTS = [n for n in (2, 3) if n <= numba.config.NUMBA_NUM_THREADS]


@pytest.fixture(autouse=True)
def one_thread_after():
    """Each test leaves the kernels on one thread, as the policy's default has them."""
    yield
    split.set_threads(1)


def at_threads(count: int, fn, *args) -> np.ndarray:
    split.set_threads(count)
    try:
        return fn(*args)
    finally:
        split.set_threads(1)


@pytest.mark.parametrize("count", THREAD_COUNTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 32])
def test_every_quantized_linear_gives_the_same_bits_on_more_threads(fmt: str, rows: int, count: int) -> None:
    arrays = weight_arrays(fmt, 302, 576, seed=rows)  # 302 rows: split unevenly, 2 past the groups of four
    x = np.random.default_rng(rows).standard_normal((rows, 576)).astype(np.float32)
    kernel = getattr(quant, f"linear_{fmt}")
    one = kernel(x, *arrays)
    np.testing.assert_array_equal(at_threads(count, kernel, x, *arrays), one)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), out=st.integers(1, 41), inp=st.integers(1, 70), half=st.booleans(),
       count=st.sampled_from(THREAD_COUNTS or [1]))  # fmt: skip
def test_the_few_row_loop_gives_the_same_bits_on_more_threads(
    rows: int, out: int, inp: int, half: bool, count: int
) -> None:
    rng = np.random.default_rng(rows * 1000 + out * 10 + inp)
    x = rng.standard_normal((rows, inp)).astype(np.float32)
    w = rng.standard_normal((out, inp)).astype(np.float16 if half else np.float32)
    np.testing.assert_array_equal(
        at_threads(count, cpu_linear.linear_rows, x, w), cpu_linear.linear_rows(x, w)
    )


@pytest.mark.parametrize("align", [1, 4])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_the_parts_cover_every_row_once_cut_at_multiples_of_align(parts: int, align: int) -> None:
    for n in range(parts * align, 60):
        bounds = [split.part_bounds(n, p, parts, align) for p in range(parts)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False))  # contiguous
        assert all(lo % align == 0 and hi > lo for lo, hi in bounds)  # none empty, cut on a group


def test_fewer_rows_than_threads_take_fewer_parts() -> None:
    split.set_threads(2)
    assert split.parts_for(1) == 1 and split.parts_for(7, align=4) == 1
    assert split.parts_for(8, align=4) == 2
    split.set_threads(1)
    assert split.parts_for(1000) == 1


@pytest.mark.parametrize("bad", [0, numba.config.NUMBA_NUM_THREADS + 1])
def test_a_thread_count_outside_numbas_pool_is_refused_and_changes_nothing(bad: int) -> None:
    with pytest.raises(
        ValueError, match=rf"^kernel threads must be in \[1, {numba.config.NUMBA_NUM_THREADS}\], got {bad}$"
    ):
        split.set_threads(bad)
    assert split.threads() == 1
