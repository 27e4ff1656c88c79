"""Lab 05: the scheduler, continuous batching under one token budget.

Write the five methods marked ``Lab 05``; the constructor, ``add_request``,
``has_unfinished_requests``, ``rollback`` and ``stats`` are written for you. The grader hands
the class to the real engine (``EngineConfig.scheduler = "student.py:Scheduler"``), so every
step's batch comes from your ``schedule()``, and every sampled token enters its request
through your ``update_from_output()``. Import nothing from ``nanoserve.scheduler``.

This scheduler serves plain requests: no speculative drafts (the engine refuses
``--speculative`` with it), no prefix cache (the grader turns it off), FCFS admission.

    python -m nanoserve lab check 05 student.py
"""

from __future__ import annotations

import time  # noqa: F401  (first_token_time, finish_time)
from collections import deque

from nanoserve.interfaces import KVManager, ScheduledBatch
from nanoserve.request import Request, RequestStatus, stop_reason  # noqa: F401  (what your methods use)
from nanoserve.sampling import SampleResult
from nanoserve.stats import SchedulerStats

__all__ = ["Scheduler"]


class Scheduler:
    """FCFS continuous batching: chunked prefill and preemption by recompute.

    State:
      * ``waiting``: requests not running, in the order they will be admitted (a preempted
        request goes back to the *front*);
      * ``running``: admitted requests, oldest first (append on admission);
      * ``kv``: the block tables; ``kv.allocate_slots(request, n)`` makes room for ``n`` more
        tokens after ``request.num_computed_tokens`` or returns False, ``kv.free(request)``
        gives all its blocks back.

    Invariants (check them in ``check_invariants``, with ``assert``):
      * no request is queued twice; at most ``max_num_seqs`` run;
      * a waiting request has status WAITING and holds no blocks;
      * a running request has status RUNNING and holds slots for at least its
        ``num_computed_tokens`` tokens (``len(kv.block_table(id)) * kv.block_size``).
    """

    supports_speculation = False  # it does not schedule drafts: the engine refuses --speculative with it

    def __init__(self, kv: KVManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens  # the token budget of one step
        self.max_num_seqs = max_num_seqs  # the most requests running at once
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # --- before the forward pass ----------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """This step's work: at most ``max_num_batched_tokens`` tokens for at most ``max_num_seqs`` requests.

        1. Running requests first, oldest first. Each asks for ``num_tokens -
           num_computed_tokens`` tokens (1 for a decode, the rest of the prompt for a prefill),
           capped by what is left of the budget: a long prompt is *chunked* over steps.
           If ``kv.allocate_slots(request, n)`` fails, preempt the newest running request
           (``self._preempt``, list it in ``batch.preempted``) and try again; if the newest
           was this request itself, move on.
        2. Then, unless this step preempted, admit waiting requests from the front while the
           budget, the seats and ``allocate_slots`` allow (status RUNNING, append to
           ``running``). Stop at the first one that does not fit.

        Each scheduled request appends to the batch: ``requests``, ``num_new_tokens`` (n), and
        ``num_logits``: 1 if ``num_computed_tokens + n == num_tokens`` (the chunk reaches the
        last known token, so the step samples the next one), else 0.
        ``num_computed_tokens`` itself does not change here: update_from_output advances it.
        """
        raise NotImplementedError("Lab 05: write Scheduler.schedule")

    def _preempt(self, request: Request) -> None:
        """Preemption by recompute: free the request's blocks, forget its computed tokens
        (``num_computed_tokens = 0``; its outputs are kept and recomputed on resume), count it
        (``request.num_preemptions``, ``self.num_preemptions``), status WAITING, and put it at
        the front of ``waiting``. The caller has already taken it out of ``running``."""
        raise NotImplementedError("Lab 05: write Scheduler._preempt")

    # --- after the forward pass -----------------------------------------------------------
    def update_from_output(
        self, batch: ScheduledBatch, sampled: list[list[SampleResult]]
    ) -> list[tuple[Request, list[int]]]:
        """Advance every scheduled request by what its step computed and sampled (in batch order).

        For each request and its results: ``num_computed_tokens += n``; append each result's
        ``token_id`` to ``output_token_ids`` (and the result to ``output_logprobs`` when
        ``params.logprobs is not None``), checking ``stop_reason(request, token_id)`` after
        each and dropping what follows a stop; set ``first_token_time`` (``time.monotonic()``)
        when the request gets its first token; a stopped request ends with
        ``finish_request(request, reason)``. A prompt chunk that is not the last has no results.

        Returns ``(request, new token ids)`` for every request that got tokens or finished.
        """
        raise NotImplementedError("Lab 05: write Scheduler.update_from_output")

    def rollback(self, request: Request, num_tokens: int) -> None:
        """Forget the K/V of the last ``num_tokens`` computed tokens; a later step recomputes them."""
        if not 0 <= num_tokens <= request.num_computed_tokens:
            raise ValueError(f"cannot roll back {num_tokens} of {request.num_computed_tokens} computed tokens")
        request.num_computed_tokens -= num_tokens

    def finish_request(self, request: Request, reason: str) -> None:
        """End ``request`` wherever it is (running, waiting; the engine also calls this to abort):
        take it out of its queue, free its blocks, status FINISHED, ``finish_reason = reason``,
        ``finish_time = time.monotonic()``."""
        raise NotImplementedError("Lab 05: write Scheduler.finish_request")

    # --- reporting ------------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            running=tuple(r.request_id for r in self.running),
            waiting=tuple(r.request_id for r in self.waiting),
            num_preemptions=self.num_preemptions,
        )

    def check_invariants(self) -> None:
        """Assert the invariants in the class docstring (an AssertionError names the one broken)."""
        raise NotImplementedError("Lab 05: write Scheduler.check_invariants")
