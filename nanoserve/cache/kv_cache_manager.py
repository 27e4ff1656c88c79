"""Block tables: which physical blocks hold each request's tokens.

A request's block table is the list of block ids holding its tokens in order: token t
lives in block ``table[t // B] * B + t % B``, i.e. at slot
``table[t // B] * B + t % B`` of the pool. Blocks are added as the request grows
(``allocate_slots``) and all returned when it finishes or is preempted (``free``). Only
the last block of a request can be partly empty: paging wastes < B slots per request.

It implements :class:`nanoserve.interfaces.KVManager` (registered as ``"paged"``) on any
:class:`~nanoserve.interfaces.BlockAllocator`. It has no prefix cache: the computed prefix
it reports is always empty.
"""

from __future__ import annotations

import numpy as np

from nanoserve.interfaces import BlockAllocator, ComputedPrefix
from nanoserve.request import Request
from nanoserve.stats import KVCacheStats


class KVCacheManager:
    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = allocator
        self.block_tables: dict[str, list[int]] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_prefix(self, request: Request) -> ComputedPrefix:
        """No prefix cache here: nothing of a new request is ever computed already."""
        return ComputedPrefix()

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
        table = self.block_tables.get(request.request_id, [])
        if prefix is not None and prefix.blocks:
            raise ValueError("this KV manager has no prefix cache; it cannot take a computed prefix")
        num_tokens = request.num_computed_tokens + num_new_tokens + num_lookahead_tokens
        missing = self.blocks_needed(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.allocator.num_allocatable:
            return False
        self.block_tables.setdefault(request.request_id, []).extend(self.allocator.allocate(missing))
        return True

    def free(self, request: Request) -> None:
        """Return all of a request's blocks to the pool (newest first, so older ones are reused first)."""
        table = self.block_tables.pop(request.request_id, [])
        self.allocator.free(list(reversed(table)))

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def slot_mapping(self, request_id: str, start: int, end: int) -> np.ndarray:  # -> [end - start] int64
        """Pool slots of tokens ``start .. end-1`` of the request."""
        table = np.asarray(self.block_tables[request_id], dtype=np.int64)
        positions = np.arange(start, end)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_blocks=self.allocator.num_blocks,
            block_size=self.block_size,
            num_free_blocks=self.allocator.num_free,
            num_used_blocks=self.allocator.num_used,
            block_tables={rid: tuple(table) for rid, table in self.block_tables.items()},
        )

    def check_invariants(self) -> None:
        holders: dict[int, int] = {}
        for request_id, table in self.block_tables.items():
            assert table, f"{request_id} has an empty block table"
            for block in table:
                holders[block] = holders.get(block, 0) + 1
        self.allocator.check_invariants(holders)
