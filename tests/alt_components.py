"""Other valid implementations of the engine's seams, plugged in by path in tests.

Each one differs on purpose from nanoserve's own, in a way that must not change any output:

    StackBlockPool              written from scratch (no nanoserve base class): the free list is a
                                stack, so the most recently freed block is reused first
    OneBlockAtATimeKVManager    asks the allocator for one block per call
    ShortestPromptFirstScheduler  admits waiting requests shortest prompt first
    ReferenceKernelSampler      samples with the NumPy reference kernels, whatever the backend

and one that is not valid: ``NotAScheduler`` lacks ``update_from_output``.
"""

from __future__ import annotations

from typing import Any

import kernels_ref
from nanoserve.cache.block_pool import NoFreeBlocksError
from nanoserve.cache.kv_cache_manager import KVCacheManager
from nanoserve.interfaces import ComputedPrefix, Evictor
from nanoserve.request import Request
from nanoserve.sampling import Sampler
from nanoserve.scheduler import Scheduler


class StackBlockPool:
    """A BlockAllocator with a LIFO free list (a plain Python list used as a stack)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.stack = list(reversed(range(num_blocks)))  # top = the end of the list
        self.evictor: Evictor | None = None

    @property
    def num_free(self) -> int:
        return len(self.stack)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.stack)

    @property
    def num_allocatable(self) -> int:
        return len(self.stack) + (self.evictor.num_evictable if self.evictor else 0)

    def set_evictor(self, evictor: Evictor | None) -> None:
        self.evictor = evictor

    def allocate(self, n: int) -> list[int]:
        if n > len(self.stack) and self.evictor is not None:
            self.evictor.evict(n - len(self.stack))
        if n > len(self.stack):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self.stack)} free")
        blocks = [self.stack.pop() for _ in range(n)]
        for block in blocks:
            self.refcount[block] = 1
            if self.evictor is not None:
                self.evictor.forget(block)
        return blocks

    def share(self, block: int) -> None:
        if self.refcount[block] == 0:
            self.stack.remove(block)
        self.refcount[block] += 1

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            assert self.refcount[block] > 0, f"double free of block {block}"
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self.stack.append(block)

    def check_invariants(self, holders: dict[int, int] | None = None) -> None:
        assert len(set(self.stack)) == len(self.stack), "a block is free twice"
        for block in range(self.num_blocks):
            assert (block in self.stack) == (self.refcount[block] == 0), f"block {block} is lost"
            if holders is not None:
                assert self.refcount[block] == holders.get(block, 0), f"block {block}: refcount vs holders"


class OneBlockAtATimeKVManager(KVCacheManager):
    """Block tables grown one ``allocate(1)`` call at a time (an admission with a cached prefix
    still goes through the parent, which locks and shares the prefix)."""

    def allocate_slots(
        self, request: Request, num_new_tokens: int, num_lookahead_tokens: int = 0, prefix: ComputedPrefix | None = None
    ) -> bool:
        if prefix is not None:
            return super().allocate_slots(request, num_new_tokens, num_lookahead_tokens, prefix)
        table = self.block_tables.get(request.request_id, [])
        total = request.num_computed_tokens + num_new_tokens + num_lookahead_tokens
        missing = self.blocks_needed(total) - len(table)
        if missing > self.allocator.num_allocatable:
            return False
        for _ in range(max(0, missing)):
            self.block_tables.setdefault(request.request_id, []).extend(self.allocator.allocate(1))
        return True


class ShortestPromptFirstScheduler(Scheduler):
    """Admits the waiting request with the shortest prompt first (preempted ones still go first)."""

    def add_request(self, request: Request) -> None:
        at = next((i for i, r in enumerate(self.waiting) if r.num_prompt_tokens > request.num_prompt_tokens), len(self.waiting))
        self.waiting.insert(at, request)


class ReferenceKernelSampler(Sampler):
    """The engine's sampler, on the reference kernels whatever backend the engine runs."""

    def __init__(self, kernels: Any) -> None:
        super().__init__(kernels_ref)


class NotAScheduler:
    """Everything a Scheduler has but ``update_from_output``: the engine must refuse it."""

    def __init__(self, kv: Any, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs

    def add_request(self, request: Request) -> None: ...

    def schedule(self) -> Any: ...

    def rollback(self, request: Request, num_tokens: int) -> None: ...

    def finish_request(self, request: Request, reason: str) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> Any: ...

    def check_invariants(self) -> None: ...
