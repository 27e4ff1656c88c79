"""The offline ``LLM`` API: threads, failures part-way, and clear errors for bad prompts."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from nanoserve.errors import InvalidSamplingParams, RequestError
from nanoserve.llm import LLM
from nanoserve.sampling import SamplingParams
from tests.test_engine import make_engine

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def idle(llm: LLM) -> None:
    llm.engine.check_invariants()
    stats = llm.engine.stats()
    assert (stats.running, stats.waiting, stats.num_used_blocks) == ((), (), 0), "the engine is not idle"


def test_generate_from_two_threads_on_one_llm_gives_each_its_own_correct_outputs(tiny_loaded):
    llm = LLM(engine=make_engine(tiny_loaded))
    prompts = {"a": [[5, 6, 7, 8]] * 3, "b": [[40, 41, 42]] * 3}
    expected = {k: [o.token_ids for o in llm.generate(p, GREEDY, use_tqdm=False)] for k, p in prompts.items()}
    got: dict[str, list] = {}
    errors: list[BaseException] = []

    def run(key: str) -> None:
        try:
            for _ in range(3):
                got.setdefault(key, []).append([o.token_ids for o in llm.generate(prompts[key], GREEDY, use_tqdm=False)])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in prompts]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for key in prompts:
        assert got[key] == [expected[key]] * 3
    idle(llm)


def test_a_generate_that_fails_part_way_leaves_nothing_queued(tiny_loaded):
    llm = LLM(engine=make_engine(tiny_loaded))
    with pytest.raises(RequestError, match="prompt must be a string or a list of token ids"):
        llm.generate([[5, 6, 7], 5], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.engine.check_invariants()
    out = llm.generate([[9, 10, 11]], GREEDY, use_tqdm=False)
    assert len(out) == 1 and len(out[0].token_ids) == 8
    while llm.engine.has_unfinished_requests():  # the aborted request's final output, if still pending
        llm.engine.step()
    idle(llm)


def test_generate_counts_only_the_outputs_of_its_own_requests(tiny_loaded):
    llm = LLM(engine=make_engine(tiny_loaded))
    other = llm.engine.add_request([3, 4], SamplingParams(temperature=0, max_tokens=1))  # someone else's
    outs = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert [o.request_id for o in outs] != [other] and len(outs[0].token_ids) == 20


@pytest.mark.parametrize("prompts", [None, 5, {"a": 1}, np.array([5, 6, 7])])
def test_generate_refuses_what_is_not_a_prompt_with_a_request_error(tiny_loaded, prompts):
    llm = LLM(engine=make_engine(tiny_loaded))
    with pytest.raises(RequestError, match="prompts must be a string, a list of token ids"):
        llm.generate(prompts, use_tqdm=False)
    idle(llm)


def test_sampling_params_type_check_booleans_and_are_checked_again_when_added(tiny_loaded):
    with pytest.raises(InvalidSamplingParams, match="invalid ignore_eos='no': must be true or false"):
        SamplingParams(ignore_eos="no")
    engine = make_engine(tiny_loaded)
    params = SamplingParams(temperature=0.5)
    params.temperature = math.nan  # changed after construction
    with pytest.raises(InvalidSamplingParams, match="invalid temperature=nan"):
        engine.add_request([5, 6], params)
    engine.check_invariants()


def test_max_tokens_past_the_context_is_an_error_that_names_the_limit(tiny_loaded):
    engine = make_engine(tiny_loaded, max_model_len=64)
    with pytest.raises(RequestError, match=r"maximum context length is 64 tokens; you requested 110 \(10 in the prompt, 100 max_tokens\)"):
        engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=100))
    rid = engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=54, ignore_eos=True))  # exactly fits
    engine.check_invariants()
    from tests.test_engine import run_to_completion

    assert len(run_to_completion(engine)[rid].token_ids) == 54
