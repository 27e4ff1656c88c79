"""Sampling: per-request parameters, and turning a batch of logits into next tokens.

Pipeline for one row of logits:

    logits processors -> constraint mask -> penalties -> greedy argmax if temperature == 0, else:
    logits / temperature -> top-k filter -> top-p filter -> min-p filter -> softmax -> draw

The constraint mask (``regex``, ``json_schema`` or ``choice``: :mod:`nanoserve.structured`)
sets every token the request's automaton forbids after the row's history to -inf, EOS
included except where the answer is complete; it comes after the logits processors (they
see the model's logits) and before the penalties (which only move finite logits), so no
filter downstream can bring a forbidden token back. After the sampled token, a
constrained request may get *forced* tokens (jump-forward): see :meth:`Sampler.sample`.

Penalties (vLLM's semantics: ``apply_penalties`` in vLLM's ``model_executor/layers/utils.py``,
here the ``apply_penalties`` kernel of ``kernels_ref.sampling``) lower the logits of tokens
the request has already seen, greedy rows included, so greedy decoding does not loop:

    repetition_penalty  r in [0.01, 100], 1 = off: a logit of a token seen in the prompt
                        *or* the output is divided by r if it is > 0, else multiplied by r
                        (CTRL's penalty, as vLLM and HF transformers apply it; r < 1
                        rewards repetition)
    frequency_penalty   f in [-2, 2], 0 = off: minus f times the token's count in the output
    presence_penalty    p in [-2, 2], 0 = off: minus p if the token occurs in the output
                        (OpenAI's two, over the output only, as OpenAI and vLLM define
                        them; negative values reward repetition)

in that order: the repetition penalty first, on the logit as the logits processors left it.

"The output" of logits row j of a request with n rows is :func:`row_history` (outputs and
the drafts before row j), so every row of a speculative verification is penalised by
exactly the history it predicts after. A batch in which no request uses a penalty skips
all of this work.

Each request owns a seeded ``numpy.random.Generator``, so a request's samples depend only
on its own seed and its own logits, never on which other requests share the batch.
Log-probabilities reported to the user are those of the raw model distribution
(``log_softmax(logits)``), before logits processors, penalties, temperature and filters.
:class:`Sampler` is the engine's sampler (:class:`nanoserve.interfaces.Sampler`, registered
as ``"default"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nanoserve.errors import InvalidSamplingParams
from nanoserve.interfaces import LogitsProcessor

if TYPE_CHECKING:
    from nanoserve.request import Request

GREEDY_BELOW = 1e-5
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's range)
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # vLLM takes any r > 0; see SamplingParams.validate


@dataclass
class SamplingParams:
    """What to generate and how. Validated on creation; errors name the bad field."""

    max_tokens: int = 64
    temperature: float = 1.0  # 0 (or < 1e-5) = greedy
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # [0, 1]; 0 = off
    presence_penalty: float = 0.0  # [-2, 2]; 0 = off: minus this if the token is in the output
    frequency_penalty: float = 0.0  # [-2, 2]; 0 = off: minus this x the token's count in the output
    repetition_penalty: float = 1.0  # [0.01, 100]; 1 = off: seen logits (prompt or output) / it if > 0, else x it
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, never included in the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0: the chosen token's logprob + top k
    logits_processors: list[LogitsProcessor] = field(default_factory=list)  # applied in order, first
    # structured output (nanoserve.structured): at most one of the three
    regex: str | None = None  # the output fully matches this regular expression
    json_schema: dict[str, Any] | str | None = None  # the output is JSON valid under this schema (or its text)
    choice: list[str] | None = None  # the output is exactly one of these strings
    jump_forward: bool = True  # append forced tokens without sampling (same distribution, fewer steps)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalise) every field; the engine calls it again when a request is added,
        so a field changed after construction is checked too."""

        def fail(name: str, value: Any, rule: str) -> None:
            raise InvalidSamplingParams(f"invalid {name}={value!r}: {rule}")

        def number(name: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
                fail(name, value, "must be a finite number")
            return float(value)

        def integer(name: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                fail(name, value, "must be an integer")
            return int(value)

        self.max_tokens = integer("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            fail("max_tokens", self.max_tokens, "must be >= 1")
        self.temperature = number("temperature", self.temperature)
        if self.temperature < 0:
            fail("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        self.top_p = number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", self.top_p, "must be in (0, 1]")
        self.top_k = integer("top_k", self.top_k)
        if self.top_k < -1:
            fail("top_k", self.top_k, "must be >= 1, or 0 / -1 to disable")
        self.min_p = number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", self.min_p, "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = number(name, getattr(self, name))
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                fail(name, value, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 means off)")
            setattr(self, name, value)
        # vLLM accepts any r > 0; the kernels work in float32, where r = 1e-45 turns a logit of
        # 1 into inf and r = 1e39 is inf itself (0 x inf = nan): a range keeps every logit finite
        self.repetition_penalty = number("repetition_penalty", self.repetition_penalty)
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            fail("repetition_penalty", self.repetition_penalty, f"must be in [{low:g}, {high:g}] (1 means off)")
        if self.seed is not None:
            self.seed = integer("seed", self.seed)
            if self.seed < 0:
                fail("seed", self.seed, "must be >= 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", self.stop, "must be a non-empty string or a list of non-empty strings")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)):
            fail("stop_token_ids", self.stop_token_ids, "must be a list of token ids")
        self.stop_token_ids = [integer("stop_token_ids", t) for t in self.stop_token_ids]
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            fail("ignore_eos", self.ignore_eos, "must be true or false")
        self.ignore_eos = bool(self.ignore_eos)
        if self.logprobs is not None:
            self.logprobs = integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= 20:
                fail("logprobs", self.logprobs, "must be in [0, 20]")
        if not isinstance(self.logits_processors, (list, tuple)) or not all(callable(p) for p in self.logits_processors):
            fail("logits_processors", self.logits_processors, "must be a list of functions (output token ids, logits) -> logits")
        self.logits_processors = list(self.logits_processors)
        self._validate_constraint(fail)

    def _validate_constraint(self, fail: Any) -> None:
        """At most one of regex / json_schema / choice, of the right type, and compilable."""
        given = [name for name in ("regex", "json_schema", "choice") if getattr(self, name) is not None]
        if len(given) > 1:
            fail(given[1], getattr(self, given[1]), f"give at most one of regex, json_schema and choice (got {' and '.join(given)})")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            fail("regex", self.regex, "must be a non-empty string")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str, bool)):
            fail("json_schema", self.json_schema, "must be a JSON schema (an object, or its JSON text)")
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, (list, tuple)) or not self.choice:
                fail("choice", self.choice, "must be a non-empty list of strings")
            if not all(isinstance(c, str) and c for c in self.choice):
                fail("choice", self.choice, "every choice must be a non-empty string")
            self.choice = list(self.choice)
        if not isinstance(self.jump_forward, (bool, np.bool_)):
            fail("jump_forward", self.jump_forward, "must be true or false")
        self.jump_forward = bool(self.jump_forward)
        if given and self.ignore_eos:
            fail("ignore_eos", self.ignore_eos, f"cannot be combined with {given[0]}: a constrained answer ends with EOS")
        if given:
            from nanoserve import structured  # lazy: unconstrained requests never load it

            field_name, regex = structured.constraint_regex(self)  # type: ignore[misc]
            structured.compile_constraint(field_name, regex)

    @property
    def constrained(self) -> bool:
        """Whether the output must match a regex, a JSON schema or a choice."""
        return self.regex is not None or self.json_schema is not None or self.choice is not None

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 act as 0: dividing by them would overflow float32 logits."""
        return self.temperature < GREEDY_BELOW

    @property
    def uses_penalties(self) -> bool:
        """Whether any of presence, frequency or repetition penalty is on."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def make_generator(self) -> np.random.Generator:
        """The request's private random stream (seeded if ``seed`` is set)."""
        return np.random.default_rng(self.seed)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of token_id under the raw distribution
    top_logprobs: list[tuple[int, float]] | None = None  # [(token_id, logprob)] best first


def log_softmax(logits: np.ndarray) -> np.ndarray:  # [..., V] -> [..., V] float64
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def probabilities(
    logits: np.ndarray,  # [R, V] float32, rows to sample at random
    params: list[SamplingParams],  # [R], none of them greedy
    kernels: Any,  # the backend's kernels (top_k_filter, top_p_filter, min_p_filter, softmax)
) -> np.ndarray:  # [R, V] float64, each row sums to 1
    """The distribution a random row is drawn from: temperature, top-k, top-p, min-p, softmax.

    The speculative rejection sampler (``nanoserve.spec``) compares drafts against exactly
    this distribution.
    """
    x = logits / np.array([p.temperature for p in params], dtype=np.float32)[:, None]
    x = kernels.top_k_filter(x, np.array([p.top_k for p in params], dtype=np.int64))
    x = kernels.top_p_filter(x, np.array([p.top_p for p in params], dtype=np.float64))
    x = kernels.min_p_filter(x, np.array([p.min_p for p in params], dtype=np.float64))
    return kernels.softmax(x.astype(np.float64), -1)


def draw(probs: np.ndarray, generator: np.random.Generator) -> int:  # [V] float64 -> token id
    """One token from ``probs`` by inverse CDF, using one uniform draw of ``generator``."""
    cdf = np.cumsum(probs)
    u = generator.random() * cdf[-1]
    token = min(int(np.searchsorted(cdf, u, side="right")), probs.shape[0] - 1)
    while probs[token] == 0.0:  # u landed exactly on a boundary: step back
        token -= 1
    return token


def add_logprobs(
    results: list[SampleResult], raw_logits: np.ndarray, params: list[SamplingParams]
) -> None:  # raw_logits [S, V]: fills logprob / top_logprobs of the rows that asked for them
    want = [s for s in range(len(results)) if params[s].logprobs is not None]
    if not want:
        return
    lp = log_softmax(raw_logits[want])
    for row, s in enumerate(want):
        results[s].logprob = float(lp[row, results[s].token_id])
        k = params[s].logprobs or 0
        top = np.argsort(-lp[row], kind="stable")[:k]
        results[s].top_logprobs = [(int(t), float(lp[row, t])) for t in top]


def sample(
    logits: np.ndarray,  # [S, V] float32, one row per request that needs a token
    params: list[SamplingParams],  # [S]
    generators: list[np.random.Generator],  # [S]
    kernels: Any,  # the backend's kernels (top_k_filter, top_p_filter, min_p_filter, softmax)
    raw_logits: np.ndarray | None = None,  # [S, V] for logprobs, if ``logits`` were processed
) -> list[SampleResult]:
    """Choose one next token per row, as each row's SamplingParams say."""
    num_rows = logits.shape[0]
    tokens = np.argmax(logits, axis=-1)  # greedy rows are done already
    random_rows = [s for s in range(num_rows) if not params[s].greedy]
    if random_rows:
        probs = probabilities(logits[random_rows], [params[s] for s in random_rows], kernels)  # [R, V]
        for row, s in enumerate(random_rows):
            tokens[s] = draw(probs[row], generators[s])
    results = [SampleResult(int(t)) for t in tokens]
    add_logprobs(results, logits if raw_logits is None else raw_logits, params)
    return results


def row_history(request: Request, row: int, num_rows: int) -> list[int]:
    """The output tokens that precede the token predicted by logits row ``row`` of ``num_rows``.

    A request's logits rows are always its last ``num_rows`` known positions, where known
    tokens are prompt + outputs + drafts (``request.spec_token_ids``, awaiting verification).
    A decode has one row and sees all outputs; row j of a k-draft verification sees the
    outputs and the first j drafts.
    """
    tokens = request.output_token_ids + request.spec_token_ids
    return tokens[: max(0, len(tokens) - num_rows + 1 + row)]


def penalty_inputs(
    prompts: list[list[int]],  # [P] token ids of each row's prompt
    histories: list[list[int]],  # [P] output token ids each row has seen (its row_history)
    params: list[SamplingParams],  # [P]
    vocab: int,  # V
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The arguments of the ``apply_penalties`` kernel for P rows, after the logits.

    Returns prompt_mask [P, V] bool, output_counts [P, V] int32, and presence, frequency,
    repetition [P] float32. Dense per row: a vocabulary of 49152 costs 240 KB a row.
    """
    rows = len(prompts)
    prompt_mask = np.zeros((rows, vocab), dtype=bool)
    output_counts = np.zeros((rows, vocab), dtype=np.int32)
    for i, (prompt, history) in enumerate(zip(prompts, histories)):
        prompt_mask[i, prompt] = True
        if history:
            output_counts[i] = np.bincount(history, minlength=vocab)
    per_row = [
        np.array([getattr(p, name) for p in params], dtype=np.float32)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
    ]
    return prompt_mask, output_counts, per_row[0], per_row[1], per_row[2]


def _host(a: Any) -> np.ndarray:
    """A kernel's result on the host (a GPU backend with CuPy returns a device array)."""
    return a if isinstance(a, np.ndarray) else a.get()


class Sampler:
    """The engine's sampler: each request's logits processors, its penalties, then :func:`sample` per row.

    A processor must leave at least one finite logit in its row.
    """

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels  # the backend's kernels (apply_penalties, top_k_filter, ...)

    def process(
        self, logits: np.ndarray, requests: list[Request], num_logits: list[int]
    ) -> tuple[np.ndarray, list[Request]]:  # [R, V] -> processed [R, V], and each row's request
        """Each request's logits processors, then its constraint mask, then its penalties, row by
        row (row j of a request's n rows sees ``row_history(request, j, n)`` as its output tokens).

        Returns ``logits`` itself when nothing applies, else a processed copy.
        """
        rows: list[Request] = [r for r, n in zip(requests, num_logits) for _ in range(n)]
        processed = logits
        row = 0
        for request, n in zip(requests, num_logits):
            params = request.params
            guide = structured_guide(request) if n and params.constrained else None
            for j in range(n):
                if (params.logits_processors or guide is not None) and processed is logits:
                    processed = logits.copy()  # logprobs still come from the raw model output
                for processor in params.logits_processors:
                    processed[row] = processor(row_history(request, j, n), processed[row])
                if guide is not None:
                    processed[row] = guide.mask_row(request, row_history(request, j, n), processed[row])
                row += 1
        if any(n and r.params.uses_penalties for r, n in zip(requests, num_logits)):
            if processed is logits:
                processed = logits.copy()
            self._penalise(processed, requests, num_logits)
        return processed, rows

    def _penalise(self, logits: np.ndarray, requests: list[Request], num_logits: list[int]) -> None:
        """Apply the penalties, in place, to the rows of ``logits`` [R, V] of the requests that use them."""
        penalised: list[int] = []  # row indices
        prompts, histories, params = [], [], []
        row = 0
        for request, n in zip(requests, num_logits):
            if request.params.uses_penalties:
                for j in range(n):
                    penalised.append(row + j)
                    prompts.append(request.prompt_token_ids)
                    histories.append(row_history(request, j, n))
                    params.append(request.params)
            row += n
        if penalised:
            inputs = penalty_inputs(prompts, histories, params, logits.shape[-1])
            logits[penalised] = _host(self.kernels.apply_penalties(logits[penalised], *inputs))

    def sample(
        self, logits: np.ndarray, requests: list[Request], num_logits: list[int]
    ) -> list[list[SampleResult]]:  # logits [sum(num_logits), V] float32 -> per request, one per row (+ forced)
        """One result per row; a constrained request's last result may be followed by forced tokens.

        Jump-forward (:mod:`nanoserve.structured.guide`): where the constraint allows exactly
        one next token after the sampled one, it is appended as a further result, and so on
        while that holds. Forced tokens carry no logprobs, so requests that ask for logprobs,
        or have logits processors (which could ban the forced token), or set
        ``jump_forward=False``, get none.
        """
        processed, rows = self.process(logits, requests, num_logits)
        if not rows:
            return [[] for _ in requests]
        results = sample(processed, [r.params for r in rows], [r.generator for r in rows], self.kernels, logits)
        out: list[list[SampleResult]] = []
        start = 0
        for request, n in zip(requests, num_logits):
            mine = results[start : start + n]
            start += n
            if n == 1 and jumps_forward(request.params):
                mine += forced_results(request, mine[0].token_id)
            out.append(mine)
        return out


def jumps_forward(params: SamplingParams) -> bool:
    """Whether forced tokens may be appended to this request without sampling them."""
    return params.constrained and params.jump_forward and params.logprobs is None and not params.logits_processors


def forced_results(request: Request, sampled: int) -> list[SampleResult]:
    """The forced tokens after ``sampled`` (the token just drawn for ``request``'s one row).

    A non-greedy request spends one uniform draw per forced token, as sampling that
    one-token distribution would have, so its later draws are those of a run without
    jump-forward.
    """
    guide = structured_guide(request)
    if guide is None:
        return []
    forced = guide.forced_tokens(request, [*request.output_token_ids, sampled])
    if not request.params.greedy:
        for _ in forced:
            request.generator.random()
    return [SampleResult(t) for t in forced]


def structured_guide(request: Request) -> Any:
    """The request's constraint walker (:func:`nanoserve.structured.guide_of`), or None."""
    from nanoserve.structured import guide_of  # lazy: unconstrained batches never load it

    return guide_of(request)
