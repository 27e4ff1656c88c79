"""Every kernel of every built-in backend matches kernels_ref within its stated tolerance.

The properties themselves live in nanoserve.check_kernels (the same suite students run
with ``python -m nanoserve check-kernels``); here they run for ``ref`` (trivially equal
to itself: a check of the suite's generators), ``cpu`` (Numba-compiled) and ``cuda`` (on
the simulator without a GPU). Edge cases run first every time: empty batches, length-1
sequences, lengths that are exact multiples of the block size, disabled filters.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernels_ref
from nanoserve import check_kernels
from nanoserve.check_kernels import EXACT, Tolerance, check_kernel, compare
from nanoserve.kernels import get_backend
from tests.kernels.conftest import limits_for


@pytest.mark.parametrize("kernel", kernels_ref.KERNEL_NAMES)
@pytest.mark.parametrize("backend", ["ref", "cpu", "cuda"])
def test_kernel_matches_reference_over_random_shapes(backend: str, kernel: str, profile) -> None:
    report = check_kernel(backend, kernel, limits=limits_for(backend), parent=profile)
    assert report.status == "pass", report.describe_failure()
    assert report.examples >= 1


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_built_in_backends_implement_the_whole_contract(backend: str) -> None:
    assert get_backend(backend).fallbacks == ()


def test_every_kernel_has_a_spec() -> None:
    assert set(check_kernels.SPECS) == set(kernels_ref.KERNEL_NAMES)


def test_compare_flags_a_missing_minus_inf() -> None:
    want = np.array([[1.0, -np.inf]], dtype=np.float32)
    outcome = compare(np.array([[1.0, 3.0]], dtype=np.float32), want, EXACT)
    assert outcome.problem and "non-finite" in outcome.problem


def test_compare_states_error_relative_to_the_given_magnitude() -> None:
    want = np.array([0.0, 10.0], dtype=np.float32)
    got = np.array([1e-4, 10.0], dtype=np.float32)
    assert compare(got, want, Tolerance(0.0, 1e-4)).problem  # |ref| = 0 allows nothing
    assert compare(got, want, Tolerance(0.0, 1e-4, "10"), magnitude=10.0).problem is None


def test_compare_rejects_wrong_shape_and_dtype() -> None:
    want = np.zeros((2, 3), dtype=np.float32)
    assert "shape" in compare(np.zeros((3, 2), dtype=np.float32), want, EXACT).problem
    assert "dtype" in compare(np.zeros((2, 3), dtype=np.float64), want, EXACT).problem


def test_a_kernel_that_modifies_its_input_fails() -> None:
    import types

    def softmax_in_place(x, axis=-1):  # [..., n] -> [..., n], but clobbers x
        out = kernels_ref.softmax(x, axis)
        x[...] = 0
        return out

    from nanoserve.kernels import register_backend

    register_backend("test-mutates-input", types.SimpleNamespace(softmax=softmax_in_place))
    report = check_kernel("test-mutates-input", "softmax", max_examples=5)
    assert report.status == "FAIL" and "modified its input" in report.problem


def test_kernels_a_backend_lacks_are_reported_as_reference() -> None:
    import types

    from nanoserve.kernels import register_backend

    register_backend("test-only-softmax", types.SimpleNamespace(softmax=kernels_ref.softmax))
    report = check_kernel("test-only-softmax", "rms_norm")
    assert report.status == "ref" and report.passed and report.examples == 0


def _penalties_with(*, prompt_counts: bool = True, fused: bool = False):
    """apply_penalties written per element, with the prompt ignored or the multiply-subtract fused."""

    def apply_penalties(logits, prompt_mask, output_counts, presence, frequency, repetition):  # [S, V] -> [S, V]
        seen = (prompt_mask if prompt_counts else np.zeros_like(prompt_mask)) | (output_counts > 0)
        r = repetition.astype(np.float32)[:, None]
        x = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
        if fused:  # x - f * c rounded once, as a GPU's fused multiply-add does
            x = (x.astype(np.float64) - frequency[:, None].astype(np.float64) * output_counts).astype(np.float32)
        else:
            x = x - frequency[:, None] * output_counts.astype(np.float32)
        return (x - presence[:, None] * (output_counts > 0).astype(np.float32)).astype(np.float32)

    return apply_penalties


def test_a_repetition_penalty_that_ignores_the_prompt_fails() -> None:
    import types

    from nanoserve.kernels import register_backend

    register_backend("test-penalties-output-only", types.SimpleNamespace(apply_penalties=_penalties_with(prompt_counts=False)))
    report = check_kernel("test-penalties-output-only", "apply_penalties", max_examples=50)
    assert report.status == "FAIL", "the suite missed a penalty that ignores the prompt"


def test_a_fused_multiply_subtract_is_within_the_penalty_tolerance() -> None:
    import types

    from nanoserve.kernels import register_backend

    register_backend("test-penalties-fused", types.SimpleNamespace(apply_penalties=_penalties_with(fused=True)))
    # a fixed seed: unseeded, some runs drew no example where the two roundings differ
    report = check_kernel("test-penalties-fused", "apply_penalties", max_examples=100, seed=0)
    assert report.status == "pass", report.describe_failure()
    assert report.max_abs_error > 0  # it does round differently: the tolerance is needed
