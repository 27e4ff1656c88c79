"""Sampling: parameter validation, reproducible seeded draws independent of the batch,
filters that are never violated, the right distribution, and raw-distribution logprobs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kernels_ref
from nanoserve.errors import InvalidSamplingParams, RequestError
from nanoserve.sampling import SamplingParams, sample


def draw(logits: np.ndarray, params: list[SamplingParams], generators: list[np.random.Generator]) -> list[int]:
    return [r.token_id for r in sample(logits.astype(np.float32), params, generators, kernels_ref)]


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "0.7"),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.5),
        ("top_p", None),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_k", "5"),
        ("top_k", False),
        ("min_p", 2.0),
        ("min_p", -0.1),
        ("min_p", float("nan")),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 8.0),
        ("max_tokens", True),
        ("seed", "42"),
        ("seed", 1.5),
        ("logprobs", 21),
        ("logprobs", -1),
        ("stop", [""]),
        ("stop", 5),
        ("stop_token_ids", ["2"]),
        ("seed", -1),
        ("stop_token_ids", 5),
    ],
)
def test_invalid_sampling_params_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidSamplingParams, match=f"invalid {field}="):
        SamplingParams(**{field: value})


def test_invalid_sampling_params_is_a_request_error_and_a_value_error() -> None:
    with pytest.raises(RequestError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"temperature": 2},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": np.int64(5)},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"max_tokens": 1},
        {"seed": 0},
        {"logprobs": 0},
        {"logprobs": 20},
        {"stop": "END"},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_numbers_are_normalised_and_a_single_stop_string_becomes_a_list() -> None:
    p = SamplingParams(temperature=1, top_k=np.int64(3), stop="END")
    assert isinstance(p.temperature, float) and type(p.top_k) is int
    assert p.stop == ["END"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.01).greedy


# --- greedy ----------------------------------------------------------------------------------


def test_greedy_picks_the_argmax_of_every_row() -> None:
    logits = np.random.default_rng(0).standard_normal((6, 50))
    params = [SamplingParams(temperature=0)] * 6
    gens = [p.make_generator() for p in params]
    assert draw(logits, params, gens) == np.argmax(logits, axis=-1).tolist()


def test_top_k_of_one_equals_greedy_at_any_temperature() -> None:
    rng = np.random.default_rng(1)
    for step in range(20):
        logits = rng.standard_normal((1, 30))
        params = [SamplingParams(temperature=1.5, top_k=1, seed=step)]
        assert draw(logits, params, [params[0].make_generator()]) == [int(np.argmax(logits))]


def test_a_vanishingly_small_temperature_samples_the_argmax() -> None:
    logits = np.array([[1.0, 3.0, 2.0, -1.0]])
    params = [SamplingParams(temperature=1e-50, seed=0)]
    assert draw(logits, params, [params[0].make_generator()]) == [1]


# --- seeds and batches --------------------------------------------------------------------


def run_steps(logit_steps: list[np.ndarray], params: list[SamplingParams]) -> list[list[int]]:  # -> [S][steps]
    gens = [p.make_generator() for p in params]
    picks = [draw(logits, params, gens) for logits in logit_steps]
    return [list(col) for col in zip(*picks, strict=True)]


def test_seeded_sampling_is_reproducible() -> None:
    rng = np.random.default_rng(2)
    steps = [rng.standard_normal((1, 40)) for _ in range(30)]
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=1234)]
    first, again = run_steps(steps, params), run_steps(steps, params)
    assert first == again
    other = run_steps(steps, [SamplingParams(temperature=1.0, top_p=0.9, seed=4321)])
    assert other != first


def test_seeded_row_samples_the_same_tokens_alone_or_in_any_batch() -> None:
    rng = np.random.default_rng(3)
    vocab, num_steps = 40, 30
    mine = SamplingParams(temperature=0.8, top_k=20, top_p=0.95, min_p=0.01, seed=7)
    my_logits = [rng.standard_normal((1, vocab)) for _ in range(num_steps)]
    alone = run_steps(my_logits, [mine])[0]

    neighbours = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, seed=99),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.2, seed=5),
    ]
    for position in (0, 2, 4):
        batch_params = neighbours[:position] + [mine] + neighbours[position:]
        batch_logits = []
        for step in range(num_steps):
            rows = rng.standard_normal((len(batch_params), vocab))
            rows[position] = my_logits[step][0]
            batch_logits.append(rows)
        assert run_steps(batch_logits, batch_params)[position] == alone


# --- filters are never violated -----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    logits=arrays(np.float64, st.integers(2, 24), elements=st.floats(-8, 8)),
    temperature=st.floats(0.1, 3.0),
    top_k=st.integers(-1, 30),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**32 - 1),
)
def test_samples_never_fall_outside_the_top_k_top_p_and_min_p_sets(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float, seed: int
) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    gen = params.make_generator()
    scaled = logits.astype(np.float32) / np.float32(temperature)
    vocab = len(scaled)
    for _ in range(5):
        token = draw(logits[None, :], [params], [gen])[0]
        assert 0 <= token < vocab
        # top-k: no more than k-1 tokens are strictly more likely
        if 0 < top_k < vocab:
            assert np.sum(scaled > scaled[token]) < top_k
            survivors = scaled >= np.sort(scaled)[::-1][top_k - 1]
        else:
            survivors = np.ones(vocab, bool)
        # top-p over the top-k survivors: the mass strictly more likely than the token is < top_p
        exps = np.where(survivors, np.exp(scaled.astype(np.float64) - scaled.max()), 0.0)
        probs = exps / exps.sum()
        if top_p < 1.0:
            assert probs[probs > probs[token]].sum() < top_p + 1e-9
        # min-p: at least min_p times the most likely token
        if min_p > 0:
            assert scaled[token] >= scaled.max() + math.log(min_p) - 1e-5


# --- the distribution ----------------------------------------------------------------------


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(np.sum((counts - expected) ** 2 / expected))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax_of_logits_over_temperature(temperature: float) -> None:
    logits = np.array([1.0, 0.5, 0.0, -0.5, -2.0])
    num_draws, rows = 20_000, 500
    params = [SamplingParams(temperature=temperature, seed=s) for s in range(rows)]
    gens = [p.make_generator() for p in params]
    batch = np.tile(logits, (rows, 1))
    counts = np.zeros(len(logits))
    for _ in range(num_draws // rows):
        np.add.at(counts, draw(batch, params, gens), 1)
    weights = [math.exp(v / temperature) for v in logits]
    probs = np.array(weights) / sum(weights)
    # 4 degrees of freedom: P(chi2 > 25) is about 5e-5 for a correct sampler
    assert chi_square(counts, probs) < 25.0


def test_top_k_renormalises_over_the_survivors() -> None:
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    params = [SamplingParams(temperature=1.0, top_k=2, seed=s) for s in range(400)]
    gens = [p.make_generator() for p in params]
    batch = np.repeat(logits, 400, axis=0)
    counts = np.zeros(4)
    for _ in range(10):
        np.add.at(counts, draw(batch, params, gens), 1)
    assert counts[2:].sum() == 0
    assert chi_square(counts[:2], np.array([4 / 7, 3 / 7])) < 15.0  # 1 dof: P(chi2 > 15) ~ 1e-4


# --- logprobs ----------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_the_raw_logits_whatever_the_filters() -> None:
    rng = np.random.default_rng(4)
    logits = (3 * rng.standard_normal((3, 12))).astype(np.float32)
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0.3, top_k=2, top_p=0.5, seed=1, logprobs=5),
        SamplingParams(temperature=1.0, seed=2),
    ]
    results = sample(logits, params, [p.make_generator() for p in params], kernels_ref)
    for row in range(2):
        raw = logits[row].astype(np.float64)
        log_z = math.log(sum(math.exp(v) for v in raw))
        expected = raw - log_z
        assert results[row].logprob == pytest.approx(expected[results[row].token_id], abs=1e-9)
        k = params[row].logprobs
        best = sorted(range(12), key=lambda t: -expected[t])[:k]
        assert [t for t, _ in results[row].top_logprobs] == best
        assert [lp for _, lp in results[row].top_logprobs] == pytest.approx(expected[best].tolist(), abs=1e-9)
    assert results[2].logprob is None and results[2].top_logprobs is None


def test_logprobs_zero_reports_only_the_chosen_token() -> None:
    logits = np.array([[0.0, 1.0, 2.0]], np.float32)
    params = [SamplingParams(temperature=0, logprobs=0)]
    (result,) = sample(logits, params, [params[0].make_generator()], kernels_ref)
    assert result.token_id == 2
    assert result.logprob == pytest.approx(2.0 - math.log(1 + math.e + math.e**2))
    assert result.top_logprobs == []
