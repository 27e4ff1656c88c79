"""How many tokens to propose for each request: speculate only where it is expected to pay.

Verifying j drafts costs ``r(j) = T(j + 1 tokens) / T(1 token)`` of a plain decode step.
The policy models it as ``r(j) = 1 + c * j``: each draft row adds ``c`` of a step
(``spec_draft_cost``, default 0.2; ``bench/speculative.py`` measures r(k) on the machine).
If each draft is accepted with probability ``a`` once the ones before it were, a
verification of j drafts commits on average

    E(j) = 1 + a + a^2 + .. + a^j            tokens (the first is the target's own)

so it commits ``E(j) / r(j)`` tokens per step's worth of time, against 1 for plain
decoding. Per request the policy proposes the j in 0 .. k with the most:

    a = 0.9, c = 0.2:  j = 1 .. 4 -> 1.58 1.94 2.15 2.28      k = 4: 4 drafts
    a = 0.5, c = 0.2:  j = 1 .. 4 -> 1.25 1.25 1.17 1.08      1 draft (ties: the fewer)
    a <= c:            E(1) / r(1) = (1 + a) / (1 + c) <= 1   none

``a`` is each request's own estimate, from its verifications: j drafts of which n were
accepted are n acceptances in n + 1 tries (all j accepted: j in j tries), and
``a`` = acceptances / tries, both kept as exponential moving averages (weight
``EMA_WEIGHT`` per verification) that start at one try, accepted, so that a new request
gets all k drafts. A request offered none still gets one draft every ``PROBE_EVERY``-th
step, so that a request whose text turns repetitive later (a quoted passage) is noticed.

A large batch. A decode step is bound by reading the weights only while it has few rows;
past that its cost grows with every row, drafts included, and r(j) of one sequence no
longer describes it. So the drafts of one step are capped at ``max_rows - (requests
decoding)`` in all, shared out in batch order. With ``max_rows`` = 8 (the default), one
stream gets up to 7 drafts, two share 6 (k = 4: 4 and 2), and 8 streams never speculate.
Measured on the cpu backend (fp32 SmolLM2, context 256, ``bench/forward_rows.py``): a 5-row
forward pass costs 1.5-1.7x a 1-row one, a 9-row pass 2.1-2.4x, and with 8 streams one
draft each (16 rows against 8) made decoding 5% slower although 70% of the drafts were
accepted (``bench/speculative.py``).

Everything here is counted, never timed, so the same requests, batched the same way, get
the same draft counts on every run: a seeded request's text does not depend on the
machine's speed.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoserve.request import Request

EMA_WEIGHT = 0.3  # weight of the latest verification in a request's averages
PROBE_EVERY = 8  # a request offered no drafts still gets one on every 8th step


@dataclass
class _Track:
    accepted: float = 1.0  # moving average of drafts accepted per verification
    tries: float = 1.0  # moving average of drafts tried per verification (accepted + the first rejected)
    steps: int = 0  # proposals considered

    @property
    def acceptance(self) -> float:
        """The estimated chance that a draft is accepted, given the ones before it were."""
        return self.accepted / self.tries


def best_num_drafts(acceptance: float, draft_cost: float, k: int) -> int:
    """The j in 0 .. k with the most tokens per step, ``E(j) / (1 + draft_cost * j)`` (the
    module docstring); the smallest such j on ties.

    >>> best_num_drafts(0.9, 0.2, 4), best_num_drafts(0.5, 0.2, 4), best_num_drafts(0.15, 0.2, 4)
    (4, 1, 0)
    """
    best, best_rate = 0, 1.0
    expected, power = 1.0, 1.0  # E(j) and acceptance ** j
    for j in range(1, k + 1):
        power *= acceptance
        expected += power
        rate = expected / (1.0 + draft_cost * j)
        if rate > best_rate + 1e-12:
            best, best_rate = j, rate
    return best


class SpeculationPolicy:
    """Per-request draft counts, from each request's acceptance, the cost of a draft row,
    and the size of the batch."""

    def __init__(self, num_speculative_tokens: int, max_rows: int = 8, draft_cost: float = 0.2) -> None:
        self.k = num_speculative_tokens
        self.max_rows = max_rows
        self.draft_cost = draft_cost
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
            k = best_num_drafts(track.acceptance, self.draft_cost, self.k)
            if k == 0 and track.steps % PROBE_EVERY == 0:
                k = 1
            room = min(
                request.max_tokens - len(request.output_token_ids) - 1,
                max_model_len - request.num_tokens - 1,
            )
            k = max(0, min(k, room, spare_rows))
            spare_rows -= k
            out.append(k)
        return out

    def observe(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """A verification of ``num_drafts`` drafts accepted the first ``num_accepted`` of them."""
        if num_drafts == 0:
            return
        track = self.tracks.setdefault(request.request_id, _Track())
        tries = num_accepted + (1 if num_accepted < num_drafts else 0)
        track.accepted = (1 - EMA_WEIGHT) * track.accepted + EMA_WEIGHT * num_accepted
        track.tries = (1 - EMA_WEIGHT) * track.tries + EMA_WEIGHT * tries

    def finish(self, request: Request) -> None:
        self.tracks.pop(request.request_id, None)
