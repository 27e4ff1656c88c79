"""The engine's speculation: propose drafts after each step, count what verification accepted.

    engine.step()
      schedule -> execute -> RejectionSampler.sample -> scheduler.update_from_output
      speculator.observe(...)   per request: drafts verified, drafts accepted (metrics, policy)
      speculator.propose(...)   drafts for every decoding request, for the next step

A request is *decoding* when all its known tokens but the last have K/V; only those get
drafts. The proposer (:mod:`~nanoserve.spec.ngram`, :mod:`~nanoserve.spec.draft`, or any
:class:`~nanoserve.interfaces.Proposer`) says what to guess, the policy
(:mod:`~nanoserve.spec.policy`) how many.
"""

from __future__ import annotations

from nanoserve.interfaces import Proposer
from nanoserve.request import Request
from nanoserve.spec.policy import SpeculationPolicy
from nanoserve.stats import SpecDecodingStats


class Speculator:
    def __init__(self, proposer: Proposer, policy: SpeculationPolicy, max_model_len: int) -> None:
        self.proposer = proposer
        self.policy = policy
        self.max_model_len = max_model_len
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * policy.k

    def propose(self, requests: list[Request]) -> None:
        """Set ``spec_token_ids`` (and ``spec_probs``) of each decoding request in ``requests``."""
        decoding = [r for r in requests if not r.is_finished and r.num_computed_tokens == r.num_tokens - 1]
        if not decoding:
            return
        counts = self.policy.num_drafts(decoding, self.max_model_len)
        asked = [(r, k) for r, k in zip(decoding, counts) if k > 0]
        if not asked:
            return
        drafts = self.proposer.propose([r for r, _ in asked], [k for _, k in asked])
        for (request, k), draft in zip(asked, drafts):
            if request.params.constrained:  # a draft past the first one the constraint forbids can never be accepted
                from nanoserve import structured

                k = min(k, structured.valid_draft_prefix(request, list(draft.token_ids[:k])))
            request.spec_token_ids = list(draft.token_ids[:k])
            request.spec_probs = None if draft.probs is None or not request.spec_token_ids else draft.probs[: len(request.spec_token_ids)]

    def observe(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """One verification of ``request``'s drafts."""
        if num_drafts == 0:
            return
        self.policy.observe(request, num_drafts, num_accepted)
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    def finish(self, request: Request) -> None:
        self.policy.finish(request)
        self.proposer.finish(request)

    def stats(self) -> SpecDecodingStats:
        return SpecDecodingStats(
            num_drafts=self.num_drafts,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            num_accepted_tokens_per_pos=tuple(self.accepted_per_pos),
        )
