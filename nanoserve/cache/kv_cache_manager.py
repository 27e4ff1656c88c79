"""Block tables: which physical blocks hold each request's tokens.

A request's block table is the list of block ids holding its tokens in order: token t
lives in block ``table[t // B] * B + t % B``, i.e. at slot
``table[t // B] * B + t % B`` of the pool. Blocks are added as the request grows
(``allocate_slots``) and all returned when it finishes or is preempted (``free``). Only
the last block of a request can be partly empty: paging wastes < B slots per request.

It implements :class:`nanoserve.interfaces.KVManager` (registered as ``"paged"``) on any
:class:`~nanoserve.interfaces.BlockAllocator`, with or without a
:class:`~nanoserve.interfaces.PrefixCache`. With one, a request's life is:

    admitted   get_computed_prefix: match prompt (+ outputs, after a preemption) in the cache;
               allocate_slots: lock the match, share its blocks, allocate the rest
    prompt     cache_blocks: insert the prompt's full blocks, move the lock to them
    finished   free: insert every full computed block (prompt + output), unlock, drop refs
    or preempted      (the same: the request finds its own blocks again when it resumes)

so the next turn of a conversation finds the previous answer too. A cached block is never
written again: a request only writes slots past its ``num_computed_tokens``, and a match
never covers the last known token.

Reused K/V equals recomputed K/V within float32 rounding, not bit for bit, on the ref and
cpu backends alike: it was computed in another batch, and BLAS sums a matmul's terms in an
order that depends on the number of rows (measured: logits within 1.4e-6 on the tiny test
model; greedy tokens identical in every test, SmolLM2 included).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nanoserve.interfaces import BlockAllocator, ComputedPrefix, PrefixCache
from nanoserve.request import Request
from nanoserve.stats import KVCacheStats, PrefixCacheStats


class KVCacheManager:
    def __init__(self, allocator: BlockAllocator, block_size: int, prefix_cache: PrefixCache | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = allocator
        self.prefix_cache = prefix_cache
        self.block_tables: dict[str, list[int]] = {}
        self.locks: dict[str, tuple[Any, int]] = {}  # request id -> (locked prefix-cache handle, tokens it covers)
        self.prompt_cached: set[str] = set()  # requests whose prompt blocks are in the cache
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_prefix(self, request: Request) -> ComputedPrefix:
        """The cached prefix of the request's known tokens (none without a prefix cache)."""
        if self.prefix_cache is None or request.num_computed_tokens > 0:
            return ComputedPrefix()
        return self.prefix_cache.match_prefix(request.token_ids(0, request.num_tokens))

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_lookahead_tokens: int = 0,
        prefix: ComputedPrefix | None = None,
    ) -> bool:
        """Make room for the request's computed tokens plus ``num_new_tokens`` and the lookahead.

        False (and no change) if blocks run out.
        """
        num_tokens = request.num_computed_tokens + num_new_tokens + num_lookahead_tokens
        if prefix is not None:
            return self._admit(request, num_tokens, prefix)
        table = self.block_tables.get(request.request_id, [])
        missing = self.blocks_needed(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.allocator.num_allocatable:
            return False
        self.block_tables.setdefault(request.request_id, []).extend(self.allocator.allocate(missing))
        return True

    def _admit(self, request: Request, num_tokens: int, prefix: ComputedPrefix) -> bool:
        """A new table: the prefix's blocks (locked, shared), then fresh ones up to ``num_tokens``.

        The prefix's blocks are taken first: once locked and shared they are neither evictable
        nor free, so what is left to allocate is counted correctly. If that is too little,
        they are given back (a hash-cached block then counts as just used in the LRU order).
        """
        assert request.request_id not in self.block_tables, f"{request.request_id} is admitted twice"
        cache = self.prefix_cache
        if prefix.blocks:
            assert cache is not None, "a computed prefix without a prefix cache"
            cache.lock(prefix.handle)
            for block in prefix.blocks:
                self.allocator.share(block)
        missing = max(0, self.blocks_needed(num_tokens) - len(prefix.blocks))
        if missing > self.allocator.num_allocatable:
            if prefix.blocks:
                self.allocator.free(list(reversed(prefix.blocks)))
                cache.unlock(prefix.handle)  # type: ignore[union-attr]
            return False
        self.block_tables[request.request_id] = list(prefix.blocks) + self.allocator.allocate(missing)
        if prefix.blocks:
            self.locks[request.request_id] = (prefix.handle, prefix.num_tokens)
        if cache is not None:
            self.num_query_tokens += request.num_tokens
            self.num_hit_tokens += prefix.num_tokens
        return True

    def cache_blocks(self, request: Request) -> None:
        """Once the prompt is computed, cache its full blocks and hold them locked."""
        rid = request.request_id
        if self.prefix_cache is None or rid in self.prompt_cached or request.num_computed_tokens < request.num_prompt_tokens:
            return
        self._insert(request, request.num_prompt_tokens)
        self.prompt_cached.add(rid)

    def _insert(self, request: Request, num_tokens: int) -> None:
        """Cache the request's first ``num_tokens`` tokens (full blocks); lock them if that reaches
        further than the request's lock does (a resumed request may hold a longer match)."""
        assert self.prefix_cache is not None
        rid = request.request_id
        handle = self.prefix_cache.insert(request.token_ids(0, num_tokens), self.block_tables.get(rid, []))
        covered = num_tokens // self.block_size * self.block_size
        old = self.locks.get(rid)
        if old is not None and old[1] >= covered:
            return
        self.prefix_cache.lock(handle)
        if old is not None:
            self.prefix_cache.unlock(old[0])
        self.locks[rid] = (handle, covered)

    def free(self, request: Request) -> None:
        """Cache the request's computed blocks (with a prefix cache), then return its blocks to the
        pool, newest first, so that older ones are reused first."""
        rid = request.request_id
        if self.prefix_cache is not None and rid in self.block_tables:
            self._insert(request, request.num_computed_tokens)
        self.prompt_cached.discard(rid)
        lock = self.locks.pop(rid, None)
        if lock is not None:
            self.prefix_cache.unlock(lock[0])  # type: ignore[union-attr]
        table = self.block_tables.pop(rid, [])
        self.allocator.free(list(reversed(table)))

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def slot_mapping(self, request_id: str, start: int, end: int) -> np.ndarray:  # -> [end - start] int64
        """Pool slots of tokens ``start .. end-1`` of the request."""
        table = np.asarray(self.block_tables[request_id], dtype=np.int64)
        positions = np.arange(start, end)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def stats(self) -> KVCacheStats:
        cache = PrefixCacheStats()
        if self.prefix_cache is not None:
            own = self.prefix_cache.stats()
            cache = PrefixCacheStats(
                num_cached_blocks=own.num_cached_blocks,
                num_evictable_blocks=self._num_evictable(),
                num_evicted_blocks=own.num_evicted_blocks,
                num_query_tokens=self.num_query_tokens,
                num_hit_tokens=self.num_hit_tokens,
            )
        free = self.allocator.num_allocatable  # free, or cached and evictable
        return KVCacheStats(
            num_blocks=self.allocator.num_blocks,
            block_size=self.block_size,
            num_free_blocks=free,
            num_used_blocks=self.allocator.num_blocks - free,
            block_tables={rid: tuple(table) for rid, table in self.block_tables.items()},
            prefix_cache=cache,
        )

    def _num_evictable(self) -> int:
        """Cached blocks nobody holds: the radix tree counts them as it goes; the hash cache's are
        found by set difference (its cached blocks minus those in tables)."""
        assert self.prefix_cache is not None
        if self.prefix_cache.holds_references:
            return self.prefix_cache.num_evictable  # equal to len(self._evictable()): check_invariants
        return len(self._evictable())

    def _evictable(self) -> set[int]:
        """Cached blocks that no request's table holds and no lock protects."""
        assert self.prefix_cache is not None
        held = {b for table in self.block_tables.values() for b in table}
        return {b for b, locked in self.prefix_cache.cached_blocks().items() if not locked and b not in held}

    def check_invariants(self) -> None:
        """Refcounts equal the holders; with a prefix cache, free + evictable + protected == total.

        Free is the pool's count (less, for a cache that indexes free blocks, the evictable ones
        on the free list), evictable the cache's, protected the blocks in a request's table or a
        locked node: each block is in exactly one of the three.
        """
        holders: dict[int, int] = {}
        for request_id, table in self.block_tables.items():
            assert table, f"{request_id} has an empty block table"
            for block in table:
                holders[block] = holders.get(block, 0) + 1
        assert set(self.locks) <= set(self.block_tables), "a request holds a lock but no blocks"
        cache = self.prefix_cache
        if cache is None:
            self.allocator.check_invariants(holders)
            return
        cache.check_invariants()
        cached = cache.cached_blocks()
        protected = set(holders) | {b for b, locked in cached.items() if locked}
        evictable = self._evictable()
        if cache.holds_references:  # the radix tree: one reference per cached block, never free
            for block in cached:
                holders[block] = holders.get(block, 0) + 1
            free = self.allocator.num_free
            assert len(evictable) == cache.num_evictable, f"{len(evictable)} evictable, the cache counts {cache.num_evictable}"
        else:  # the hash cache: the evictable blocks wait on the free list
            free = self.allocator.num_free - len(evictable)
        self.allocator.check_invariants(holders)  # so nothing else holds a block
        assert free + len(evictable) + len(protected) == self.allocator.num_blocks, (
            f"free {free} + evictable {len(evictable)} + protected {len(protected)} != {self.allocator.num_blocks} blocks"
        )
