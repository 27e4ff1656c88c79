"""Lab 09 (paged attention in numba.cuda): graded on the CUDA simulator in a fresh process.

The reference kernel scores every simulator criterion (and the gpu one is blocked without
a GPU, exit code 2); the stub scores zero; a wrong GQA head, a missing barrier and an
off-by-one at the page boundary fail the property suite."""

from __future__ import annotations

import inspect
import sys

import pytest

from nanoserve.check_kernels.gpu import gpu_present
from nanoserve.labs.grader import BLOCKED, FAIL, NOT_RUN, PASS, Submission
from nanoserve.labs.lab09 import LAB, run_worker
from nanoserve.labs.registry import grade
from tests.lab_helpers import mutate, write

HEADER = (
    "from __future__ import annotations\n\nimport math\nfrom typing import Any\n\n"
    "from numba import cuda, float32, int64\n\n"
    "from kernels_cuda._runtime import MAX_BLOCK_THREADS, block_threads, contiguous, require_device, to_device, to_host, xp\n\n"
    "CHECK_BOUNDS = False\nMAX_HEAD_DIM = 256\n\n\n"
)


def reference_source() -> str:
    """kernels_cuda's own paged attention (kernel, device function, launcher) as a student file."""
    import kernels_cuda  # noqa: F401  (imports numba only now, not when tests are collected)

    attention = sys.modules["kernels_cuda.attention"]
    parts = [attention.sequence_of, attention.paged_attention_kernel, attention.paged_attention]
    return HEADER + "\n\n".join(inspect.getsource(getattr(p, "py_func", p)) for p in parts)


@pytest.mark.slow
def test_the_reference_passes_every_simulator_criterion_and_the_gpu_one_needs_a_gpu(tmp_path, tiny_loaded):
    report = grade(LAB, write(tmp_path, reference_source()), tiny_loaded, quick=True)
    statuses = {r.name: r.status for r in report.results}
    assert all(statuses[n] == PASS for n in ("signatures", "imports", "property", "invariants", "integration")), report.to_json()
    if gpu_present():
        assert statuses["gpu"] == PASS and report.score == 100 and report.exit_code == 0, report.to_json()
    else:
        assert statuses["gpu"] == BLOCKED and report.status == BLOCKED and report.exit_code == 2
        assert report.result("gpu").detail.startswith("no NVIDIA GPU here: ") and report.score == 80
    assert "x the NumPy reference" in report.speed or report.status == BLOCKED


def test_the_untouched_stub_scores_zero_with_the_labs_message(tiny_loaded):
    report = grade(LAB, LAB.stub, tiny_loaded, quick=True)
    assert report.score == 0 and report.exit_code == 1
    assert all(r.status == FAIL for r in report.results if r.max_points)
    for name in ("property", "invariants", "integration"):
        assert "not implemented yet (Lab 09: write" in report.result(name).detail, report.to_json()
    assert "Traceback" not in report.to_json()


PLANTED_BUGS = {
    "wrong GQA head": ("kv_head = h // (q.shape[1] // k_cache.shape[2])", "kv_head = h % k_cache.shape[2]", "KV head"),
    "missing barrier": ("        cuda.syncthreads()  # (1) scores of the whole tile are visible\n", "", "a race"),
    "page boundary off by one": ("block = block_tables[s, j // block_size]", "block = block_tables[s, (j + 1) // block_size]", "j // B"),
}


@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_a_planted_kernel_bug_fails_the_property_suite_under_the_simulator(tmp_path, tiny_loaded, bug):
    old, new, hint = PLANTED_BUGS[bug]
    report = grade(LAB, write(tmp_path, mutate(reference_source(), old, new)), tiny_loaded, quick=True)
    assert report.failed[0] == "property" and report.exit_code == 1, report.to_json()
    result = report.result("property")
    assert result.detail.startswith("paged_attention FAILED") and "minimal failing example" in result.detail
    assert hint in result.hint, result.hint


def test_a_launcher_without_a_cuda_kernel_or_importing_kernels_cuda_is_not_graded_further(tmp_path, tiny_loaded):
    numpy_only = "from kernels_cuda._runtime import xp\n\n\ndef paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):\n    return xp.zeros_like(q)\n"
    report = grade(LAB, write(tmp_path, numpy_only), tiny_loaded, quick=True)
    assert report.failed == ["signatures"] and "no @cuda.jit kernel" in report.result("signatures").detail
    report = grade(LAB, write(tmp_path, "from kernels_cuda.attention import paged_attention, paged_attention_kernel\n"), tiny_loaded, quick=True)
    assert report.failed == ["imports"] and all(r.status == NOT_RUN for r in report.results[2:])


def test_the_speed_line_measures_one_launch_on_the_simulator(tmp_path):
    """grade() prints it only when every criterion passes (on a GPU); the measurement runs anywhere."""
    line = run_worker("speed", Submission(path=write(tmp_path, reference_source()), quick=True), simulator=True)
    assert line.startswith("4 decodes of 32 tokens: ") and "on the CUDA simulator" in line and "x the NumPy reference's" in line
