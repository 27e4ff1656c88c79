"""Block tables: which physical blocks hold each request's tokens.

A request's block table is the list of block ids holding its tokens in order: token t
lives in block ``table[t // B]`` at offset ``t % B``, i.e. at slot
``table[t // B] * B + t % B`` of the pool. Blocks are added as the request grows
(``allocate_slots``) and all returned when it finishes or is preempted (``free``). Only
the last block of a request can be partly empty: paging wastes < B slots per request.
"""

from __future__ import annotations

import numpy as np

from nanoserve.cache.block_pool import BlockPool


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Make room for ``num_tokens`` tokens in total; False (and no change) if blocks run out."""
        table = self.block_tables.setdefault(request_id, [])
        missing = self.blocks_needed(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.pool.num_free:
            if not table:
                del self.block_tables[request_id]
            return False
        table.extend(self.pool.allocate(missing))
        return True

    def free(self, request_id: str) -> None:
        """Return all of a request's blocks to the pool (newest first, so older ones are reused first)."""
        table = self.block_tables.pop(request_id, [])
        self.pool.free(list(reversed(table)))

    def slot_mapping(self, request_id: str, start: int, end: int) -> np.ndarray:  # -> [end - start] int64
        """Pool slots of tokens ``start .. end-1`` of the request."""
        table = np.asarray(self.block_tables[request_id], dtype=np.int64)
        positions = np.arange(start, end)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def check_invariants(self) -> None:
        holders: dict[int, int] = {}
        for table in self.block_tables.values():
            for block in table:
                holders[block] = holders.get(block, 0) + 1
        self.pool.check_invariants(holders)
