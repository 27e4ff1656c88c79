"""The serving engine: continuous batching, chunked prefill, preemption, invariants, bad input.

Most tests use the tiny random model (fast); greedy equality is exact because every
request's math is the same whatever else shares its batch.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanoserve.cache.block_pool import BlockPool
from nanoserve.cache.contiguous import ContiguousKVCache
from nanoserve.cache.kv_cache_manager import KVCacheManager
from nanoserve.cache.paged import PagedKVCache
from nanoserve.engine import LLMEngine
from nanoserve.errors import CapacityError, InvalidSamplingParams, PromptTooLongError, RequestError
from nanoserve.interfaces import ScheduledBatch
from nanoserve.kernels import get_backend
from nanoserve.model import LlamaModel
from nanoserve.model_runner import ModelRunner
from nanoserve.request import Request
from nanoserve.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_engine(loaded, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_blocks", 128)
    kwargs.setdefault("block_size", 4)
    return LLMEngine(loaded=loaded, **kwargs)


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, object]:
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                assert out.request_id not in final, "a request finished twice"
                final[out.request_id] = out
        engine.check_invariants()
    assert not engine.has_unfinished_requests(), "the engine did not drain"
    idle = engine.stats()
    assert idle.num_used_blocks == 0 and not idle.block_tables, "idle: every block free or evictable, none protected"
    return final


def random_prompt(rng: np.random.Generator, vocab: int, length: int) -> list[int]:
    return [int(t) for t in rng.integers(3, vocab, size=length)]


def generate_alone(loaded, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = make_engine(loaded)
    rid = engine.add_request(prompt, params)
    return run_to_completion(engine)[rid].token_ids


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 10), st.integers(0, 6)), min_size=1, max_size=6),
    budget=st.sampled_from([3, 8, 64]),
)
def test_batched_greedy_outputs_equal_each_request_run_alone(tiny_loaded, lengths, budget):
    """Random prompt/output lengths and arrival steps; the batch must not change any output."""
    rng = np.random.default_rng(len(lengths) * 100 + budget)
    vocab = tiny_loaded.config.vocab_size
    work = [(random_prompt(rng, vocab, p), SamplingParams(temperature=0, max_tokens=o, ignore_eos=True), arrive) for p, o, arrive in lengths]
    engine = make_engine(tiny_loaded, max_num_batched_tokens=budget, max_num_seqs=4)
    ids: dict[int, str] = {}
    final: dict[str, object] = {}
    step = 0
    while len(final) < len(work):
        for i, (prompt, params, arrive) in enumerate(work):
            if arrive == step:
                ids[i] = engine.add_request(prompt, params)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        engine.check_invariants()
        step += 1
        assert step < 2000
    for i, (prompt, params, _) in enumerate(work):
        assert final[ids[i]].token_ids == generate_alone(tiny_loaded, prompt, params)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 16])
def test_chunked_prefill_gives_the_same_logits_as_one_shot_prefill(tiny_loaded, chunk):
    config = tiny_loaded.config
    backend = get_backend("ref")
    model = LlamaModel(config, tiny_loaded.weights, backend)
    prompt = random_prompt(np.random.default_rng(chunk), config.vocab_size, 23)

    one_shot = ContiguousKVCache(config, 64, backend)
    positions = np.arange(len(prompt))
    one_shot.set_positions(positions)
    expected = model.compute_logits(model.forward(np.asarray(prompt), positions, one_shot)[-1:])

    kv = KVCacheManager(BlockPool(32), block_size=4)
    cache = PagedKVCache(config, 32, 4, backend)
    kv.allocator.allocate(5)  # occupy some blocks so the request's pages are not 0, 1, 2...
    runner = ModelRunner(model, cache, kv)
    request = Request("r", prompt, GREEDY, 12, np.random.default_rng(0))
    logits = None
    while request.num_computed_tokens < len(prompt):
        n = min(chunk, len(prompt) - request.num_computed_tokens)
        assert kv.allocate_slots(request, n)
        last = request.num_computed_tokens + n == len(prompt)
        logits = runner.execute(ScheduledBatch([request], [n], [int(last)]))
        assert len(logits) == int(last)
        request.num_computed_tokens += n
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_preempted_requests_produce_the_same_text_as_unpreempted_ones(tiny_loaded):
    rng = np.random.default_rng(7)
    prompts = [random_prompt(rng, tiny_loaded.config.vocab_size, n) for n in (17, 9, 21, 13, 5)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    roomy = make_engine(tiny_loaded, num_blocks=200)
    ids = [roomy.add_request(p, params) for p in prompts]
    expected = run_to_completion(roomy)

    tight = make_engine(tiny_loaded, num_blocks=14, block_size=4)  # 56 slots for ~180 tokens of demand
    tight_ids = [tight.add_request(p, params) for p in prompts]
    got = run_to_completion(tight)
    assert tight.stats().num_preemptions > 0, "the pool was meant to force preemption"
    assert any(o.num_preemptions for o in got.values())
    for a, b in zip(ids, tight_ids):
        assert got[b].token_ids == expected[a].token_ids
        assert got[b].text == expected[a].text
    assert tight.stats().num_free_blocks == tight.stats().num_blocks


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(tiny_loaded):
    rng = np.random.default_rng(3)
    prompt = random_prompt(rng, tiny_loaded.config.vocab_size, 10)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=15, ignore_eos=True)
    alone = generate_alone(tiny_loaded, prompt, params)
    engine = make_engine(tiny_loaded)
    others = [engine.add_request(random_prompt(rng, tiny_loaded.config.vocab_size, 6), SamplingParams(temperature=1.0, max_tokens=9)) for _ in range(3)]
    rid = engine.add_request(prompt, params)
    final = run_to_completion(engine)
    assert final[rid].token_ids == alone
    assert len(final) == len(others) + 1


def test_stop_strings_are_never_streamed_and_deltas_add_up_to_the_text(tiny_loaded):
    prompt = random_prompt(np.random.default_rng(11), tiny_loaded.config.vocab_size, 8)
    free_run = generate_alone(tiny_loaded, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    full_text = tiny_loaded.tokenizer.decode(free_run)
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    assert len(stop) == 3
    engine = make_engine(tiny_loaded)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))
    deltas = []
    final = None
    while final is None:
        for out in engine.step():
            deltas.append(out.delta)
            if out.finished:
                final = out
    assert final.request_id == rid and final.finish_reason == "stop"
    assert final.text == full_text[: full_text.index(stop)]
    assert "".join(deltas) == final.text


def test_stop_token_and_max_tokens_end_requests_with_the_right_reason(tiny_loaded):
    engine = make_engine(tiny_loaded)
    prompt = random_prompt(np.random.default_rng(5), tiny_loaded.config.vocab_size, 6)
    first = generate_alone(tiny_loaded, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    k = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # a token's first appearance
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[first[k]]))
    rid2 = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    final = run_to_completion(engine)
    assert final[rid].finish_reason == "stop" and final[rid].token_ids == first[: k + 1]
    assert final[rid2].finish_reason == "length" and final[rid2].token_ids == first


@pytest.mark.parametrize(
    "prompt, params, error",
    [
        ("", None, RequestError),
        ([], None, RequestError),
        ([10**9], None, RequestError),
        ("hello " * 400, None, PromptTooLongError),
        ("hi", {"max_tokens": 0}, InvalidSamplingParams),
        ("hi", {"temperature": -0.5}, InvalidSamplingParams),
        ("hi", {"top_p": 0.0}, InvalidSamplingParams),
        ("hi", {"top_p": 1.5}, InvalidSamplingParams),
    ],
)
def test_bad_requests_get_a_clear_error_and_the_engine_keeps_serving(tiny_loaded, prompt, params, error):
    engine = make_engine(tiny_loaded)
    good = engine.add_request([5, 6, 7], GREEDY)
    with pytest.raises(error) as info:
        engine.add_request(prompt, SamplingParams(**params) if params else None)
    assert str(info.value)
    engine.check_invariants()
    final = run_to_completion(engine)
    assert final[good].finish_reason == "length" and len(final[good].token_ids) == 12


def test_a_request_that_could_never_fit_the_pool_is_refused_at_admission(tiny_loaded):
    engine = make_engine(tiny_loaded, num_blocks=4, block_size=4)
    with pytest.raises(CapacityError, match="KV pool"):
        engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=10))
    engine.check_invariants()


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_recovers(tiny_loaded, monkeypatch):
    engine = make_engine(tiny_loaded)
    rid = engine.add_request([5, 6, 7, 8], GREEDY)
    original = engine.runner.execute

    def broken(batch):
        raise FloatingPointError("injected failure")

    monkeypatch.setattr(engine.runner, "execute", broken)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "error")]
    assert "injected failure" in outs[0].error
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    monkeypatch.setattr(engine.runner, "execute", original)
    rid2 = engine.add_request([5, 6, 7, 8], GREEDY)
    assert run_to_completion(engine)[rid2].finish_reason == "length"


def test_abort_frees_blocks_at_once_and_reports_the_request_once(tiny_loaded):
    engine = make_engine(tiny_loaded)
    rid = engine.add_request(list(range(3, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.stats().num_used_blocks > 0
    assert engine.abort(rid)
    assert engine.stats().num_used_blocks == 0
    assert not engine.abort(rid)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "abort")]


def test_long_prompts_are_chunked_and_share_steps_with_decodes(tiny_loaded):
    engine = make_engine(tiny_loaded, max_num_batched_tokens=8)
    short = engine.add_request([5, 6], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()  # short's prefill
    long_ = engine.add_request(list(range(3, 40)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.step()
    stats = engine.step_stats[-1]
    assert stats.batch_size == 2 and stats.num_tokens == 8  # 1 decode + a 7-token chunk
    final = run_to_completion(engine)
    assert {short, long_} == set(final)
    assert all(s.num_tokens <= 8 for s in engine.step_stats)


class EngineMachine(RuleBasedStateMachine):
    """Random add / step / abort sequences; invariants after every rule; everything finishes."""

    loaded = None  # set by the test below
    engine_kwargs: dict = {}  # e.g. another implementation of a seam (tests/test_engine_seams.py)

    def __init__(self) -> None:
        super().__init__()
        self.engine = make_engine(
            self.loaded, num_blocks=12, block_size=4, max_num_batched_tokens=10, max_num_seqs=3, **self.engine_kwargs
        )
        self.live: list[str] = []
        self.added: set[str] = set()
        self.finished: dict[str, str] = {}
        self.aborted: set[str] = set()

    @rule(prompt_len=st.integers(1, 20), max_tokens=st.integers(1, 12), temperature=st.sampled_from([0.0, 1.0]))
    def add(self, prompt_len, max_tokens, temperature):
        prompt = list(range(3, 3 + prompt_len))
        try:
            rid = self.engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=prompt_len))
        except CapacityError:
            assert prompt_len + max_tokens > 12 * 4
            return
        self.live.append(rid)
        self.added.add(rid)

    @rule()
    def step(self):
        self._consume(self.engine.step())
        stats = self.engine.step_stats[-1] if self.engine.step_stats else None
        if stats is not None:
            assert stats.num_tokens <= 10 and stats.batch_size <= 3

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def abort(self, index):
        rid = self.live.pop(index % len(self.live))
        assert self.engine.abort(rid)
        self.aborted.add(rid)

    def _consume(self, outputs):
        for out in outputs:
            if out.finished:
                assert out.request_id not in self.finished
                self.finished[out.request_id] = out.finish_reason
                if out.request_id in self.aborted:
                    assert out.finish_reason == "abort"
                else:
                    self.live.remove(out.request_id)

    @invariant()
    def pool_and_tables_are_consistent(self):
        self.engine.check_invariants()

    def teardown(self):
        for _ in range(1000):
            if not self.engine.has_unfinished_requests():
                break
            self._consume(self.engine.step())
            self.engine.check_invariants()
        assert set(self.finished) == self.added, "every accepted request finishes exactly once"
        assert self.engine.stats().num_free_blocks == self.engine.stats().num_blocks


def test_engine_state_machine(tiny_loaded):
    EngineMachine.loaded = tiny_loaded
    machine = EngineMachine.TestCase
    machine.settings = settings(max_examples=15, stateful_step_count=30, deadline=None, derandomize=True)
    machine().runTest()


@pytest.mark.real_model
def test_real_model_batch_equals_each_prompt_alone(smollm2_loaded):
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time", "Water boils at"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine = LLMEngine(loaded=smollm2_loaded, num_blocks=64, max_num_batched_tokens=16)
    ids = [engine.add_request(p, params) for p in prompts]
    batched = run_to_completion(engine)
    for rid, prompt in zip(ids, prompts):
        alone = LLMEngine(loaded=smollm2_loaded, num_blocks=16)
        one = alone.add_request(prompt, params)
        assert run_to_completion(alone)[one].token_ids == batched[rid].token_ids


def test_building_an_engine_applies_the_thread_policy(tiny_loaded):
    """An engine used without LLM or the CLI (the benches, notebooks) still gets the policy's BLAS threads."""
    from threadpoolctl import threadpool_info

    from nanoserve import threads

    try:
        engine = LLMEngine(backend="ref", threads=1, loaded=tiny_loaded)
        assert engine.threads == threads.describe()
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
    finally:
        threads.apply(None)
