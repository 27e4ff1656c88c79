"""The cpu backend's few-row ``linear``: every path it can take equals the reference.

``kernels_cpu.linear`` chooses among a compiled loop (four weight rows at a time against
blocks of up to ``X_BLOCK`` rows of x, the last ``out % 4`` weight rows one at a time), its
float16 variant, and BLAS (above ``R_MAX`` rows, or for inputs the loop does not take).
The machine picks ``X_BLOCK``; every block size from 1 to 5 is tested here on any machine. Each is held here to the contract's ``linear``
tolerance (``tolerances.DOT``: error against ``|x| @ |W|.T``), at the thresholds' edges
and at SmolLM2's shapes, which the property suite keeps smaller.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import kernels_ref
from nanoserve.check_kernels.tolerances import DOT

cpu_linear = importlib.import_module("kernels_cpu.linear")  # the module; ``kernels_cpu.linear`` is the function


def _assert_within_dot_tolerance(got: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    want = kernels_ref.linear(x, w)
    assert got.shape == want.shape and got.dtype == np.float32 and got.flags.c_contiguous
    magnitude = np.abs(x.astype(np.float32)) @ np.abs(w.astype(np.float32)).T
    excess = np.abs(got - want) - (DOT.atol + DOT.rtol * magnitude)
    assert (excess <= 0).all(), f"worst excess over the DOT tolerance: {excess.max():.3g}"


def _case(rows: int, out_features: int, in_features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    return x, (rng.standard_normal((out_features, in_features)) * 0.05).astype(np.float32)


EDGES = sorted({0, 1, 2, 3, 4, cpu_linear.X_BLOCK - 1, cpu_linear.X_BLOCK, cpu_linear.X_BLOCK + 1,
                2 * cpu_linear.X_BLOCK, 2 * cpu_linear.X_BLOCK + 1, 8, 9, cpu_linear.R_MAX, cpu_linear.R_MAX + 1})  # fmt: skip


@pytest.mark.parametrize("rows", EDGES)
@pytest.mark.parametrize("out_features", [1, 4, 7, 33])  # 1, 7, 33: weight rows left over after the groups of 4
def test_linear_matches_reference_at_every_row_count_threshold(rows: int, out_features: int):
    x, w = _case(rows, out_features, 70, seed=rows)
    _assert_within_dot_tolerance(cpu_linear.linear(x, w), x, w)


@pytest.mark.parametrize("rows", [1, 2, 5, 9, 16])
@pytest.mark.parametrize("shape", [(576, 576), (960, 576), (576, 1536), (49152, 576)])
def test_compiled_rows_match_reference_at_smollm2_shapes(rows: int, shape: tuple[int, int]):
    x, w = _case(rows, *shape, seed=rows)
    _assert_within_dot_tolerance(cpu_linear.linear_rows(x, w), x, w)


@pytest.mark.parametrize("rows", [1, 3, 5, 16])
def test_float16_weights_are_widened_exactly_before_the_product(rows: int):
    x, w = _case(rows, 37, 576, seed=rows)
    half = w.astype(np.float16)
    half[0, :4] = [np.inf, -np.inf, 6e-8, -0.0]  # inf, a subnormal half, negative zero
    x[:, :4] = [0.0, 0.0, 1.0, 1.0]  # inf * 0 = nan in both, not inf
    got, want = cpu_linear.linear(x, half), kernels_ref.linear(x, half)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    magnitude = np.abs(x) @ np.abs(np.nan_to_num(half.astype(np.float32), posinf=0, neginf=0)).T
    assert (np.abs(got[finite] - want[finite]) <= DOT.atol + DOT.rtol * magnitude[finite]).all()


@pytest.mark.parametrize("x_block", [1, 2, 3, 4, 5])
def test_every_block_size_of_x_gives_the_reference_product(x_block: int):
    """The machine picks ``X_BLOCK`` (5 with AVX-512, else 2); every size is held to the
    contract here, float32 and float16 weights, with rows that end in every partial block."""
    for rows in range(1, 12):
        x, w = _case(rows, 37, 96, seed=rows)
        for weight in (w, w.astype(np.float16)):
            out = np.empty((rows, w.shape[0]), dtype=np.float32)
            if weight.dtype == np.float16:
                cpu_linear._linear_rows_f16(x, weight.view(np.uint16), out, x_block, 0, w.shape[0])
            else:
                cpu_linear._linear_rows_f32(x, weight, out, x_block, 0, w.shape[0])
            _assert_within_dot_tolerance(out, x, weight)


def test_widen_half_row_is_exact_for_every_float16_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    got = np.empty(bits.shape, dtype=np.float32)
    cpu_linear._widen_half_row(bits, got)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_non_contiguous_and_non_float32_inputs_give_the_reference_result():
    x, w = _case(6, 40, 64)
    wide = np.repeat(x, 2, axis=1)[:, ::2]  # the same values, a strided view
    assert not wide.flags.c_contiguous
    _assert_within_dot_tolerance(cpu_linear.linear(wide, w), x, w)
    _assert_within_dot_tolerance(cpu_linear.linear(x, np.asfortranarray(w)), x, w)  # BLAS path
    got64 = cpu_linear.linear(x.astype(np.float64), w)  # BLAS path, float64 as the reference gives
    assert got64.dtype == kernels_ref.linear(x.astype(np.float64), w).dtype


def test_blas_path_is_the_same_product():
    x, w = _case(cpu_linear.R_MAX + 1, 50, 64)
    np.testing.assert_allclose(cpu_linear.linear(x, w), cpu_linear.linear_blas(x, w), rtol=0, atol=0)
