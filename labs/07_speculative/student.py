"""Lab 07: speculative decoding, the n-gram proposer (prompt lookup) and the rejection sampler.

Write the four pieces below. The grader hands them to the real engine through its two
speculation seams, so every draft comes from your proposer and every verified token from
your acceptance rules:

    EngineConfig(speculative="ngram", proposer="student.py:NgramProposer", acceptance="student.py")

Import nothing from ``nanoserve.spec``. NumPy and the standard library are fine, and so is
``nanoserve.sampling.draw(probs, generator)``: one token from a [V] distribution by inverse CDF.

    python -m nanoserve lab check 07 student.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nanoserve.request import Request

__all__ = ["Draft", "NgramProposer", "accept_greedy", "accept_random", "propose_ngram"]


@dataclass
class Draft:
    """Guessed tokens for one request (given: the engine reads these two fields).

    ``probs`` is [len(token_ids), V] float64 for a sampled draft; None means one-hot on each
    token, which is what an n-gram draft is.
    """

    token_ids: list[int]
    probs: np.ndarray | None = None


# --- (a) the proposer ------------------------------------------------------------------------
def propose_ngram(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the longest earlier occurrence of a suffix of ``tokens``.

    Try suffix lengths n from ``max_n`` down to ``min_n``; the first n whose last-n tokens
    also occur *earlier* (an occurrence starting before ``len(tokens) - n``) decides, and among
    its earlier occurrences the latest one wins. Return the (at most ``k``) tokens that
    followed it. An occurrence may overlap the suffix (a repeating pattern proposes its own
    continuation). Return [] when no n in [min_n, max_n] has an earlier occurrence, or k < 1.

    >>> propose_ngram([1, 2, 3, 4, 2, 3], min_n=2, max_n=3, k=4)   # 2 3 occurred at 1..2
    [4, 2, 3]
    >>> propose_ngram([4, 4, 4], min_n=1, max_n=2, k=3)            # 4 4 occurred at 0..1
    [4]
    """
    raise NotImplementedError("Lab 07: write propose_ngram")


class NgramProposer:
    """Prompt-lookup drafts for each request, from its own prompt + output tokens.

    The engine builds it as ``NgramProposer(prompt_lookup_min, prompt_lookup_max)`` and calls
    ``propose`` after every step for the requests that are decoding.
    """

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[Draft]:
        """One ``Draft`` per request, in order: at most ``num_tokens[i]`` tokens for ``requests[i]``.

        A request's known tokens are ``request.token_ids(0, request.num_tokens)``.
        """
        raise NotImplementedError("Lab 07: write NgramProposer.propose")

    def finish(self, request: Request) -> None:
        """Nothing to forget: this proposer keeps no state per request."""


# --- (b) the acceptance rules ----------------------------------------------------------------
def accept_greedy(target: np.ndarray, drafts: list[int]) -> list[int]:  # target [k + 1, V], drafts [k]
    """The accepted drafts and the correction or bonus token, for greedy decoding.

    Row j of ``target`` is the target model's logits for the token after draft j (row 0:
    after the last committed token). Accept d_j while d_j == argmax(target[j]); at the
    first mismatch append argmax(target[j]) (the correction) and stop; if all k are accepted
    append argmax(target[k]) (the bonus). Always returns 1 .. k + 1 tokens.

    >>> accept_greedy(np.eye(5)[[1, 2, 3, 4]], [1, 0, 3])
    [1, 2]
    """
    raise NotImplementedError("Lab 07: write accept_greedy")


def accept_random(
    p: np.ndarray,  # [k + 1, V] float64, target distributions (rows sum to 1)
    drafts: list[int],  # [k]
    q: np.ndarray | None,  # [k, V] float64 draft distributions, or None: one-hot on each draft
    generator: np.random.Generator,
) -> list[int]:
    """The accepted drafts and one more token, such that every token is distributed as ``p``.

    For j = 0 .. k-1, with x = drafts[j]: accept x with probability min(1, p[j, x] / q[j, x])
    (q[j, x] = 1 for a one-hot draft). On rejection, append one token drawn from
    normalize(max(0, p[j] - q[j])) and stop. If all k are accepted, append a bonus token drawn
    from p[k]. Use only ``generator`` for randomness, so a seed fixes the output.
    """
    raise NotImplementedError("Lab 07: write accept_random")
