"""How many tokens to propose for each request: speculate only where it can pay.

Verifying k drafts costs r(k) = T(k + 1 tokens) / T(1 token) of a plain decode step, and
commits 1 + (accepted drafts) tokens. Two things make it a loss, and the rule turns
speculation down for each:

* **Low acceptance.** Each request keeps an exponential moving average of the fraction of
  its drafts accepted (``ema``, weight ``EMA_WEIGHT`` per verification, starting at 1). It
  is offered ``ceil(k * min(1, 2 * ema))`` drafts, so a request whose drafts are mostly
  rejected is offered one. Below ``OFF_BELOW`` it is offered none, except on every
  ``PROBE_EVERY``-th step, so that a request whose text turns repetitive later (a quoted
  passage) is noticed.
* **A large batch.** A decode step is bound by reading the weights only while it has few
  rows; past that its cost grows with every row, drafts included. So the drafts of one
  step are capped at ``max_rows - (requests decoding)`` in all, shared out in batch
  order. With ``max_rows`` = 8 (the default), one stream gets up to 7 drafts, two share
  6 (k = 4: 4 and 2), and 8 streams never speculate. Measured on the cpu backend (fp32 SmolLM2, context
  256, ``bench/forward_rows.py``): a 5-row forward pass costs 1.5-1.7x a 1-row one, a
  9-row pass 2.1-2.4x, and with 8 streams one draft each (16 rows against 8) made
  decoding 5% slower although 70% of the drafts were accepted (``bench/speculative.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanoserve.request import Request

EMA_WEIGHT = 0.3  # weight of the latest verification in a request's acceptance average
OFF_BELOW = 0.1  # below this average acceptance, propose only on probe steps
PROBE_EVERY = 8  # a request with low acceptance still proposes on every 8th step


@dataclass
class _Track:
    ema: float = 1.0  # average fraction of drafts accepted
    steps: int = 0  # proposals considered


class SpeculationPolicy:
    """Per-request draft counts, from each request's acceptance and the size of the batch."""

    def __init__(self, num_speculative_tokens: int, max_rows: int = 8) -> None:
        self.k = num_speculative_tokens
        self.max_rows = max_rows
        self.tracks: dict[str, _Track] = {}

    def num_drafts(self, requests: list[Request], max_model_len: int) -> list[int]:
        """How many drafts to ask for, for each of ``requests`` (all decoding), in order.

        Never past the request's ``max_tokens`` (the step already commits one token) or the
        context: k drafts and the one committed token need k + 1 more positions.
        """
        spare_rows = self.max_rows - len(requests)
        out: list[int] = []
        for request in requests:
            track = self.tracks.setdefault(request.request_id, _Track())
            track.steps += 1
            if track.ema < OFF_BELOW and track.steps % PROBE_EVERY:
                k = 0
            else:
                k = max(1, math.ceil(self.k * min(1.0, 2 * track.ema)))
            room = min(
                request.max_tokens - len(request.output_token_ids) - 1,
                max_model_len - request.num_tokens - 1,
            )
            k = max(0, min(k, room, spare_rows))
            spare_rows -= k
            out.append(k)
        return out

    def observe(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """A verification of ``num_drafts`` drafts accepted ``num_accepted`` of them."""
        if num_drafts == 0:
            return
        track = self.tracks.setdefault(request.request_id, _Track())
        track.ema = (1 - EMA_WEIGHT) * track.ema + EMA_WEIGHT * num_accepted / num_drafts

    def finish(self, request: Request) -> None:
        self.tracks.pop(request.request_id, None)
