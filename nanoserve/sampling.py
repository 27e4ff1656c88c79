"""Sampling: per-request parameters, and turning a batch of logits into next tokens.

Pipeline for one row of logits:

    logits processors (masks) -> greedy argmax if temperature == 0, else:
    logits / temperature -> top-k filter -> top-p filter -> min-p filter -> softmax -> draw

Each request owns a seeded ``numpy.random.Generator``, so a request's samples depend only
on its own seed and its own logits, never on which other requests share the batch.
Log-probabilities reported to the user are those of the raw model distribution
(``log_softmax(logits)``), before logits processors, temperature and filters.
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


@dataclass
class SamplingParams:
    """What to generate and how. Validated on creation; errors name the bad field."""

    max_tokens: int = 64
    temperature: float = 1.0  # 0 (or < 1e-5) = greedy
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # [0, 1]; 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, never included in the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0: the chosen token's logprob + top k
    logits_processors: list[LogitsProcessor] = field(default_factory=list)  # applied in order, first

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

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 act as 0: dividing by them would overflow float32 logits."""
        return self.temperature < GREEDY_BELOW

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


class Sampler:
    """The engine's sampler: each request's logits processors, then :func:`sample` per row.

    A processor must leave at least one finite logit in its row.
    """

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels  # the backend's kernels (top_k_filter, top_p_filter, ...)

    def process(
        self, logits: np.ndarray, requests: list[Request], num_logits: list[int]
    ) -> tuple[np.ndarray, list[Request]]:  # [R, V] -> processed [R, V], and each row's request
        """Each request's logits processors, row by row (rows of a request see :func:`row_history`).

        Returns ``logits`` itself when nothing applies, else a processed copy.
        """
        rows: list[Request] = [r for r, n in zip(requests, num_logits) for _ in range(n)]
        processed = logits
        row = 0
        for request, n in zip(requests, num_logits):
            for j in range(n):
                for processor in request.params.logits_processors:
                    if processed is logits:
                        processed = logits.copy()  # logprobs still come from the raw model output
                    processed[row] = processor(row_history(request, j, n), processed[row])
                row += 1
        return processed, rows

    def sample(
        self, logits: np.ndarray, requests: list[Request], num_logits: list[int]
    ) -> list[list[SampleResult]]:  # logits [sum(num_logits), V] float32 -> per request, one per row
        processed, rows = self.process(logits, requests, num_logits)
        if not rows:
            return [[] for _ in requests]
        results = sample(processed, [r.params for r in rows], [r.generator for r in rows], self.kernels, logits)
        out: list[list[SampleResult]] = []
        start = 0
        for n in num_logits:
            out.append(results[start : start + n])
            start += n
        return out
