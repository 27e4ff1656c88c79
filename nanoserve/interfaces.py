"""The engine's parts and their contracts: what the engine is built from, and what a lab swaps.

    LLMEngine
      |-- Scheduler -------------- decides each step's work; owns every request's progress
      |     `-- KVManager -------- block tables: which blocks hold each request's tokens
      |           |-- BlockAllocator   ref-counted block ids
      |           `-- PrefixCache      cached blocks by their tokens (the allocator's Evictor), or none
      |-- ModelRunner ------------ one ragged forward pass (not swappable: it is the model)
      |-- Sampler ---------------- logits rows -> tokens, per request
      `-- Speculator ------------- drafts for decoding requests (nanoserve.spec), when configured

Each contract is a ``typing.Protocol``: an implementation need not inherit from it, it only
has to have the methods (``nanoserve.components.require`` checks that, naming what is
missing). The engine builds the parts by constructor injection, each from the part below
it, from the names in :class:`nanoserve.config.EngineConfig`:

    allocator = BlockAllocator(num_blocks)
    cache     = PrefixCache(allocator, block_size)          (unless prefix_cache="none")
    kv        = KVManager(allocator, block_size, cache)
    scheduler = Scheduler(kv, max_num_batched_tokens, max_num_seqs)
    sampler   = Sampler(kernels)

Every part keeps its invariants in ``check_invariants()``, which tests call after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from nanoserve.stats import KVCacheStats, PrefixCacheStats, SchedulerStats

if TYPE_CHECKING:  # annotations only: request.py, sampling.py and spec/ngram.py import nothing from here
    from nanoserve.request import Request
    from nanoserve.sampling import SampleResult
    from nanoserve.spec.ngram import Draft


class Evictor(Protocol):
    """A prefix cache, as the block pool sees it. Two designs fit:

    * it holds a reference to each block it keeps (``BlockAllocator.share``), so those
      blocks are not free; ``evict`` drops some of them (``BlockAllocator.free``) and says
      how many (the radix tree);
    * it holds no reference and indexes free blocks, which stay valid on the free list until
      the pool hands them out again: ``forget`` is called then (the hash cache's lazy
      eviction).
    """

    @property
    def num_evictable(self) -> int:
        """Blocks ``evict`` could free right now (held by nothing else)."""
        ...

    def evict(self, num_blocks: int) -> int:
        """Free up to ``num_blocks`` blocks back to the allocator; returns how many it freed."""
        ...

    def forget(self, block: int) -> None:
        """The pool is handing out ``block``, which was free: it no longer holds cached K/V."""
        ...

    def indexes(self, block: int) -> bool:
        """Whether ``block``, just freed, still holds K/V the cache can hand out again (the
        second design): the pool then keeps it free as long as it can."""
        ...


class BlockAllocator(Protocol):
    """A fixed set of ``num_blocks`` KV blocks, handed out by id and reference-counted.

    Contract:
      * ``allocate(n)`` returns ``n`` distinct blocks, each now with refcount 1, or raises
        ``NoFreeBlocksError`` and changes nothing. When fewer than ``n`` are free it first asks
        its evictor (if one is set) to free the difference, and it tells the evictor
        (``forget``) of every free block it hands out.
      * ``share(b)`` adds a holder to block ``b`` (taking it off the free list if it was free).
      * ``free(blocks)`` drops one holder of each; a block whose refcount reaches 0 is free.
        Freeing a free block is an error.
      * ``num_free`` counts blocks with refcount 0; ``num_free + num_used == num_blocks``.
      * ``num_allocatable`` is what ``allocate`` can give now: free + evictable.
    """

    num_blocks: int

    @property
    def num_free(self) -> int: ...

    @property
    def num_used(self) -> int: ...

    @property
    def num_allocatable(self) -> int: ...

    def allocate(self, n: int) -> list[int]: ...

    def share(self, block: int) -> None: ...

    def free(self, blocks: list[int]) -> None: ...

    def set_evictor(self, evictor: Evictor | None) -> None:
        """Where ``allocate`` turns when the free list runs short (a prefix cache)."""
        ...

    def check_invariants(self, holders: dict[int, int] | None = None) -> None:
        """Assert the pool is consistent; ``holders`` (block -> holders outside) must match refcounts."""
        ...


@dataclass(frozen=True)
class ComputedPrefix:
    """Blocks that already hold the K/V of a request's first ``num_tokens`` tokens."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # a multiple of the block size, always < the request's num_tokens
    handle: Any = None  # what the prefix cache locks for the request (a radix node)


class PrefixCache(Evictor, Protocol):
    """Reusable K/V blocks, found by the tokens they hold (radix tree or hash chain).

    Contract:
      * ``match_prefix(tokens)`` returns the cached blocks of the longest cached prefix of
        ``tokens`` in whole blocks, never covering the last token (so one is always computed).
      * ``insert(tokens, blocks)`` caches the full blocks of ``tokens``, whose K/V
        ``blocks[i]`` holds; blocks already cached for the same prefix stay as they are.
        Returns a handle to ``lock``.
      * ``lock(handle)``: a running request uses the blocks up to ``handle``; they are not
        evicted until ``unlock(handle)``.
      * As an :class:`Evictor` it gives back cached blocks nobody uses when the pool runs short.
    """

    block_size: int
    holds_references: bool  # True: it holds a reference to each cached block (radix); False: it
    # indexes blocks that wait, free, on the pool's free list (hash)

    def match_prefix(self, tokens: list[int]) -> ComputedPrefix: ...

    def insert(self, tokens: list[int], blocks: list[int]) -> Any: ...

    def lock(self, handle: Any) -> None: ...

    def unlock(self, handle: Any) -> None: ...

    def cached_blocks(self) -> dict[int, bool]:
        """Every cached block -> whether a lock protects it now."""
        ...

    def stats(self) -> PrefixCacheStats: ...

    def check_invariants(self) -> None: ...


class KVManager(Protocol):
    """Block tables: which blocks hold each request's tokens, on top of a BlockAllocator.

    Token ``t`` of a request lives at slot ``table[t // B] * B + t % B``.

    Contract:
      * ``get_computed_prefix(request)`` reports blocks that already hold the request's first
        tokens (a prefix-cache hit). With no prefix cache it is ``ComputedPrefix()``: none.
        It never covers the last known token, so at least one token is always computed.
      * ``allocate_slots(request, num_new_tokens, num_lookahead_tokens, prefix)`` makes the
        table cover ``request.num_computed_tokens + num_new_tokens + num_lookahead_tokens``
        tokens (taking ``prefix``'s blocks first when given), or returns False and changes
        nothing. Lookahead slots are for tokens a step may try and then roll back
        (speculative drafts).
      * ``cache_blocks(request)`` runs after each step that computed tokens of the request:
        a prefix cache may index its full computed blocks (nanoserve does once the prompt is
        computed).
      * ``free(request)`` gives up the request's blocks; a prefix cache first indexes the full
        blocks of its computed tokens, so a later turn, or the request itself after a
        preemption, finds them.
      * Only a table's last block may be partly empty.
    """

    block_size: int
    allocator: BlockAllocator

    def get_computed_prefix(self, request: Request) -> ComputedPrefix: ...

    def allocate_slots(self, request: Request, num_new_tokens: int, num_lookahead_tokens: int = 0, prefix: ComputedPrefix | None = None) -> bool: ...

    def cache_blocks(self, request: Request) -> None: ...

    def free(self, request: Request) -> None: ...

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids in token order (empty if it holds none)."""
        ...

    def slot_mapping(self, request_id: str, start: int, end: int) -> np.ndarray:  # -> [end - start] int64
        """Pool slots of tokens ``start .. end-1`` of the request."""
        ...

    def stats(self) -> KVCacheStats: ...

    def check_invariants(self) -> None: ...


@dataclass
class ScheduledBatch:
    """One step's work: requests in batch order, how many tokens each computes, and how many
    of its last positions need logits (1 when the step reaches the request's last known token;
    k + 1 for a k-token speculative verification; 0 for a prompt chunk that is not the last)."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_logits: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler(Protocol):
    """Continuous batching under a token budget, and the one owner of a request's progress.

    Contract:
      * ``schedule()`` returns at most ``max_num_batched_tokens`` tokens of work for at most
        ``max_num_seqs`` requests, and every scheduled request holds slots for its tokens. It
        may preempt (free a request's blocks, reset its ``num_computed_tokens`` to 0, keep its
        outputs, queue it again); preempted requests are listed in the batch.
      * ``update_from_output(batch, sampled)`` is the only place a step's results enter the
        requests. For each scheduled request, in order: advance ``num_computed_tokens`` by its
        ``num_new_tokens``; append the sampled tokens one by one, checking the stop conditions
        after each (stop token, stop string, max_tokens) and dropping what follows a stop;
        roll back the computed tokens a step tried but did not keep; free the blocks of
        requests that finished. Returns ``(request, new token ids)`` for every request that
        got tokens or finished.
      * ``rollback(request, n)`` forgets the K/V of the last ``n`` computed tokens: they are
        computed again (their slots overwritten) by a later step.
      * ``finish_request(request, reason)`` ends a request wherever it is (abort, error)
        and frees its blocks at once.
      * Speculative decoding needs a scheduler that schedules ``request.spec_token_ids``
        with the decode and rolls back the rejected ones; it says so with the class attribute
        ``supports_speculation = True``. The engine refuses ``speculative`` with any other.
    """

    max_num_batched_tokens: int
    max_num_seqs: int

    def add_request(self, request: Request) -> None: ...

    def schedule(self) -> ScheduledBatch: ...

    def update_from_output(
        self, batch: ScheduledBatch, sampled: list[list[SampleResult]]
    ) -> list[tuple[Request, list[int]]]: ...

    def rollback(self, request: Request, num_tokens: int) -> None: ...

    def finish_request(self, request: Request, reason: str) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> SchedulerStats: ...

    def check_invariants(self) -> None: ...


LogitsProcessor = Callable[[list[int], np.ndarray], np.ndarray]
"""``(output token ids so far, logits [V] float32) -> logits [V]``; e.g. -inf on banned tokens."""


class Sampler(Protocol):
    """Turns logits rows into tokens, per request.

    Contract: ``sample(logits, requests, num_logits)`` gets the rows of every request in
    batch order (``num_logits[i]`` rows for ``requests[i]``, possibly 0) and returns, per
    request, one :class:`~nanoserve.sampling.SampleResult` per row. Each request's
    ``params.logits_processors`` are applied to its rows first, then its presence, frequency
    and repetition penalties, both before the greedy argmax shortcut; row j of a request's n
    rows sees the outputs before it (:func:`nanoserve.sampling.row_history`). A request's
    draws use only its own ``generator``, so they never depend on the rest of the batch.

    Structured output: a constrained request's rows are masked by its automaton (forbidden
    tokens -inf, EOS only where the answer is complete) after its logits processors and
    before its penalties. Its results may be followed by *forced* tokens (jump-forward:
    :mod:`nanoserve.structured`): where the constraint allows exactly one next token, it is
    appended as a further ``SampleResult`` without sampling. The scheduler appends every
    result in order, checking stop conditions after each, and advances
    ``num_computed_tokens`` by the chunk only, so forced tokens are computed as a prefill
    chunk in the next step. Forced tokens are whole tokens of the constraint's own index
    (inside a fixed run of text, the tokenizer's encoding of the rest of that run), never a
    re-tokenisation of text already emitted, and each one is the only token its state
    allows, so the output distribution is the one sampling would give.

    Speculative decoding (``nanoserve.spec.RejectionSampler``) wraps the configured sampler
    and also needs its ``process(logits, requests, num_logits)``: the processed rows, from
    which the target distribution of each draft is computed.
    """

    def sample(
        self, logits: np.ndarray, requests: list[Request], num_logits: list[int]
    ) -> list[list[SampleResult]]:  # logits [sum(num_logits), V] float32
        ...


class Proposer(Protocol):
    """Guesses the next tokens of decoding requests, for speculative decoding (``nanoserve.spec``).

    Contract: ``propose(requests, num_tokens)`` returns one ``Draft`` per request, in order,
    with at most ``num_tokens[i]`` token ids (possibly none) and, for a sampled draft, their
    distributions q (``Draft.probs``; None means one-hot). Any guess is safe: verification
    keeps only the ones the target model agrees with. ``finish(request)`` is called once a
    request has ended: forget whatever is kept for it. Built from ``EngineConfig.proposer``
    with the arguments of the ``--speculative`` method it replaces.
    """

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[Draft]:
        """At most ``num_tokens[i]`` drafts for each ``requests[i]``, in order."""
        ...

    def finish(self, request: Request) -> None:
        """``request`` has ended: forget whatever is kept for it."""
        ...


INTERFACES: dict[str, Any] = {
    "block_allocator": BlockAllocator,
    "prefix_cache": PrefixCache,
    "kv_manager": KVManager,
    "scheduler": Scheduler,
    "sampler": Sampler,
    "proposer": Proposer,
}
"""The swappable seams by their EngineConfig field name."""
