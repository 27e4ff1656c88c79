"""Lab 07 (speculative decoding): the reference scores full marks, the stub scores zero, and
planted bugs fail on the criterion they should; the two seams it grades through work.

The seams: ``EngineConfig.proposer = "FILE.py:NAME"`` (the ``proposer`` component) and
``EngineConfig.acceptance = "FILE.py"`` (the file's accept_greedy and accept_random,
handed to the RejectionSampler).
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

from nanoserve import components
from nanoserve.engine import LLMEngine
from nanoserve.errors import ComponentError, ConfigError
from nanoserve.labs.grader import FAIL, NOT_RUN, PASS
from nanoserve.labs.lab07 import LAB
from nanoserve.labs.registry import grade
from nanoserve.sampling import SamplingParams
from nanoserve.spec import acceptance_rules, ngram, rejection

HEADER = (
    "from __future__ import annotations\n\n"
    "from dataclasses import dataclass\n\n"
    "import numpy as np\n\n"
    "from nanoserve.request import Request\n"
    "from nanoserve.sampling import draw\n\n\n"
)


def reference() -> str:
    """nanoserve's own proposer and acceptance rules, as a student file (no import of nanoserve.spec)."""
    parts = (ngram.Draft, ngram.propose_ngram, ngram.NgramProposer, rejection.accept_greedy, rejection.accept_random)
    return HEADER + "\n\n".join(inspect.getsource(part) for part in parts)


def write(tmp_path, source: str, name: str = "student.py") -> str:
    path = tmp_path / name
    path.write_text(source)
    return str(path)


def mutate(old: str, new: str) -> str:
    source = reference()
    assert source.count(old) == 1, f"the planted bug's target {old!r} is not once in the reference"
    return source.replace(old, new)


def test_the_reference_adapted_to_the_stub_scores_full_marks(tmp_path, tiny_loaded):
    report = grade(LAB, write(tmp_path, reference()), tiny_loaded, quick=True)
    assert [r.status for r in report.results] == [PASS] * len(report.results), report.to_json()
    assert report.score == report.max_score == 100 and report.exit_code == 0
    assert "as the reference" in report.result("counters").detail
    assert "x the reference" in report.speed


def test_the_untouched_stub_scores_zero_with_the_labs_message(tiny_loaded):
    report = grade(LAB, LAB.stub, tiny_loaded, quick=True)
    assert report.score == 0 and report.exit_code == 1
    graded = [r for r in report.results if r.max_points]
    assert [r.status for r in graded] == [FAIL] * len(graded)
    for name in ("property", "statistical", "integration"):
        assert "not implemented yet (Lab 07: write" in report.result(name).detail
    assert "Traceback" not in report.to_json()


def test_accepting_with_q_over_p_fails_the_statistical_criterion(tmp_path, tiny_loaded):
    source = mutate("if generator.random() * q_x < p_x:", "if generator.random() * p_x < q_x:")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed == ["statistical"], report.to_json()
    assert "disjoint supports" in report.result("statistical").detail and "min(1, p(x) / q(x))" in report.result("statistical").hint


def test_resampling_a_rejected_one_hot_draft_from_p_fails_the_statistical_criterion(tmp_path, tiny_loaded):
    """The rejected token keeps its mass: on rejection the residual must be 0 there."""
    source = mutate("            residual[x] = 0.0\n", "")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed == ["statistical"], report.to_json()
    result = report.result("statistical")
    assert result.detail.startswith("one-hot q") and "chi-square" in result.detail and "max(0, p - q)" in result.hint


def test_resampling_from_p_instead_of_the_residual_fails_on_a_flatter_q(tmp_path, tiny_loaded):
    source = mutate("residual = np.maximum(p[j] - q[j], 0.0)", "residual = p[j].copy()")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert report.failed == ["statistical"] and report.result("statistical").detail.startswith("q flatter than p")


def test_a_proposer_that_matches_the_suffix_with_itself_fails_with_a_shrunk_counterexample(tmp_path, tiny_loaded):
    """The suffix's own position is the latest occurrence: it proposes what follows the end (nothing)."""
    source = mutate("sliding_window_view(arr[: length - 1], n)", "sliding_window_view(arr, n)")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert "property" in report.failed and "integration" in report.failed, report.to_json()
    result = report.result("property")
    assert "propose_ngram([0, 0], min_n=1, max_n=1, k=1) returned [], want [0]" in result.detail
    assert "shrunk counterexample" in result.detail and "earlier occurrence" in result.hint
    assert "no draft was verified" in report.result("integration").detail


def test_a_greedy_rule_that_forgets_the_bonus_token_fails_the_property_and_the_engine(tmp_path, tiny_loaded):
    source = mutate("    out.append(int(best[len(out)]))\n    return out\n", "    if len(out) < len(drafts):\n        out.append(int(best[len(out)]))\n    return out\n")
    report = grade(LAB, write(tmp_path, source), tiny_loaded, quick=True)
    assert "property" in report.failed and "integration" in report.failed
    assert "accept_greedy(" in report.result("property").detail and "shrunk counterexample" in report.result("property").detail


def test_importing_nanoserve_spec_is_not_graded_further(tmp_path, tiny_loaded):
    path = write(tmp_path, reference() + "\nfrom nanoserve.spec.rejection import accept_random  # noqa\n")
    report = grade(LAB, path, tiny_loaded, quick=True)
    assert report.result("imports").status == FAIL and "nanoserve.spec.rejection" in report.result("imports").detail
    assert all(r.status == NOT_RUN for r in report.results[2:])


# --- the seams the lab grades through ----------------------------------------------------------
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [10, 11, 12, 10, 11, 12, 10]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def generate(loaded, **kwargs) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(loaded=loaded, backend="ref", num_blocks=64, block_size=4, **kwargs)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return [final[i] for i in ids], engine


def test_the_proposer_and_acceptance_seams_take_a_file_and_default_to_nanoserves(tmp_path, tiny_loaded):
    path = write(tmp_path, reference() + "\nCALLS = []\n_accept = accept_greedy\n\n\ndef accept_greedy(target, drafts):\n    CALLS.append(len(drafts))\n    return _accept(target, drafts)\n")
    base, _ = generate(tiny_loaded)
    theirs, engine = generate(tiny_loaded, speculative="ngram", proposer=f"{path}:NgramProposer", acceptance=path)
    assert theirs == base and engine.stats().spec_decoding.num_draft_tokens > 0
    assert type(engine.speculator.proposer).__module__ == "nanoserve_proposer_student"
    assert engine.sampler.accept_greedy.__module__ == "nanoserve_acceptance_student"
    assert engine.sampler.accept_greedy.__globals__["CALLS"], "the file's accept_greedy was never called"
    assert engine.sampler.accept_random is not rejection.accept_random
    _, default = generate(tiny_loaded, speculative="ngram")
    assert isinstance(default.speculator.proposer, ngram.NgramProposer)
    assert default.sampler.accept_greedy is rejection.accept_greedy
    assert "ngram" in components.available_components("proposer") and "draft" in components.available_components("proposer")


def test_an_acceptance_rule_breaking_its_contract_fails_the_request_with_a_clear_error(tmp_path, tiny_loaded):
    path = write(tmp_path, reference() + "\n\ndef accept_greedy(target, drafts):\n    return list(drafts) + [0, 0]\n")
    engine = LLMEngine(loaded=tiny_loaded, backend="ref", num_blocks=64, block_size=4, speculative="ngram", acceptance=path)
    engine.add_request(PROMPTS[0], GREEDY)
    errors = []
    while engine.has_unfinished_requests():
        errors += [o.error for o in engine.step() if o.finish_reason == "error"]
    assert errors and "want the accepted drafts, then one more token" in errors[0]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"proposer": "draft"}, ConfigError, "proposer 'draft' is another --speculative method"),
        ({"proposer": "missing.py:NgramProposer"}, ComponentError, "proposer file 'missing.py' does not exist"),
        ({"acceptance": "missing.py"}, ComponentError, "acceptance 'missing.py': no such Python file"),
        ({"acceptance": "json"}, ComponentError, "acceptance 'json' defines no function accept_greedy, accept_random"),
    ],
)
def test_bad_proposer_or_acceptance_settings_are_refused_by_name(tiny_loaded, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        LLMEngine(loaded=tiny_loaded, backend="ref", num_blocks=64, block_size=4, speculative="ngram", **kwargs)


def test_acceptance_rules_default_to_the_rejection_module():
    assert acceptance_rules("default") == (rejection.accept_greedy, rejection.accept_random)
    target = np.eye(5)[[1, 2, 3, 4]]
    assert rejection.RejectionSampler.__init__.__defaults__ == (rejection.accept_greedy, rejection.accept_random)
    assert rejection.accept_greedy(target, [1, 2, 3]) == [1, 2, 3, 4]
