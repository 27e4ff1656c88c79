"""Teaching labs: the reference scores full marks, the stub scores zero, planted bugs fail
on the criterion they should, and the ``lab`` commands refuse bad folders and paths."""

from __future__ import annotations

import inspect
import json
import os

import pytest

import kernels_ref
from kernels_ref.rope import rotation_tables
from nanoserve.cache import block_pool
from nanoserve.cli import main
from nanoserve.labs import LABS, get_lab, grade
from nanoserve.labs.grader import FAIL, NOT_RUN, PASS

REF_KERNELS = [kernels_ref.rms_norm, rotation_tables, kernels_ref.rope, kernels_ref.silu_mul, kernels_ref.softmax]


def lab01_reference() -> str:
    """The reference kernels' own source, as a student file (no import of kernels_ref)."""
    return "import numpy as np\n\n\n" + "\n\n".join(inspect.getsource(fn) for fn in REF_KERNELS)


def lab04_reference() -> str:
    """nanoserve's BlockPool's own source, as a student file."""
    header = (
        "from collections import OrderedDict\n"
        "from nanoserve.cache.block_pool import NoFreeBlocksError\n"
        "from nanoserve.errors import NanoserveError\n"
        "from nanoserve.interfaces import Evictor\n\n\n"
    )
    return header + inspect.getsource(block_pool.BlockPool)


def write(tmp_path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(source)
    return str(path)


def mutate(source: str, old: str, new: str) -> str:
    assert old in source, f"the planted bug's target {old!r} is not in the reference"
    return source.replace(old, new, 1)


@pytest.mark.parametrize("number, source", [("01", lab01_reference), ("04", lab04_reference)])
def test_the_reference_adapted_to_the_stub_scores_full_marks(tmp_path, tiny_loaded, number, source):
    report = grade(number, write(tmp_path, "student.py", source()), tiny_loaded, quick=True)
    assert [r.status for r in report.results] == [PASS] * len(report.results), report.to_json()
    assert report.score == report.max_score == 100 and report.exit_code == 0
    assert "x ref" in report.speed or "x the reference" in report.speed


@pytest.mark.parametrize("number", sorted(LABS))
def test_the_untouched_stub_scores_zero_with_the_labs_message(tiny_loaded, number):
    report = grade(number, get_lab(number).stub, tiny_loaded, quick=True)
    assert report.score == 0 and report.exit_code == 1
    graded = [r for r in report.results if r.max_points]
    assert all(r.status == FAIL for r in graded)
    assert f"not implemented yet (Lab {number}: write" in report.result("property").detail
    assert "Traceback" not in report.to_json()


def test_lab01_an_off_by_one_in_rms_norms_mean_fails_the_property_suite_with_its_example(tmp_path, tiny_loaded):
    source = mutate(lab01_reference(), "np.mean(x * x, axis=-1, keepdims=True)", "np.sum(x * x, axis=-1, keepdims=True) / (x.shape[-1] - 1)")
    report = grade("01", write(tmp_path, "student.py", source), tiny_loaded, quick=True)
    assert report.failed[0] == "property" and report.exit_code == 1
    result = report.result("property")
    assert result.detail.startswith("rms_norm FAILED") and "minimal failing example" in result.detail
    assert "d - 1" in result.hint


def test_lab01_softmax_without_the_max_shift_fails_on_large_logits(tmp_path, tiny_loaded):
    source = mutate(lab01_reference(), "shifted = x - np.max(x, axis=axis, keepdims=True)", "shifted = x")
    report = grade("01", write(tmp_path, "student.py", source), tiny_loaded, quick=True)
    assert "property" in report.failed and report.result("property").detail.startswith("softmax FAILED")


def test_lab04_a_missing_refcount_decrement_fails_the_model_check_with_the_shortest_sequence(tmp_path, tiny_loaded):
    source = mutate(lab04_reference(), "            self.refcount[block] -= 1\n", "")
    report = grade("04", write(tmp_path, "student.py", source), tiny_loaded, quick=True)
    assert report.failed[0] == "property"
    result = report.result("property")
    assert "the model says" in result.detail and "shortest failing sequence: pool = BlockPool(" in result.detail
    assert "pool.free([" in result.detail and "refcount reaches 0" in result.hint


def test_lab04_freeing_a_shared_block_at_once_fails_the_model_check(tmp_path, tiny_loaded):
    source = mutate(lab04_reference(), "            self.refcount[block] -= 1\n", "            self.refcount[block] = 0\n")
    report = grade("04", write(tmp_path, "student.py", source), tiny_loaded, quick=True)
    assert report.failed[0] == "property" and "pool.share(" in report.result("property").detail


def test_lab04_a_check_invariants_that_checks_nothing_fails_the_invariants_criterion(tmp_path, tiny_loaded):
    source = mutate(lab04_reference(), '        """Assert the pool\'s invariants;', '        return\n        """Assert the pool\'s invariants;')
    report = grade("04", write(tmp_path, "student.py", source), tiny_loaded, quick=True)
    assert report.failed == ["invariants"] and "accepted holders" in report.result("invariants").detail


def test_lab04_a_pool_that_hides_a_free_block_fails_the_counters(tmp_path, tiny_loaded):
    """num_allocatable one short: outputs stay right, but the scheduler preempts more."""
    source = mutate(lab04_reference(), "return len(self.free_blocks) + (self.evictor", "return len(self.free_blocks) - 1 + (self.evictor")
    report = grade("04", write(tmp_path, "student.py", source), tiny_loaded, quick=True)
    assert "counters" in report.failed and "(reference" in report.result("counters").detail


def test_a_file_importing_the_piece_it_replaces_is_not_graded_further(tmp_path, tiny_loaded):
    path = write(tmp_path, "student.py", "from kernels_ref import rms_norm, rope, silu_mul, softmax\n")
    report = grade("01", path, tiny_loaded, quick=True)
    assert report.result("imports").status == FAIL and "kernels_ref" in report.result("imports").detail
    assert all(r.status == NOT_RUN for r in report.results[2:]) and report.score == 0
    path = write(tmp_path, "pool.py", "from nanoserve.cache.block_pool import BlockPool\n")
    assert grade("04", path, tiny_loaded, quick=True).result("imports").status == FAIL


def test_a_wrong_signature_fails_the_first_gate_and_names_the_parameter(tmp_path, tiny_loaded):
    source = mutate(lab01_reference(), "def softmax(x: np.ndarray, axis: int = -1)", "def softmax(x: np.ndarray)")
    report = grade("01", write(tmp_path, "student.py", source), tiny_loaded, quick=True)
    assert report.failed[0] == "signatures" and "softmax(x) should take (x, axis)" in report.result("signatures").detail


def test_lab_list_start_and_check_from_the_command_line(tmp_path, tiny_model_dir, capsys):
    assert main(["lab", "list"]) == 0
    assert "04  block_pool" in capsys.readouterr().out
    folder = str(tmp_path / "mine")
    assert main(["lab", "start", "4", folder]) == 0
    assert sorted(os.listdir(folder)) == ["README.md", "student.py"]
    capsys.readouterr()
    assert main(["lab", "check", "04", os.path.join(folder, "student.py"), "--json", "--quick", "--model", tiny_model_dir]) == 1
    body = json.loads(capsys.readouterr().out)
    assert body["score"] == 0 and body["status"] == FAIL and body["criteria"][0]["name"] == "signatures"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["lab", "start", "04", "{existing}"], "already exists; pick a new folder"),
        (["lab", "check", "04", "{notes}"], "not a Python file"),
        (["lab", "check", "04", "{missing}"], "no such file"),
        (["lab", "check", "42", "{notes}"], "no lab '42'; the labs are 01, "),
    ],
)
def test_lab_commands_refuse_bad_folders_and_paths_in_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "notes.txt").write_text("not code")
    paths = {"existing": str(tmp_path), "notes": str(tmp_path / "notes.txt"), "missing": str(tmp_path / "nope.py")}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err


@pytest.mark.real_model
@pytest.mark.slow
def test_lab04_the_reference_pool_serves_smollm2_with_the_reference_engines_tokens(tmp_path, smollm2_loaded):
    """What ``lab check 04`` does by default: the integration runs on SmolLM2, not the tiny model."""
    report = grade("04", write(tmp_path, "student.py", lab04_reference()), smollm2_loaded, quick=True)
    assert report.result("integration").status == PASS and report.result("counters").status == PASS, report.to_json()
    assert "greedy tokens equal the reference engine's" in report.result("integration").detail


def test_docs_labs_lists_every_lab_with_its_criteria_and_points():
    """docs/labs.md's per-lab tables say what the graders really check."""
    docs = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "labs.md"), encoding="utf-8").read()
    for number, lab in LABS.items():
        assert f"`labs/{number}_{lab.name}`" in docs, f"the course map lacks lab {number}"
        section = docs.split(f"### Lab {number}: ")[1].split("\n### ")[0]
        for c in lab.criteria:
            assert f"| {c.name} | {c.description} | {'gate' if c.gate else c.points} |" in section, (number, c.name)
