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
     last (none are admitted in a step that had to preempt).

Invariants: the tokens scheduled never exceed the budget; at most ``max_num_seqs``
requests run; every scheduled request holds blocks for all its tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nanoserve.cache.kv_cache_manager import KVCacheManager
from nanoserve.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """One step's work: requests in batch order and how many new tokens each computes."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                batch.requests.append(request)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            request = self.waiting[0]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + n):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.FINISHED
