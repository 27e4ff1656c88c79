"""Repetition control: vLLM's presence, frequency and repetition penalties, as a kernel and in the sampler.

The reference kernel is checked against the formula written out per element; the
sampler applies it to each row with that row's own history (speculative rows too),
never touches a batch that does not ask for it, and still reports raw logprobs. On the
tiny model a repetition penalty changes a greedy run, and settings equal to "off" do
not; on SmolLM2 it ends a greedy loop.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernels_ref
from nanoserve.errors import InvalidSamplingParams
from nanoserve.kernels import get_backend
from nanoserve.llm import LLM
from nanoserve.request import Request
from nanoserve.sampling import Sampler, SamplingParams, log_softmax, penalty_inputs
from tests.test_engine import make_engine

VOCAB = 12


def penalties_per_element(logits, prompt_mask, output_counts, presence, frequency, repetition):  # [S, V] ...
    """The contract written out one element at a time, in float32 scalars."""
    out = np.empty_like(logits)
    for s in range(logits.shape[0]):
        for v in range(logits.shape[1]):
            x = np.float32(logits[s, v])
            count = int(output_counts[s, v])
            if prompt_mask[s, v] or count > 0:
                x = x / repetition[s] if x > 0 else x * repetition[s]
            x = np.float32(x - frequency[s] * np.float32(count))
            x = np.float32(x - presence[s] * np.float32(count > 0))
            out[s, v] = x
    return out


def random_penalty_args(rng: np.random.Generator, rows: int, vocab: int) -> tuple:
    logits = (rng.standard_normal((rows, vocab)) * 4).astype(np.float32)
    logits[rng.random(logits.shape) < 0.1] = 0.0
    logits[rng.random(logits.shape) < 0.1] = -np.inf
    prompt_mask = rng.random((rows, vocab)) < 0.4
    output_counts = np.where(rng.random((rows, vocab)) < 0.4, rng.integers(1, 9, (rows, vocab)), 0).astype(np.int32)
    presence = rng.uniform(-2, 2, rows).astype(np.float32)
    frequency = rng.uniform(-2, 2, rows).astype(np.float32)
    repetition = rng.uniform(0.2, 3.0, rows).astype(np.float32)
    return logits, prompt_mask, output_counts, presence, frequency, repetition


# --- the kernel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_reference_kernel_is_the_formula_applied_to_each_element(seed: int) -> None:
    args = random_penalty_args(np.random.default_rng(seed), rows=4, vocab=50)
    got = kernels_ref.apply_penalties(*args)
    assert got.dtype == np.float32 and got.shape == args[0].shape
    np.testing.assert_array_equal(got, penalties_per_element(*args))


def test_penalties_that_are_off_leave_every_logit_as_it_was() -> None:
    logits, prompt_mask, output_counts, *_ = random_penalty_args(np.random.default_rng(0), rows=3, vocab=40)
    off = (np.zeros(3, np.float32), np.zeros(3, np.float32), np.ones(3, np.float32))
    np.testing.assert_array_equal(kernels_ref.apply_penalties(logits, prompt_mask, output_counts, *off), logits)


def test_each_penalty_does_what_its_docstring_says() -> None:
    logits = np.array([[2.0, -2.0, 2.0, -2.0, 2.0]], dtype=np.float32)
    prompt_mask = np.array([[True, True, False, False, False]])
    output_counts = np.array([[0, 0, 3, 1, 0]], dtype=np.int32)

    def apply(presence: float, frequency: float, repetition: float) -> list[float]:
        per_row = [np.array([x], dtype=np.float32) for x in (presence, frequency, repetition)]
        return kernels_ref.apply_penalties(logits, prompt_mask, output_counts, *per_row)[0].tolist()

    assert apply(0, 0, 2) == [1.0, -4.0, 1.0, -4.0, 2.0]  # prompt or output; unseen token 4 untouched
    assert apply(0, 0.5, 1) == [2.0, -2.0, 0.5, -2.5, 2.0]  # output only, times the count
    assert apply(0.5, 0, 1) == [2.0, -2.0, 1.5, -2.5, 2.0]  # output only, once
    assert apply(1, 0.5, 2) == [1.0, -4.0, -1.5, -5.5, 2.0]  # repetition first, then the other two


@pytest.mark.parametrize("backend", ["cpu"])
def test_the_cpu_kernel_gives_the_reference_bits(backend: str) -> None:
    args = random_penalty_args(np.random.default_rng(7), rows=5, vocab=300)
    np.testing.assert_array_equal(get_backend(backend).kernels.apply_penalties(*args), kernels_ref.apply_penalties(*args))


# --- SamplingParams -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("presence_penalty", -2.01, "[-2, 2]"),
        ("presence_penalty", float("nan"), "finite number"),
        ("presence_penalty", "0.5", "finite number"),
        ("presence_penalty", True, "finite number"),
        ("frequency_penalty", 3, "[-2, 2]"),
        ("frequency_penalty", float("-inf"), "finite number"),
        ("repetition_penalty", 0, "[0.01, 100]"),
        ("repetition_penalty", -1.2, "[0.01, 100]"),
        ("repetition_penalty", 1e39, "[0.01, 100]"),
        ("repetition_penalty", None, "finite number"),
    ],
)
def test_bad_penalties_are_one_line_errors_naming_the_field_and_range(field: str, value: object, rule: str) -> None:
    with pytest.raises(InvalidSamplingParams) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert "\n" not in message and field in message and rule in message, message


def test_penalties_at_the_ends_of_their_ranges_are_accepted_and_off_is_the_default() -> None:
    assert not SamplingParams().uses_penalties
    assert not SamplingParams(presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1).uses_penalties
    for kwargs in ({"presence_penalty": -2}, {"frequency_penalty": 2.0}, {"repetition_penalty": 0.01},
                   {"repetition_penalty": 100}):  # fmt: skip
        assert SamplingParams(**kwargs).uses_penalties
    params = SamplingParams(presence_penalty=np.float32(0.5))
    assert type(params.presence_penalty) is float


# --- the sampler --------------------------------------------------------------------------------


def make_request(prompt: list[int], outputs: list[int], drafts: list[int], **params: float) -> Request:
    sp = SamplingParams(temperature=0, max_tokens=16, **params)
    request = Request(f"r{len(prompt)}", list(prompt), sp, sp.max_tokens, sp.make_generator())
    request.output_token_ids, request.spec_token_ids = list(outputs), list(drafts)
    return request


def expected_rows(logits: np.ndarray, prompt: list[int], histories: list[list[int]], params: SamplingParams) -> np.ndarray:
    """``apply_penalties`` with arguments built by hand from explicit histories."""
    rows = len(histories)
    prompt_mask = np.zeros((rows, VOCAB), dtype=bool)
    prompt_mask[:, prompt] = True
    counts = np.zeros((rows, VOCAB), dtype=np.int32)
    for i, history in enumerate(histories):
        for t in history:
            counts[i, t] += 1
    per_row = [np.full(rows, getattr(params, f), dtype=np.float32)
               for f in ("presence_penalty", "frequency_penalty", "repetition_penalty")]  # fmt: skip
    return kernels_ref.apply_penalties(logits, prompt_mask, counts, *per_row)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_each_row_of_a_verification_is_penalised_by_its_own_history(backend: str) -> None:
    # request a: 2 outputs and 2 drafts -> 3 rows, seeing [3, 3], [3, 3, 5], [3, 3, 5, 7]
    a = make_request([1, 2], [3, 3], [5, 7], presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5)
    b = make_request([4], [3], [])  # no penalties: its row stays as the model gave it
    c = make_request([9, 9, 9], [5], [], repetition_penalty=2.0)  # no rows this step
    d = make_request([6], [], [], frequency_penalty=1.0)  # a first token: prompt only
    logits = (np.random.default_rng(0).standard_normal((5, VOCAB)) * 3).astype(np.float32)
    raw = logits.copy()

    processed, rows = Sampler(get_backend(backend).kernels).process(logits, [a, b, c, d], [3, 1, 0, 1])

    np.testing.assert_array_equal(logits, raw)  # the raw logits are left alone
    assert [r.request_id for r in rows] == [a.request_id] * 3 + [b.request_id, d.request_id]
    np.testing.assert_array_equal(processed[:3], expected_rows(raw[:3], [1, 2], [[3, 3], [3, 3, 5], [3, 3, 5, 7]], a.params))
    np.testing.assert_array_equal(processed[3], raw[3])
    np.testing.assert_array_equal(processed[4:], expected_rows(raw[4:], [6], [[]], d.params))
    whole_history = expected_rows(raw[:1], [1, 2], [[3, 3, 5, 7]], a.params)
    assert not np.array_equal(processed[:1], whole_history)  # row 0 must not see the drafts


def test_a_batch_without_penalties_is_not_touched() -> None:
    class NoKernels:  # any kernel call would fail
        pass

    logits = np.ones((2, VOCAB), dtype=np.float32)
    requests = [make_request([1], [2], []), make_request([3], [], [], repetition_penalty=1.3)]
    processed, _ = Sampler(NoKernels()).process(logits, requests, [2, 0])
    assert processed is logits


def test_penalties_steer_greedy_rows_and_logprobs_stay_those_of_the_model() -> None:
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    logits[0, 3], logits[0, 8] = 5.0, 4.0
    request = make_request([0], [3, 3], [], frequency_penalty=1.0)
    request.params.logprobs = 1
    [[result]] = Sampler(kernels_ref).sample(logits, [request], [1])
    assert result.token_id == 8  # 5 - 2 x 1.0 = 3 < 4
    assert result.logprob == pytest.approx(float(log_softmax(logits)[0, 8]))
    assert result.top_logprobs[0][0] == 3  # the model's own favourite


def test_penalty_inputs_are_dense_rows() -> None:
    mask, counts, presence, frequency, repetition = penalty_inputs(
        [[1, 1, 4], []], [[2, 2, 2, 0], []], [SamplingParams(presence_penalty=0.5), SamplingParams()], 6
    )
    assert mask.tolist() == [[False, True, False, False, True, False], [False] * 6]
    assert counts.dtype == np.int32 and counts.tolist() == [[1, 0, 3, 0, 0, 0], [0] * 6]
    assert presence.dtype == frequency.dtype == repetition.dtype == np.float32
    assert presence.tolist() == [0.5, 0.0] and repetition.tolist() == [1.0, 1.0]


# --- end to end ---------------------------------------------------------------------------------


def greedy(llm: LLM, prompts: list[list[int]], **penalties: float) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **penalties)
    return [out.token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


def test_a_repetition_penalty_changes_a_greedy_run_and_settings_equal_to_off_do_not(tiny_loaded) -> None:
    llm = LLM(engine=make_engine(tiny_loaded))
    prompts = [[5, 6, 7, 8], [40, 41]]
    off = greedy(llm, prompts)
    assert greedy(llm, prompts, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0) == off
    penalised = greedy(llm, prompts, repetition_penalty=1.5)
    assert penalised != off
    assert max(map(len, map(set, penalised))) > max(map(len, map(set, off)))  # more distinct tokens
    assert greedy(llm, prompts, frequency_penalty=2.0) != off


def longest_repeat(token_ids: list[int], n: int = 6) -> int:
    """How many times the most frequent n-gram occurs: a greedy loop repeats one many times."""
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(token_ids) - n + 1):
        gram = tuple(token_ids[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
    return max(counts.values(), default=0)


@pytest.mark.real_model
def test_smollm2_greedy_stops_looping_with_a_repetition_penalty(smollm2_loaded) -> None:
    llm = LLM(engine=make_engine(smollm2_loaded, num_blocks=64, block_size=16))
    messages = [{"role": "user", "content": "Tell me about yourself."}]
    off, on = (
        llm.chat(messages, SamplingParams(temperature=0, max_tokens=160, repetition_penalty=r))[0]
        for r in (1.0, 1.2)
    )
    # without: "I'm a language model that's designed to be empathetic and empathetic." again and again
    assert off.finish_reason == "length" and longest_repeat(off.token_ids) >= 5, off.text
    assert longest_repeat(on.token_ids) <= 2, on.text
