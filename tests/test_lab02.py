"""Lab 02 (contiguous attention): the reference scores full marks, the stub scores zero, and
planted GQA and causal-mask bugs fail on the criterion they should."""

from __future__ import annotations

import inspect

import pytest

import kernels_ref
from nanoserve.labs import lab02
from nanoserve.labs.grader import FAIL, PASS
from nanoserve.labs.lab02 import LAB
from nanoserve.labs.registry import grade
from tests.lab_helpers import mutate, write


def reference() -> str:
    """The reference attention (with its softmax) and the lesson's causal_mask, as a student file."""
    functions = [kernels_ref.softmax, lab02.causal_mask, kernels_ref.attention]
    return "import numpy as np\n\n\n" + "\n\n".join(inspect.getsource(fn) for fn in functions)


def test_the_reference_attention_scores_full_marks(tmp_path, tiny_loaded):
    report = grade(LAB, write(tmp_path, reference()), tiny_loaded, quick=True)
    assert [r.status for r in report.results] == [PASS] * len(report.results), report.to_json()
    assert report.score == report.max_score == 100 and report.exit_code == 0
    assert "calls of your attention" in report.result("integration").detail
    assert "x ref" in report.speed


def test_the_untouched_stub_scores_zero_with_the_labs_message(tiny_loaded):
    report = grade(LAB, LAB.stub, tiny_loaded, quick=True)
    assert report.score == 0 and report.exit_code == 1
    assert all(r.status == FAIL for r in report.results if r.max_points)
    for name in ("property", "invariants", "integration"):
        assert "not implemented yet (Lab 02: write" in report.result(name).detail, report.to_json()
    assert "Traceback" not in report.to_json()


def test_kv_heads_paired_like_np_tile_fail_the_property_suite_with_the_gqa_hint(tmp_path, tiny_loaded):
    """Query head h reads KV head h % Hkv instead of h // (H // Hkv)."""
    bug = (
        "group = num_heads // num_kv_heads\n"
        "    k, v = np.tile(k, (1, group, 1)), np.tile(v, (1, group, 1))  # head h -> KV head h % Hkv\n"
        "    num_kv_heads, group = num_heads, 1"
    )
    source = mutate(reference(), "group = num_heads // num_kv_heads", bug)
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed[0] == "property" and report.exit_code == 1
    result = report.result("property")
    assert result.detail.startswith("attention FAILED") and "h % Hkv" in result.hint, report.to_json()
    assert "integration" in report.failed  # the tiny model has 4 query heads over 2 KV heads


def test_a_mask_one_position_late_fails_the_property_suite_and_causality(tmp_path, tiny_loaded):
    """Query i at position Tk - Tq + i + 1: every query of a prefill sees one future key (a decode is unaffected)."""
    source = mutate(reference(), "q_pos = np.arange(num_k - num_q, num_k)[:, None]  # [Tq, 1]\n    k_pos", "q_pos = np.arange(num_k - num_q + 1, num_k + 1)[:, None]  # [Tq, 1]\n    k_pos")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed[0] == "property"
    assert "one key past its own position" in report.result("property").hint, report.to_json()
    assert "in its future" in report.result("invariants").detail


def test_a_mask_helper_that_excludes_the_diagonal_fails_the_invariants_only(tmp_path, tiny_loaded):
    source = mutate(reference(), "return np.arange(num_k)[None, :] <= q_pos", "return np.arange(num_k)[None, :] < q_pos")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed == ["invariants"] and "causal_mask(1, 1)" in report.result("invariants").detail


def test_importing_the_reference_attention_is_not_graded_further(tmp_path, tiny_loaded):
    path = write(tmp_path, "from kernels_ref.attention import attention\n\n\ndef causal_mask(num_q, num_k):\n    return None\n")
    report = grade(LAB, path, tiny_loaded, quick=True)
    assert report.result("imports").status == FAIL and "kernels_ref.attention" in report.result("imports").detail
    assert report.score == 0


@pytest.mark.real_model
@pytest.mark.slow
def test_the_reference_attention_serves_smollm2_with_the_reference_engines_tokens(tmp_path, smollm2_loaded):
    """What ``lab check 02`` does by default: 9 query heads over 3 KV heads, 30 layers."""
    report = grade(LAB, write(tmp_path, reference()), smollm2_loaded, quick=True)
    assert report.result("integration").status == PASS, report.to_json()
    assert "greedy tokens equal the reference engine's" in report.result("integration").detail
