"""Continuous batching under one token budget, with chunked prefill and preemption.

Every step the scheduler decides how many tokens of each live request to compute:

  1. Running requests first, in arrival order. Each asks for
     ``num_tokens - num_computed_tokens`` tokens (1 for a decode, the rest of the prompt
     for a prefill), capped by what is left of ``max_num_batched_tokens``: a long prompt
     is thereby *chunked* over several steps, and its chunks share a batch with decodes.
  2. If the KV pool cannot hold a running request's new tokens, the *last* running
     request is preempted: its blocks are freed, ``num_computed_tokens`` goes back to 0,
     and it waits at the front of the queue. Its generated tokens are kept, so on resume
     it recomputes prompt + outputs and continues exactly where it was (preemption by
     recompute). Nothing is lost.
  3. Waiting requests are admitted in order while budget, ``max_num_seqs`` and blocks
     last (none are admitted in a step that had to preempt). A request whose first tokens
     are in the prefix cache starts with them computed. ``fcfs`` admits in arrival order;
     ``lpm`` (:class:`LongestPrefixMatchScheduler`) admits the longest cached prefix first.

After the forward pass, ``update_from_output`` is the one place where a step's results
enter the requests: computed tokens advance, sampled tokens are appended, stop conditions
are checked, finished requests free their blocks.

Speculative decoding (``nanoserve.spec``) adds drafts to a decoding request
(``request.spec_token_ids``): its chunk is then the last token plus the drafts, all
counted against the budget (drafts are dropped first when the budget is short), with
logits for every position. Afterwards the K/V of the rejected drafts is rolled back, before
any block is cached, so a rejected token never enters the prefix cache.

Invariants: the tokens scheduled never exceed the budget; at most ``max_num_seqs``
requests run; every scheduled request holds blocks for all its tokens.
It implements :class:`nanoserve.interfaces.Scheduler` (registered as ``"fcfs"``).
"""

from __future__ import annotations

import itertools
import time
from collections import deque

from nanoserve.interfaces import KVManager, ScheduledBatch
from nanoserve.request import Request, RequestStatus, stop_reason
from nanoserve.sampling import SampleResult
from nanoserve.stats import SchedulerStats

__all__ = ["LongestPrefixMatchScheduler", "ScheduledBatch", "Scheduler"]


class Scheduler:
    supports_speculation = True  # schedules request.spec_token_ids (the engine speculates only with such a scheduler)

    def __init__(self, kv: KVManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # --- before the forward pass ----------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = request.num_tokens - request.num_computed_tokens
            if request.spec_token_ids:  # drafts ride along with a decode, as far as the budget goes
                self._trim_drafts(request, budget - n if n == 1 else 0)
            n = min(n + len(request.spec_token_ids), budget)
            while not self.kv.allocate_slots(request, n):
                if request.spec_token_ids:  # drafts are given up before anyone is preempted
                    n -= len(request.spec_token_ids)
                    self._trim_drafts(request, 0)
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                self._add_to_batch(batch, request, n)
                budget -= n
                i += 1
        if self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            self._order_waiting()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            request = self.waiting[0]
            prefix = self.kv.get_computed_prefix(request)
            n = min(request.num_tokens - request.num_computed_tokens - prefix.num_tokens, budget)
            if not self.kv.allocate_slots(request, prefix.num_tokens + n, prefix=prefix):
                break
            request.num_computed_tokens += prefix.num_tokens
            if request.num_preemptions == 0:
                request.num_cached_tokens = prefix.num_tokens
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_to_batch(batch, request, n)
            self._admitted(request)
            budget -= n
        return batch

    def _order_waiting(self) -> None:
        """Put the waiting queue in admission order (here: as it is, arrivals in order)."""

    def _admitted(self, request: Request) -> None:
        """``request`` has just left the waiting queue for the running batch."""

    @staticmethod
    def _add_to_batch(batch: ScheduledBatch, request: Request, n: int) -> None:
        """A chunk that reaches the last known token (drafts included) needs logits for its last
        1 + drafts positions: the next token after each."""
        num_drafts = len(request.spec_token_ids)
        batch.requests.append(request)
        batch.num_new_tokens.append(n)
        batch.num_logits.append(1 + num_drafts if request.num_computed_tokens + n == request.num_tokens + num_drafts else 0)

    @staticmethod
    def _trim_drafts(request: Request, keep: int) -> None:
        """Keep the first ``keep`` (>= 0) drafts of ``request``."""
        del request.spec_token_ids[max(0, keep) :]
        if request.spec_probs is not None:
            request.spec_probs = request.spec_probs[: len(request.spec_token_ids)] if request.spec_token_ids else None

    def _preempt(self, request: Request) -> None:
        self._trim_drafts(request, 0)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # --- after the forward pass -----------------------------------------------------------
    def update_from_output(
        self, batch: ScheduledBatch, sampled: list[list[SampleResult]]
    ) -> list[tuple[Request, list[int]]]:
        """Advance every scheduled request by what its step computed and sampled (in batch order)."""
        now = time.monotonic()
        updates: list[tuple[Request, list[int]]] = []
        for request, n, results in zip(batch.requests, batch.num_new_tokens, sampled):
            drafts, request.spec_token_ids, request.spec_probs = request.spec_token_ids, [], None
            request.num_computed_tokens += n
            new: list[int] = []
            reason = None
            for result in results:
                request.output_token_ids.append(result.token_id)
                if request.params.logprobs is not None:
                    request.output_logprobs.append(result)
                new.append(result.token_id)
                reason = stop_reason(request, result.token_id)
                if reason is not None:
                    break
            if drafts:  # the K/V of rejected drafts is wrong: forget it (a later step overwrites it)
                accepted = 0  # drafts the new tokens start with (a correction never equals its draft)
                while accepted < min(len(drafts), len(new)) and drafts[accepted] == new[accepted]:
                    accepted += 1
                request.num_draft_tokens += len(drafts)
                request.num_accepted_tokens += accepted
                self.rollback(request, len(drafts) - accepted)
            self.kv.cache_blocks(request)
            if new and request.first_token_time is None:
                request.first_token_time = now
            if reason is not None:
                self.finish_request(request, reason)
            if new or reason is not None:
                updates.append((request, new))
        return updates

    def rollback(self, request: Request, num_tokens: int) -> None:
        """Forget the K/V of the last ``num_tokens`` computed tokens; a later step recomputes them."""
        if not 0 <= num_tokens <= request.num_computed_tokens:
            raise ValueError(f"cannot roll back {num_tokens} of {request.num_computed_tokens} computed tokens")
        request.num_computed_tokens -= num_tokens

    def finish_request(self, request: Request, reason: str) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finish_time = time.monotonic()

    # --- reporting ------------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            running=tuple(r.request_id for r in self.running),
            waiting=tuple(r.request_id for r in self.waiting),
            num_preemptions=self.num_preemptions,
        )

    def check_invariants(self) -> None:
        live = self.running + list(self.waiting)
        assert len({r.request_id for r in live}) == len(live), "a request is queued twice"
        assert len(self.running) <= self.max_num_seqs, f"{len(self.running)} running > max_num_seqs"
        for r in self.waiting:
            assert r.status == RequestStatus.WAITING, f"{r.request_id} waits with status {r.status}"
            assert not self.kv.block_table(r.request_id), f"waiting request {r.request_id} holds blocks"
        for r in self.running:
            assert r.status == RequestStatus.RUNNING, f"{r.request_id} runs with status {r.status}"
            held = len(self.kv.block_table(r.request_id)) * self.kv.block_size
            assert held >= r.num_computed_tokens, f"{r.request_id} computed more than it holds"


class LongestPrefixMatchScheduler(Scheduler):
    """Cache-aware admission (SGLang's ``lpm``): the waiting request with the most cached tokens first.

    Requests that share a prefix then run while it is cached, instead of one of them evicting
    it. Nothing starves: a request that later arrivals have overtaken ``MAX_PASSED_OVER``
    times goes first, like a preempted one. Ties keep arrival order.
    """

    MAX_PASSED_OVER = 32

    def __init__(self, kv: KVManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        super().__init__(kv, max_num_batched_tokens, max_num_seqs)
        self._arrivals = itertools.count()
        self.arrival: dict[str, int] = {}  # request id -> arrival number
        self.passed_over: dict[str, int] = {}  # request id -> later arrivals admitted before it

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        self.arrival[request.request_id] = next(self._arrivals)
        self.passed_over[request.request_id] = 0

    def _order_waiting(self) -> None:
        def key(request: Request) -> tuple[bool, int, int]:
            rid = request.request_id
            first = request.num_preemptions > 0 or self.passed_over[rid] >= self.MAX_PASSED_OVER
            return (not first, -self.kv.get_computed_prefix(request).num_tokens, self.arrival[rid])

        self.waiting = deque(sorted(self.waiting, key=key))

    def _admitted(self, request: Request) -> None:
        for other in self.waiting:
            if self.arrival[other.request_id] < self.arrival[request.request_id]:
                self.passed_over[other.request_id] += 1

    def finish_request(self, request: Request, reason: str) -> None:
        super().finish_request(request, reason)
        self.arrival.pop(request.request_id, None)
        self.passed_over.pop(request.request_id, None)
