"""One request's walk through its constraint: the state of each logits row, its mask, forced tokens.

The automaton state of a logits row is a function of the tokens before it
(:func:`nanoserve.sampling.row_history`: outputs, plus the drafts before that row when a
speculative step verifies them). It is computed, not stored by the engine: walking the
token index over the history. Outputs only ever grow, so each request keeps the
(length, state) of its last walk over its outputs, and a step walks only the new tokens::

    outputs  t0 t1 t2 | t3 t4        drafts d0 d1
             cached --^ walked now   walked per row, never cached

This stays right under preemption (the outputs are kept), chunked prefill (no row, no
walk), speculation and rollback (drafts are never cached) without any engine hook.

Jump-forward. After the sampled token, while the new state allows exactly one token (a
forced run of the index, or the one EOS after a finished answer), that token is appended
without sampling; the scheduler computes the appended tokens as a prefill chunk in the
next step. Since the masked distribution of such a state is a point mass, sampling it
would have given the same token: the output distribution is unchanged. To keep a seeded
request's random stream where it would have been, one uniform draw is spent per forced
token of a non-greedy request, as :func:`nanoserve.sampling.draw` would have.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import numpy as np

from nanoserve.structured.fsm import DEAD
from nanoserve.structured.index import TokenIndex

if TYPE_CHECKING:
    from nanoserve.request import Request


class RequestGuide:
    """A request's constraint and the cached state after its first ``length`` outputs."""

    def __init__(self, index: TokenIndex) -> None:
        self.index = index
        self.length = 0  # outputs walked so far
        self.state = index.initial  # the state after them (DEAD if they broke the constraint)

    def state_after(self, request: Request, history: list[int]) -> int:
        """The state after ``history`` (the request's outputs, then possibly drafts)."""
        outputs = request.output_token_ids
        committed = min(len(outputs), len(history))
        if committed < self.length:  # not the outputs this cache was built on: start over
            self.length, self.state = 0, self.index.initial
        if committed > self.length:
            self.state = self.index.walk(self.state, outputs[self.length : committed])
            self.length = committed
        return self.index.walk(self.state, history[committed:])

    def tokens_left(self, request: Request, history: list[int]) -> int:
        """Tokens the request may still produce after ``history``, the next one included."""
        return request.max_tokens - len(history)

    def mask_row(self, request: Request, history: list[int], row: np.ndarray) -> np.ndarray:  # [V] -> [V]
        """``row`` with every token the constraint forbids after ``history`` set to -inf.

        A row whose history already broke the constraint (a verification row after a draft
        the automaton rejects, which the verifier can never accept) is left as it is.
        """
        state = self.state_after(request, history)
        if state == DEAD:
            return row
        allowed = self.index.allowed_within(state, self.tokens_left(request, history))
        allowed = allowed[allowed < row.shape[0]]
        out = np.full_like(row, -np.inf)
        out[allowed] = row[allowed]
        return out

    def forced_tokens(self, request: Request, history: list[int]) -> list[int]:
        """The tokens jump-forward appends after ``history`` (which ends with the sampled token)."""
        state = self.state_after(request, history)
        left = self.tokens_left(request, history)
        stops = request.eos_token_ids | set(request.params.stop_token_ids)
        forced: list[int] = []
        while left > 0 and state != DEAD:
            token = self.index.forced_token(state, left)
            if token is None:
                break
            forced.append(token)
            left -= 1
            if token in stops:
                break
            state = self.index.step(state, token)
        return forced

    def valid_prefix(self, request: Request, drafts: list[int]) -> int:
        """How many of ``drafts`` (proposed after all outputs) the constraint allows, in order."""
        history = list(request.output_token_ids)
        state = self.state_after(request, history)
        for k, token in enumerate(drafts):
            if state == DEAD:
                return k
            allowed = self.index.allowed_within(state, request.max_tokens - len(history) - k)
            if not np.isin(token, allowed):
                return k
            state = self.index.step(state, token)
        return len(drafts)


_GUIDES: dict[int, RequestGuide] = {}  # id(request) -> its guide, dropped when the request is


def guide_for(request: Request, index: TokenIndex) -> RequestGuide:
    """The request's guide (made on first use, forgotten when the request object goes away)."""
    guide = _GUIDES.get(id(request))
    if guide is None or guide.index is not index:
        guide = _GUIDES[id(request)] = RequestGuide(index)
        weakref.finalize(request, _GUIDES.pop, id(request), None)
    return guide
