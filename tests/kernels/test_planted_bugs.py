"""The suite catches real kernel bugs: each planted bug (tests/kernels/planted_bugs.py) fails.

A correct copy of the same code passes with the same settings, so a failure here is the
bug being found, not the harness being strict.
"""

from __future__ import annotations

import types

import pytest

from nanoserve.check_kernels import check_kernel
from nanoserve.kernels import Backend, get_backend, register_backend
from tests.kernels import planted_bugs

EXAMPLES = 25


def _backend(name: str, namespace: types.SimpleNamespace) -> Backend:
    register_backend(f"planted-{name}", namespace)
    return get_backend(f"planted-{name}")


def test_the_correct_copy_of_paged_attention_passes(profile) -> None:
    report = check_kernel(_backend("correct", planted_bugs.CORRECT_PAGED), "paged_attention", parent=profile)
    assert report.status == "pass", report.describe_failure()


def test_suite_catches_a_wrong_gqa_head_mapping(profile) -> None:
    report = check_kernel(_backend("gqa", planted_bugs.WRONG_GQA_HEAD), "paged_attention", parent=profile)
    assert report.status == "FAIL"
    example = report.failing_example
    assert example["kv_heads"] >= 2 and example["group"] >= 2  # the only shapes where h % Hkv != h // g


def test_suite_catches_an_off_by_one_on_the_last_key(profile) -> None:
    report = check_kernel(_backend("last-key", planted_bugs.LAST_KEY_DROPPED), "paged_attention", parent=profile)
    assert report.status == "FAIL"
    assert sum(q_len for q_len, _ in report.failing_example["seqs"]) >= 1


def test_suite_catches_a_missing_barrier_in_a_reduction(profile) -> None:
    report = check_kernel(_backend("race", planted_bugs.RACY_RMS_NORM), "rms_norm", max_examples=EXAMPLES, parent=profile)
    assert report.status == "FAIL", "the race went unnoticed"
    assert "rms_norm" in report.describe_failure()


def test_suite_catches_padding_tokens_written_to_the_cache(profile) -> None:
    report = check_kernel(_backend("padding", planted_bugs.PADDING_STORED), "store_kv", parent=profile)
    assert report.status == "FAIL"
    assert report.failing_example["skip_fraction"] > 0


def test_suite_catches_top_k_dropping_ties(profile) -> None:
    report = check_kernel(_backend("ties", planted_bugs.TIES_DROPPED), "top_k_filter", parent=profile)
    assert report.status == "FAIL"
    assert report.failing_example["ties"] is True


@pytest.mark.parametrize("kernel", ["rms_norm", "store_kv", "top_k_filter"])
def test_kernels_a_planted_backend_does_not_define_fall_back_to_the_reference(kernel: str) -> None:
    backend = _backend("gqa", planted_bugs.WRONG_GQA_HEAD)
    assert kernel in backend.fallbacks
    assert check_kernel(backend, kernel).status == "ref"
