"""Lab 03 (paged attention): the reference scores full marks, the stub scores zero, and planted
slot-stride and block-boundary bugs fail on the criterion they should."""

from __future__ import annotations

import inspect

import pytest

import kernels_ref
from kernels_ref.attention import (
    _decode_attention,
    attention,
    check_paged_metadata,
    check_slot_mapping,
    gather_pages,
    paged_attention,
    store_kv,
)
from nanoserve.labs.grader import FAIL, PASS
from nanoserve.labs.lab03 import LAB
from nanoserve.labs.registry import grade
from tests.lab_helpers import mutate, write

REFERENCE = [
    kernels_ref.softmax, attention, check_slot_mapping, check_paged_metadata,
    store_kv, gather_pages, paged_attention, _decode_attention,
]  # fmt: skip


def reference() -> str:
    """kernels_ref's store_kv and paged_attention with the functions they call, as a student file."""
    return "import numpy as np\n\n\n" + "\n\n".join(inspect.getsource(fn) for fn in REFERENCE)


def test_the_reference_kernels_score_full_marks(tmp_path, tiny_loaded):
    report = grade(LAB, write(tmp_path, reference()), tiny_loaded, quick=True)
    assert [r.status for r in report.results] == [PASS] * len(report.results), report.to_json()
    assert report.score == report.max_score == 100 and report.exit_code == 0
    assert "for a contiguous cache" in report.result("counters").detail
    assert "x ref" in report.speed


def test_the_untouched_stub_scores_zero_with_the_labs_message(tiny_loaded):
    report = grade(LAB, LAB.stub, tiny_loaded, quick=True)
    assert report.score == 0 and report.exit_code == 1
    assert all(r.status == FAIL for r in report.results if r.max_points)
    for name in ("property", "invariants", "integration"):
        assert "not implemented yet (Lab 03: write" in report.result(name).detail, report.to_json()
    assert "needs the integration run" in report.result("counters").detail
    assert "Traceback" not in report.to_json()


def test_a_slot_split_with_the_pool_size_as_stride_fails_store_kv_in_the_suite(tmp_path, tiny_loaded):
    """block = slot // N, offset = slot % N: the stride of slot = block * B + offset taken as N, not B."""
    source = mutate(reference(), "    flat_k[slots] = k[keep]\n", "    k_cache[slots // num_blocks, slots % num_blocks] = k[keep]\n")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed[0] == "property" and report.exit_code == 1
    result = report.result("property")
    assert result.detail.startswith("store_kv FAILED") and "slot // B" in result.hint, report.to_json()
    assert {"invariants", "integration"} <= set(report.failed)


def test_reading_the_table_entry_past_a_block_boundary_fails_paged_attention(tmp_path, tiny_loaded):
    """seq_len // B + 1 pages: at seq_len = k * B that reads an entry the sequence does not own.

    The engine pads its tables with -1 (a valid index), so this passes the integration; the
    suite's out-of-range padding catches it."""
    source = mutate(reference(), "blocks = block_table[: -(-seq_len // block_size)]", "blocks = block_table[: seq_len // block_size + 1]")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed[0] == "property"
    result = report.result("property")
    assert result.detail.startswith("paged_attention FAILED") and "block boundary" in result.hint, report.to_json()
    assert "invariants" in report.failed and report.result("integration").status == PASS


def test_a_decode_that_reads_one_token_past_seq_len_fails_on_the_nan_it_finds(tmp_path, tiny_loaded):
    source = mutate(reference(), "beyond = np.arange(num_blocks * block_size)[None, :] >= seq_lens[:, None]", "beyond = np.arange(num_blocks * block_size)[None, :] > seq_lens[:, None]")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed[0] == "property" and "paged_attention FAILED" in report.result("property").detail
    result = report.result("invariants")
    assert "NaN in every slot" in result.detail and "0 * NaN" in result.hint, report.to_json()


def test_a_store_that_writes_minus_one_slots_fails_the_invariants(tmp_path, tiny_loaded):
    source = mutate(reference(), "    keep = slot_mapping >= 0\n", "    keep = slot_mapping >= -1\n")
    source = mutate(source, "    check_slot_mapping(k_cache, slot_mapping)\n", "")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert "property" in report.failed and "invariants" in report.failed
    assert "a -1 slot wrote the pool's last slot" in report.result("invariants").detail


def test_importing_the_reference_kernels_is_not_graded_further(tmp_path, tiny_loaded):
    path = write(tmp_path, "from kernels_ref.attention import gather_pages, paged_attention, store_kv\n")
    report = grade(LAB, path, tiny_loaded, quick=True)
    assert report.result("imports").status == FAIL and report.score == 0


@pytest.mark.real_model
@pytest.mark.slow
def test_the_reference_kernels_serve_smollm2_with_the_reference_engines_tokens_and_pages(tmp_path, smollm2_loaded):
    """What ``lab check 03`` does by default: the integration and counters on SmolLM2."""
    report = grade(LAB, write(tmp_path, reference()), smollm2_loaded, quick=True)
    assert report.result("integration").status == PASS and report.result("counters").status == PASS, report.to_json()
    assert "none outside slot_mapping" in report.result("counters").detail
