"""Speculative decoding is lossless: the same tokens as plain decoding, greedy or seeded-random
in distribution, with the K/V of rejected drafts rolled back (nanoserve.spec)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels_ref
from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.errors import ConfigError
from nanoserve.labs.lab07 import chi2_sf  # the survival function lab 07's grader uses too
from nanoserve.llm import LLM
from nanoserve.request import Request
from nanoserve.sampling import SamplingParams, probabilities
from nanoserve.spec.ngram import propose_ngram
from nanoserve.spec.policy import SpeculationPolicy, best_num_drafts
from nanoserve.spec.rejection import accept_greedy, accept_random
from tests.tiny_model import make_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
# prompts that repeat themselves, so that n-gram lookup finds something to propose
PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7],
    [10, 11, 12, 10, 11, 12, 10],
    [3, 4, 5, 6, 7, 8, 9],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 20, 21, 22, 23],
]


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Another tiny model with the same tokenizer and other weights: a draft that is often wrong."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-draft")), seed=1)


def engine(loaded, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(backend="ref", **kwargs), loaded=loaded)


def generate(eng: LLMEngine, prompts, params) -> list[list[int]]:
    outs = LLM(engine=eng).generate(prompts, params, use_tqdm=False)
    eng.check_invariants()
    assert eng.stats().num_used_blocks == 0
    return [o.token_ids for o in outs]


# --- the n-gram proposer ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "tokens, min_n, max_n, k, expected",
    [
        ([1, 2, 3, 4, 2, 3], 2, 3, 4, [4, 2, 3]),  # the suffix 2 3 occurred at 1..2
        ([1, 2, 3, 4, 2, 3], 2, 3, 1, [4]),  # at most k
        ([1, 2, 3, 4], 1, 3, 4, []),  # nothing repeats
        ([1, 2, 3, 9, 2, 3, 7, 2, 3], 2, 2, 2, [7, 2]),  # the latest occurrence wins
        ([1, 2, 3, 5, 9, 3, 6, 1, 2, 3], 1, 3, 2, [5, 9]),  # the longest suffix wins (1 2 3, not 3)
        ([4, 4, 4], 1, 2, 3, [4]),  # an occurrence overlapping the suffix
        ([7, 8], 2, 3, 4, []),  # shorter than min_n + 1
    ],
)
def test_ngram_golden_cases(tokens, min_n, max_n, k, expected):
    assert propose_ngram(tokens, min_n, max_n, k) == expected


def _request(prompt: list[int], max_tokens: int, outputs: list[int] = ()) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    r = Request("r", list(prompt), params, max_tokens, params.make_generator())
    r.output_token_ids = list(outputs)
    return r


def test_policy_caps_drafts_at_max_tokens_and_the_context():
    policy = SpeculationPolicy(num_speculative_tokens=8)
    # 3 outputs of max_tokens 6: this step commits one token, so at most 2 drafts
    assert policy.num_drafts([_request([1, 2, 3], 6, [4, 5, 6])], max_model_len=100) == [2]
    # 10 known tokens of a 13-token context: the drafts and the committed token need 3 positions
    assert policy.num_drafts([_request(list(range(7)), 50, [1, 2, 3])], max_model_len=13) == [2]
    assert policy.num_drafts([_request(list(range(7)), 50, [1, 2, 3, 4, 5])], max_model_len=13) == [0]


def test_policy_turns_down_with_low_acceptance_and_off_for_large_batches():
    policy = SpeculationPolicy(num_speculative_tokens=4, max_rows=32)  # a draft row costs 0.2 of a step
    r = _request([1, 2, 3], 100)
    assert policy.num_drafts([r], 1000) == [4]  # a new request: all k
    for _ in range(4):
        policy.observe(r, 4, 0)  # nothing accepted: estimated acceptance 0.7^4 = 0.24 ..
    assert policy.num_drafts([r], 1000) == [1]  # .. worth one draft (1.24 / 1.2 > 1), not two
    policy.observe(r, 1, 0)  # 0.17: below the cost of a draft
    counts = [policy.num_drafts([r], 1000)[0] for _ in range(16)]
    assert counts.count(1) == 2 and counts.count(0) == 14  # off, but probing every 8th step
    for _ in range(20):
        policy.observe(r, 4, 2)  # two of four accepted: 2 acceptances in 3 tries, a = 2/3
    assert policy.num_drafts([r], 1000) == [2]  # E(j) / r(j): 1.39 1.51 1.50 1.45
    for _ in range(20):
        policy.observe(r, 4, 4)
    assert policy.num_drafts([r], 1000) == [4]
    many = [_request([1, 2, 3], 100) for _ in range(10)]
    for i, m in enumerate(many):
        m.request_id = f"m{i}"
    assert policy.num_drafts(many, 1000) == [4, 4, 4, 4, 4, 2, 0, 0, 0, 0]  # 32 rows at most
    assert policy.num_drafts(many * 4, 1000) == [0] * 40
    default = SpeculationPolicy(num_speculative_tokens=4)  # 8 rows at most
    assert default.num_drafts(many[:1], 1000) == [4]
    assert default.num_drafts(many[:2], 1000) == [4, 2]
    assert default.num_drafts(many[:8], 1000) == [0] * 8


def test_policy_weighs_the_cost_of_a_draft():
    r = _request([1, 2, 3], 100)
    free, dear = SpeculationPolicy(4, draft_cost=0.0), SpeculationPolicy(4, draft_cost=1.0)
    for policy in (free, dear):
        for _ in range(10):
            policy.observe(r, 4, 0)
    assert free.num_drafts([r], 1000) == [4]  # a draft that costs nothing is worth proposing
    assert dear.num_drafts([r], 1000) == [0]  # one that costs a whole step never pays


def _tokens_per_step(a: float, c: float, j: int) -> float:
    return sum(a**i for i in range(j + 1)) / (1 + c * j)


@settings(max_examples=300, deadline=None)
@given(a=st.floats(0, 1), b=st.floats(0, 1), c=st.floats(0, 2), k=st.integers(1, 12))
def test_best_num_drafts_is_the_best_rate_and_grows_with_acceptance(a, b, c, k):
    j = best_num_drafts(a, c, k)
    rates = [_tokens_per_step(a, c, i) for i in range(k + 1)]
    assert rates[j] >= max(rates) - 1e-9  # the most tokens per step's worth of time
    if a <= c:
        assert j == 0  # no draft can pay for itself: (1 + a) / (1 + c) <= 1
    elif a > c + 1e-9:
        assert j >= 1  # one draft pays when a > c (a clear margin above it: rounding)
    lo, hi = min(a, b), max(a, b)
    assert best_num_drafts(lo, c, k) <= best_num_drafts(hi, c, k)  # more acceptance, never fewer drafts


# --- greedy: identical tokens ----------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_is_identical_with_speculation(tiny_loaded, tiny_model_dir, draft_dir, method, k):
    base = generate(engine(tiny_loaded), PROMPTS, GREEDY)
    eng = engine(tiny_loaded, speculative=method, num_speculative_tokens=k, draft_model=draft_dir, draft_weights="fp32")
    assert generate(eng, PROMPTS, GREEDY) == base
    spec = eng.stats().spec_decoding
    assert spec.num_draft_tokens > 0, "nothing was speculated: the test proves nothing"
    assert 0 <= spec.num_accepted_tokens <= spec.num_draft_tokens
    assert sum(spec.num_accepted_tokens_per_pos) == spec.num_accepted_tokens


def test_greedy_is_identical_with_a_perfect_draft_and_all_counts_add_up(tiny_loaded, tiny_model_dir):
    """The target drafting for itself: every draft is accepted, each step commits k + 1 tokens."""
    plain = engine(tiny_loaded)
    base = generate(plain, PROMPTS, GREEDY)
    eng = engine(tiny_loaded, speculative="draft", num_speculative_tokens=4, draft_model=tiny_model_dir, draft_weights="fp32")
    outs = LLM(engine=eng).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == base
    spec = eng.stats().spec_decoding
    assert spec.num_accepted_tokens == spec.num_draft_tokens > 0
    assert sum(o.num_draft_tokens for o in outs) == spec.num_draft_tokens
    assert sum(o.num_accepted_tokens for o in outs) == spec.num_accepted_tokens
    steps = list(eng.step_stats)
    assert sum(s.spec_draft_tokens for s in steps) == spec.num_draft_tokens
    assert max(n for s in steps for _, n in s.scheduled) > 1
    assert eng.stats().num_steps < 0.75 * plain.stats().num_steps  # several tokens per step


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_identical_with_chunked_prefill_preemption_and_mixed_batches(tiny_loaded, draft_dir, method):
    """A small pool (forced preemption), a small budget (chunks share steps with verifications)
    and requests arriving while others speculate."""
    prompts = PROMPTS + [list(range(30, 60)), [1, 2, 1, 2, 1, 2, 1]]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (40, 33, 25, 40, 20, 37)]
    kwargs = {"num_blocks": 20, "block_size": 4, "max_num_batched_tokens": 12}
    base = generate(engine(tiny_loaded, **kwargs), prompts, params)
    eng = engine(tiny_loaded, speculative=method, num_speculative_tokens=4, draft_model=draft_dir, draft_weights="fp32", **kwargs)
    assert generate(eng, prompts, params) == base
    assert eng.stats().num_preemptions > 0, "no preemption happened: shrink the pool"
    assert eng.stats().spec_decoding.num_draft_tokens > 0


def test_stop_token_stop_string_and_max_tokens_inside_a_draft(tiny_loaded, tiny_model_dir):
    plain = generate(engine(tiny_loaded), PROMPTS, GREEDY)
    eng_kwargs = {"speculative": "draft", "num_speculative_tokens": 8, "draft_model": tiny_model_dir, "draft_weights": "fp32"}
    for prompt, out in zip(PROMPTS, plain):
        stop_tok = out[13]
        first = out.index(stop_tok)
        p = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_tok], ignore_eos=True)
        got = generate(engine(tiny_loaded, **eng_kwargs), [prompt], p)[0]
        assert got == out[: first + 1]
        p = SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)  # mid-draft: 1 + 8 + 1 + ..
        assert generate(engine(tiny_loaded, **eng_kwargs), [prompt], p)[0] == out[:11]
    text_plain = LLM(engine=engine(tiny_loaded)).generate([PROMPTS[3]], GREEDY, use_tqdm=False)[0].text
    stop = text_plain[len(text_plain) // 2 : len(text_plain) // 2 + 3]
    p = SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True)
    want = LLM(engine=engine(tiny_loaded)).generate([PROMPTS[3]], p, use_tqdm=False)[0]
    got = LLM(engine=engine(tiny_loaded, **eng_kwargs)).generate([PROMPTS[3]], p, use_tqdm=False)[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.lists(st.lists(st.integers(3, 40), min_size=1, max_size=24), min_size=1, max_size=4),
    k=st.integers(1, 6),
    budget=st.integers(4, 40),
    method=st.sampled_from(["ngram", "draft"]),
    prefix_cache=st.sampled_from(["radix", "hash", "none"]),
    sampled_row=st.integers(0, 3),
)
def test_greedy_identical_on_random_cases(tiny_loaded, draft_dir, prompts, k, budget, method, prefix_cache, sampled_row):
    """Random prompts (repeated, so the prefix cache hits), budgets and k; one request samples
    at random in the same batch: the greedy ones still get plain decoding's tokens."""
    prompts = prompts + prompts[:1]
    params = [SamplingParams(temperature=0, max_tokens=17, ignore_eos=True) for _ in prompts]
    if sampled_row < len(prompts):
        params[sampled_row] = SamplingParams(temperature=1.0, max_tokens=17, ignore_eos=True, seed=7)
    common = {"max_num_batched_tokens": budget, "prompt_lookup_min": 1, "prefix_cache": prefix_cache, "num_blocks": 64, "block_size": 4}
    base = generate(engine(tiny_loaded, **common), prompts, params)
    eng = engine(tiny_loaded, speculative=method, num_speculative_tokens=k, draft_model=draft_dir, draft_weights="fp32", **common)
    got = generate(eng, prompts, params)
    for i, p in enumerate(params):
        if p.greedy:
            assert got[i] == base[i]


# --- verification logits and the K/V after rejection ----------------------------------------
def _plain_continuation(loaded, prompt: list[int], n: int) -> list[int]:
    return generate(engine(loaded), [prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]


def _drive(eng: LLMEngine, prompt: list[int], drafts_per_step: list[list[int]], max_tokens: int):
    """Run one request, setting its drafts by hand before each step; returns the request and
    the logits rows of every step."""
    rid = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    request = eng.requests[rid]
    seen: list[np.ndarray] = []
    execute = eng.runner.execute
    eng.runner.execute = lambda batch: seen.append(execute(batch)) or seen[-1]
    eng.step()  # the prompt
    for drafts in drafts_per_step:
        request.spec_token_ids = list(drafts)
        eng.step()
    return request, seen


def test_verification_rows_equal_one_token_at_a_time_decoding(tiny_loaded):
    prompt = PROMPTS[2]
    out = _plain_continuation(tiny_loaded, prompt, 12)
    eng = engine(tiny_loaded, speculative="ngram", num_speculative_tokens=8)
    eng.speculator.propose = lambda requests: None  # drafts are set by hand
    _, seen = _drive(eng, prompt, [out[1:9]], max_tokens=12)
    rows = seen[1]  # [9, V]: after out[0], out[1], .. out[8]
    plain = engine(tiny_loaded)
    _, one_by_one = _drive(plain, prompt, [[]] * 9, max_tokens=12)
    assert rows.shape[0] == 9
    np.testing.assert_allclose(rows, np.concatenate(one_by_one[1:10]), atol=1e-4, rtol=0)


def _kv_of(eng: LLMEngine, request_id: str, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    slots = eng.kv.slot_mapping(request_id, 0, num_tokens)
    k = eng.cache.k.reshape(eng.cache.k.shape[0], -1, *eng.cache.k.shape[3:])[:, slots]
    v = eng.cache.v.reshape(eng.cache.v.shape[0], -1, *eng.cache.v.shape[3:])[:, slots]
    return k, v


@pytest.mark.parametrize(
    "case",
    ["rejected at position 0", "all accepted plus a bonus", "a short draft", "no draft", "rejected mid-way"],
)
def test_kv_after_rejection_equals_a_fresh_prefill(tiny_loaded, case):
    prompt = PROMPTS[3]
    out = _plain_continuation(tiny_loaded, prompt, 20)
    wrong = (out[1] + 1) % 40 + 3
    drafts = {
        "rejected at position 0": [wrong, out[2], out[3]],
        "all accepted plus a bonus": out[1:5],
        "a short draft": out[1:2],
        "no draft": [],
        "rejected mid-way": [out[1], out[2], wrong, out[4]],
    }[case]
    eng = engine(tiny_loaded, speculative="ngram", num_speculative_tokens=8, num_blocks=64, block_size=4)
    eng.speculator.propose = lambda requests: None
    request, _ = _drive(eng, prompt, [drafts], max_tokens=20)
    committed = request.prompt_token_ids + request.output_token_ids
    assert request.output_token_ids == out[: len(request.output_token_ids)]
    assert request.num_computed_tokens == len(committed) - 1
    fresh_eng = engine(tiny_loaded, num_blocks=64, block_size=4, prefix_cache="none")
    rid = fresh_eng.add_request(committed, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    fresh_eng.step()
    got_k, got_v = _kv_of(eng, request.request_id, request.num_computed_tokens)
    want_k, want_v = _kv_of(fresh_eng, rid, request.num_computed_tokens)
    np.testing.assert_allclose(got_k, want_k, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_v, want_v, atol=1e-5, rtol=0)
    for _ in range(3):  # and it carries on exactly as plain decoding does
        eng.step()
    assert request.output_token_ids == out[: len(request.output_token_ids)]


def test_rejected_drafts_never_enter_the_prefix_cache(tiny_loaded):
    prompt = PROMPTS[3]
    out = _plain_continuation(tiny_loaded, prompt, 20)
    eng = engine(tiny_loaded, speculative="ngram", num_speculative_tokens=8, block_size=4)
    eng.speculator.propose = lambda requests: None
    wrong = [(t + 1) % 40 + 3 for t in out[1:9]]
    request, _ = _drive(eng, prompt, [wrong, wrong[:4]], max_tokens=3)
    assert request.is_finished
    cached = eng.kv.prefix_cache.match_prefix(prompt + out[:1] + wrong + [0] * 8)
    assert cached.num_tokens <= len(prompt) + 1  # never past the committed tokens


# --- random: the target distribution ---------------------------------------------------------
def test_chi2_sf_matches_closed_forms():
    for x in (0.1, 1.0, 5.0, 30.0):
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)  # df 2: exp(-x/2)
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)


def chi_square_p(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pearson's test of ``counts`` against ``expected_probs`` (cells with p = 0 must be empty)."""
    n = counts.sum()
    support = expected_probs > 0
    assert counts[~support].sum() == 0, f"tokens drawn outside the target's support: {np.flatnonzero(counts * ~support)}"
    e = n * expected_probs[support]
    stat = float(((counts[support] - e) ** 2 / e).sum())
    return chi2_sf(stat, int(support.sum()) - 1)


N = 100_000
P = np.array([0.05, 0.30, 0.15, 0.0, 0.40, 0.10])
CASES = {
    "q = p": P.copy(),
    "disjoint supports": np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
    "q = 0 where p > 0": np.array([0.5, 0.0, 0.0, 0.2, 0.3, 0.0]),
    "q flatter than p": np.full(6, 1 / 6),
}


def _first_tokens(p: np.ndarray, q: np.ndarray | None, seed: int, one_hot_on: int | None = None):
    """N runs of one draft position: (committed first token, accepted?) for each."""
    rng = np.random.default_rng(seed)
    draft_rng = np.random.default_rng(seed + 1)
    firsts = np.zeros(len(p), dtype=np.int64)
    accepted = 0
    target = np.stack([p, p])  # [2, V]: position 0 and the bonus position
    for _ in range(N):
        x = one_hot_on if q is None else int(draft_rng.choice(len(q), p=q))
        out = accept_random(target, [x], None if q is None else q[None, :], rng)
        firsts[out[0]] += 1
        accepted += len(out) == 2
    return firsts, accepted / N


@pytest.mark.parametrize("case", list(CASES))
def test_random_path_samples_the_target_distribution(case):
    q = CASES[case]
    firsts, rate = _first_tokens(P, q, seed=1)
    assert chi_square_p(firsts, P) > 1e-3
    expected_rate = np.minimum(P, q).sum()
    assert abs(rate - expected_rate) < 5 * math.sqrt(expected_rate * (1 - expected_rate) / N) + 1e-9


def test_random_path_with_a_one_hot_draft():
    firsts, rate = _first_tokens(P, None, seed=2, one_hot_on=2)  # an n-gram draft of token 2
    assert chi_square_p(firsts, P) > 1e-3
    assert abs(rate - P[2]) < 5 * math.sqrt(P[2] * (1 - P[2]) / N)


def test_random_second_position_given_the_first_accepted():
    p0 = np.array([0.2, 0.5, 0.3, 0.0])
    p1 = np.array([0.1, 0.1, 0.4, 0.4])
    p2 = np.array([0.25, 0.25, 0.25, 0.25])
    q0, q1 = np.array([0.1, 0.6, 0.3, 0.0]), np.array([0.4, 0.0, 0.3, 0.3])
    rng, draft_rng = np.random.default_rng(3), np.random.default_rng(4)
    seconds = np.zeros(4, dtype=np.int64)
    firsts = np.zeros(4, dtype=np.int64)
    target = np.stack([p0, p1, p2])
    for _ in range(N):
        x0 = int(draft_rng.choice(4, p=q0))
        x1 = int(draft_rng.choice(4, p=q1))
        out = accept_random(target, [x0, x1], np.stack([q0, q1]), rng)
        firsts[out[0]] += 1
        if len(out) >= 2:  # the first draft was accepted: the second token should follow p1
            seconds[out[1]] += 1
    assert chi_square_p(firsts, p0) > 1e-3
    assert chi_square_p(seconds, p1) > 1e-3


def test_random_path_after_temperature_top_k_and_top_p():
    """The rejection sampler's p is the distribution plain sampling draws from."""
    logits = np.array([[2.0, 1.0, 0.5, 0.4, -1.0, 3.0, 0.0]], dtype=np.float32)
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9, seed=0)
    p = probabilities(logits, [params], kernels_ref)[0]
    assert (p == 0).sum() >= 3  # the filters really cut something
    q = np.full(7, 1 / 7)
    firsts, rate = _first_tokens(p, q, seed=5)
    assert chi_square_p(firsts, p) > 1e-3
    assert abs(rate - np.minimum(p, q).sum()) < 0.01


def test_accept_greedy():
    target = np.eye(5)[[1, 2, 3, 4]]  # argmax 1, 2, 3, 4 at the four rows
    assert accept_greedy(target, [1, 2, 3]) == [1, 2, 3, 4]  # all accepted plus the bonus
    assert accept_greedy(target, [1, 0, 3]) == [1, 2]  # rejected at the second: its correction
    assert accept_greedy(target[:1], []) == [1]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_seeded_random_speculation_is_reproducible_and_on_the_target(tiny_loaded, draft_dir, method):
    params = [SamplingParams(temperature=0.8, top_k=20, max_tokens=30, seed=s, ignore_eos=True) for s in range(4)]
    kwargs = {"speculative": method, "num_speculative_tokens": 3, "draft_model": draft_dir, "draft_weights": "fp32"}
    a = generate(engine(tiny_loaded, **kwargs), PROMPTS, params)
    b = generate(engine(tiny_loaded, **kwargs), PROMPTS, params)
    assert a == b


# --- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"speculative": "eagle"}, "speculative must be one of none, ngram, draft"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
        ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max (2) must be >= prompt_lookup_min (3)"),
        ({"spec_draft_cost": -0.1}, "spec_draft_cost must be a number >= 0, got -0.1"),
        ({"spec_draft_cost": float("nan")}, "spec_draft_cost must be a number >= 0, got nan"),
    ],
)
def test_bad_speculative_settings_are_refused_by_name(tiny_loaded, kwargs, message):
    with pytest.raises(ConfigError) as e:
        engine(tiny_loaded, **kwargs)
    assert message in str(e.value)
