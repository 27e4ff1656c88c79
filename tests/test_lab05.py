"""Lab 05 (the scheduler): the reference scores full marks, the stub zero, planted bugs fail on
the criterion they should, and the engine refuses a plain scheduler with speculative decoding."""

from __future__ import annotations

import inspect

import pytest

from nanoserve import scheduler
from nanoserve.engine import LLMEngine
from nanoserve.errors import ConfigError
from nanoserve.labs.grader import FAIL, PASS
from nanoserve.labs.lab05 import LAB
from nanoserve.labs.registry import grade
from tests.lab_helpers import mutate

HEADER = (
    "import time\n"
    "from collections import deque\n"
    "from nanoserve.interfaces import KVManager, ScheduledBatch\n"
    "from nanoserve.request import Request, RequestStatus, stop_reason\n"
    "from nanoserve.sampling import SampleResult\n"
    "from nanoserve.stats import SchedulerStats\n\n\n"
)


def reference() -> str:
    """nanoserve's FCFS Scheduler's own source as a student file; like the stub's class it does
    not declare that it schedules drafts."""
    source = inspect.getsource(scheduler.Scheduler)
    return HEADER + mutate(source, "    supports_speculation = True", "    supports_speculation = False")


def graded(tmp_path, tiny_loaded, source: str):
    path = tmp_path / "student.py"
    path.write_text(source)
    return grade(LAB, str(path), tiny_loaded, quick=True)


def test_the_reference_scheduler_adapted_to_the_stub_scores_full_marks(tmp_path, tiny_loaded):
    report = graded(tmp_path, tiny_loaded, reference())
    assert [r.status for r in report.results] == [PASS] * len(report.results), report.to_json()
    assert report.score == report.max_score == 100 and report.exit_code == 0
    assert "preemptions" in report.result("integration").detail and "x the reference scheduler" in report.speed


def test_the_untouched_stub_scores_zero_with_the_labs_message(tiny_loaded):
    report = grade(LAB, LAB.stub, tiny_loaded, quick=True)
    assert report.score == 0 and report.exit_code == 1
    assert all(r.status == FAIL for r in report.results if r.max_points)
    assert "not implemented yet (Lab 05: write" in report.result("property").detail
    assert "Traceback" not in report.to_json()


@pytest.mark.parametrize(
    "old, new, message, hint",
    [
        # the budget counts a chunk's tokens one short (a decode then costs nothing)
        ("                budget -= n\n", "                budget -= n - 1\n", "over the budget of", "a decode's 1 included"),
        # preemption picks the oldest running request
        ("victim = self.running.pop()", "victim = self.running.pop(0)", "but the newest running requests were", "preempt the newest"),
        # a preempted request keeps its num_computed_tokens
        ("        request.num_computed_tokens = 0\n", "", "still counts", "num_computed_tokens = 0"),
    ],
    ids=["budget-one-short", "preempts-the-oldest", "preempted-keeps-computed-tokens"],
)
def test_a_planted_scheduling_bug_fails_the_property_suite_with_the_shortest_arrival_sequence(tmp_path, tiny_loaded, old, new, message, hint):
    report = graded(tmp_path, tiny_loaded, mutate(reference(), old, new))
    assert report.failed[0] == "property", report.to_json()
    result = report.result("property")
    assert message in result.detail and "shortest failing arrival sequence: pool of" in result.detail
    assert "req-0 arrives (prompt" in result.detail and hint in result.hint


def test_a_check_invariants_that_checks_nothing_fails_only_the_invariants(tmp_path, tiny_loaded):
    source = mutate(reference(), "        live = self.running + list(self.waiting)\n", "        return\n")
    report = graded(tmp_path, tiny_loaded, source)
    assert report.failed == ["invariants"] and "accepted a running request whose blocks were freed" in report.result("invariants").detail


def test_admitting_in_a_step_that_preempted_keeps_the_tokens_but_fails_the_counters(tmp_path, tiny_loaded):
    """Admission after a preemption is not wrong for the outputs; it only thrashes the pool."""
    source = mutate(reference(), " and len(self.running) < self.max_num_seqs and not batch.preempted:\n            request", " and len(self.running) < self.max_num_seqs:\n            request")
    report = graded(tmp_path, tiny_loaded, source)
    assert report.failed == ["counters"], report.to_json()
    assert "(reference" in report.result("counters").detail


def test_extending_nanoserves_scheduler_is_not_graded_further(tmp_path, tiny_loaded):
    report = graded(tmp_path, tiny_loaded, "from nanoserve.scheduler import Scheduler\n")
    assert report.result("imports").status == FAIL and "nanoserve.scheduler" in report.result("imports").detail
    assert report.score == 0


def test_the_engine_refuses_a_scheduler_without_draft_support_when_speculating(tiny_loaded):
    with pytest.raises(ConfigError, match=r"does not schedule speculative drafts .* use --speculative none"):
        LLMEngine(loaded=tiny_loaded, scheduler=f"{LAB.stub}:Scheduler", speculative="ngram", num_blocks=16)
    LLMEngine(loaded=tiny_loaded, scheduler=f"{LAB.stub}:Scheduler", num_blocks=16)  # without speculation it builds
    assert LLMEngine(loaded=tiny_loaded, speculative="ngram", num_blocks=16).speculator is not None
