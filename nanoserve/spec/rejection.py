"""The rejection sampler: accept a prefix of the drafts so that output is exactly as without them.

A request with drafts d1 .. dk gets k + 1 logits rows from one verification pass: row j is
the target model's distribution p_j for the token after d1 .. dj (row 0: after the last
committed token). The sampler returns the accepted drafts and one more token.

Greedy (temperature 0)
    accept d_j while d_j == argmax p_{j-1}; at the first mismatch emit argmax p_{j-1}
    (the correction); if all k are accepted, emit argmax p_k (the bonus). The tokens are
    the ones plain greedy decoding gives, by construction.

Random (Leviathan et al. 2023; Chen et al. 2023)
    p_j is the distribution plain sampling would draw from (logits processors, penalties,
    temperature, top-k, top-p, min-p: ``nanoserve.sampling.probabilities``); q_j is the
    draft's (one-hot for n-gram drafts). Draft x = d_j is accepted with probability
    min(1, p(x) / q(x)). On rejection the token is drawn from the residual
    normalize(max(0, p - q)), and the step ends. If every draft is accepted, a bonus token
    is drawn from p_k. The committed token then has distribution exactly p:

        P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) * max(0, p(x) - q(x)) / Z
             = min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x)       (Z = 1 - sum_y min(p, q))

    and the acceptance rate of a draft is sum_x min(p(x), q(x)). A rejected draft x never
    comes back as the correction: the residual is 0 at x (there p(x) < q(x)).

Each request draws from its own seeded generator, so the same seed gives the same text
for the same configuration. :class:`RejectionSampler` implements the engine's
:class:`~nanoserve.interfaces.Sampler`: requests without drafts are sampled as usual. It
takes the two acceptance rules as constructor arguments (these two functions by default;
``EngineConfig.acceptance`` names a file or module defining others, lab 07's seam).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from nanoserve.sampling import (
    SampleResult,
    add_logprobs,
    draw,
    forced_results,
    jumps_forward,
    probabilities,
    sample,
)

if TYPE_CHECKING:
    from nanoserve.request import Request
    from nanoserve.sampling import Sampler


def accept_greedy(target: np.ndarray, drafts: list[int]) -> list[int]:  # target [k + 1, V]
    """The accepted drafts and the correction or bonus token, for greedy decoding."""
    best = np.argmax(target, axis=-1)
    out: list[int] = []
    for j, d in enumerate(drafts):
        if int(best[j]) != d:
            break
        out.append(d)
    out.append(int(best[len(out)]))
    return out


def accept_random(
    p: np.ndarray,  # [k + 1, V] float64, target distributions (rows sum to 1)
    drafts: list[int],  # [k]
    q: np.ndarray | None,  # [k, V] float64 draft distributions, or None: one-hot on each draft
    generator: np.random.Generator,
) -> list[int]:
    """The accepted drafts and the correction or bonus token: every token distributed as ``p``."""
    out: list[int] = []
    for j, x in enumerate(drafts):
        q_x = 1.0 if q is None else float(q[j, x])
        p_x = float(p[j, x])
        if generator.random() * q_x < p_x:  # accept with probability min(1, p/q)
            out.append(x)
            continue
        if q is None:
            residual = p[j].copy()
            residual[x] = 0.0
        else:
            residual = np.maximum(p[j] - q[j], 0.0)
        if residual.sum() <= 0.0:  # p == q up to rounding: nothing to correct towards
            residual = p[j]
        out.append(draw(residual / residual.sum(), generator))
        return out
    out.append(draw(p[len(drafts)], generator))
    return out


def check_accepted(tokens: list[int], drafts: list[int], vocab_size: int) -> None:
    """Raise ValueError unless ``tokens`` is the accepted drafts, then a token of the vocabulary
    that is not the next draft (a correction never equals the draft it replaces)."""
    a = len(tokens) - 1
    if not 0 <= a <= len(drafts) or list(tokens[:a]) != list(drafts[:a]) or (a < len(drafts) and tokens[a] == drafts[a]):
        raise ValueError(f"the acceptance rule returned {list(tokens)} for drafts {list(drafts)}: want the accepted drafts, then one more token")
    if not 0 <= int(tokens[-1]) < vocab_size:
        raise ValueError(f"the acceptance rule returned token {tokens[-1]}, outside the vocabulary (0 .. {vocab_size - 1})")


class RejectionSampler:
    """The engine's sampler when speculation is on: verification rows go through rejection.

    ``sampler`` is the configured sampler; its ``process`` (logits processors, penalties)
    is applied to every row, with each verification row seeing its own history
    (:func:`nanoserve.sampling.row_history`), so p is exactly plain decoding's distribution.
    ``accept_greedy`` and ``accept_random`` decide each drafted request's tokens; any pair
    with the signatures and contracts of this module's functions will do.
    """

    def __init__(
        self,
        sampler: Sampler,
        kernels: Any,
        accept_greedy: Callable[[np.ndarray, list[int]], list[int]] = accept_greedy,
        accept_random: Callable[[np.ndarray, list[int], np.ndarray | None, np.random.Generator], list[int]] = accept_random,
    ) -> None:
        if not hasattr(sampler, "process"):
            raise TypeError(
                f"speculative decoding needs a sampler with process(logits, requests, num_logits); "
                f"{type(sampler).__name__} has none"
            )
        self.sampler = sampler
        self.kernels = kernels
        self.accept_greedy = accept_greedy
        self.accept_random = accept_random

    def sample(
        self, logits: np.ndarray, requests: list[Request], num_logits: list[int]
    ) -> list[list[SampleResult]]:  # logits [sum(num_logits), V] -> per request: accepted drafts + 1
        drafting = [bool(r.spec_token_ids) and n == len(r.spec_token_ids) + 1 for r, n in zip(requests, num_logits)]
        if not any(drafting):
            return self.sampler.sample(logits, requests, num_logits)
        processed, _ = self.sampler.process(logits, requests, num_logits)  # type: ignore[attr-defined]
        starts = np.concatenate([[0], np.cumsum(num_logits)]).astype(int)
        out: list[list[SampleResult]] = [[] for _ in requests]
        plain = [i for i, d in enumerate(drafting) if not d and num_logits[i] > 0]
        if plain:
            rows = [row for i in plain for row in range(starts[i], starts[i + 1])]
            params = [requests[i].params for i in plain for _ in range(num_logits[i])]
            gens = [requests[i].generator for i in plain for _ in range(num_logits[i])]
            results = sample(processed[rows], params, gens, self.kernels, logits[rows])
            at = 0
            for i in plain:
                out[i], at = results[at : at + num_logits[i]], at + num_logits[i]
                if num_logits[i] == 1 and jumps_forward(requests[i].params):  # a constraint's forced tokens
                    out[i] = out[i] + forced_results(requests[i], out[i][0].token_id)
        for i, request in enumerate(requests):
            if not drafting[i]:
                continue
            rows = slice(starts[i], starts[i + 1])
            if request.params.greedy:
                tokens = self.accept_greedy(processed[rows], request.spec_token_ids)
            else:
                p = probabilities(processed[rows], [request.params] * num_logits[i], self.kernels)
                tokens = self.accept_random(p, request.spec_token_ids, request.spec_probs, request.generator)
            check_accepted(tokens, request.spec_token_ids, logits.shape[1])
            results = [SampleResult(int(t)) for t in tokens]
            add_logprobs(results, logits[rows][: len(results)], [request.params] * len(results))
            out[i] = results
        return out
