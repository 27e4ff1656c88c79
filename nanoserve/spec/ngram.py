"""The n-gram proposer (prompt lookup decoding): guess that text repeats.

Take the last n tokens of prompt + output. If the same n tokens occurred earlier, guess
that what followed them then follows them now:

    tokens   [.. 7 8 9 4 2 5 .. 7 8 9]        suffix 7 8 9 (n = 3) occurred before
    propose              [4 2 5 ..]           the tokens that followed it, up to k

Longer suffixes are tried first (from ``prompt_lookup_max`` down to ``prompt_lookup_min``),
and for a suffix the most recent earlier occurrence wins. This costs no forward pass at
all, and it is right surprisingly often wherever the output copies from the prompt: code
edits, reformatting, answers quoting a document. The draft distribution q is one-hot on
each guessed token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanoserve.request import Request


def propose_ngram(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the longest earlier occurrence of a suffix of ``tokens``.

    The suffix length n runs from ``max_n`` down to ``min_n``; the first n with an earlier
    occurrence decides, and among its occurrences the latest one. An occurrence may overlap
    the suffix itself (a repeating pattern proposes its own continuation). Returns [] when
    no suffix of length in [min_n, max_n] occurs earlier.

    >>> propose_ngram([1, 2, 3, 4, 2, 3], min_n=2, max_n=3, k=4)
    [4, 2, 3]
    """
    if k < 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    length = len(arr)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = arr[length - n :]
        # windows[i] = arr[i : i + n] for every start i whose window ends before the suffix does
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        starts = np.flatnonzero((windows == suffix).all(axis=1))
        if len(starts):
            follow = int(starts[-1]) + n
            return [int(t) for t in arr[follow : follow + k]]
    return []


@dataclass
class Draft:
    """Guessed tokens for one request, and the distribution each was drawn from.

    ``probs`` is [len(token_ids), V] float64 for a model's draft; None means one-hot
    (a draft chosen deterministically: the n-gram proposer, or a greedy draft model).
    """

    token_ids: list[int]
    probs: np.ndarray | None = None


class NgramProposer:
    """Prompt-lookup drafts for each request, from its own prompt + output tokens."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[Draft]:
        """At most ``num_tokens[i]`` drafts for ``requests[i]`` (possibly none)."""
        return [
            Draft(propose_ngram(r.token_ids(0, r.num_tokens), self.min_n, self.max_n, k) if k > 0 else [])
            for r, k in zip(requests, num_tokens)
        ]

    def finish(self, request: Request) -> None:
        """Nothing to forget: the proposer keeps no state per request."""
