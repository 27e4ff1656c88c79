"""The block pool: a fixed set of KV blocks, reference-counted, with an LRU free list.

All KV memory is allocated once at start-up as ``num_blocks`` blocks of ``block_size``
token slots. The pool hands out block *ids*; who holds which block is bookkeeping only.

Invariants (``check_invariants``):
  * a block is on the free list iff its refcount is 0;
  * every block is either free or held (nothing is lost): free + held == num_blocks;
  * the free list holds no duplicates.

The free list is ordered least-recently-freed first, so allocation reuses the block
that has been free the longest (a prefix cache can still find the recently freed ones);
a freed block holding nothing cached goes to the front, to be reused before those.
When the free list runs short, ``allocate`` asks its *evictor* (a prefix cache holding
blocks nobody else uses; ``set_evictor``) to free the difference first.

It implements :class:`nanoserve.interfaces.BlockAllocator` (registered as ``"lru"``).
An ``OrderedDict`` gives O(1) append, pop-front and removal from the middle (when a free
block is shared again).
"""

from __future__ import annotations

from collections import OrderedDict

from nanoserve.errors import NanoserveError
from nanoserve.interfaces import Evictor


class NoFreeBlocksError(NanoserveError):
    """Raised by ``allocate`` when fewer free blocks remain than asked for."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.evictor: Evictor | None = None

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def num_allocatable(self) -> int:
        """Blocks ``allocate`` can hand out now: free, plus what the evictor could free."""
        return len(self.free_blocks) + (self.evictor.num_evictable if self.evictor else 0)

    def set_evictor(self, evictor: Evictor | None) -> None:
        self.evictor = evictor

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the front of the free list (refcount 0 -> 1), evicting first if short."""
        if n > self.num_allocatable:
            raise NoFreeBlocksError(f"asked for {n} blocks, {self.num_allocatable} free or evictable")
        if n > len(self.free_blocks):
            assert self.evictor is not None
            self.evictor.evict(n - len(self.free_blocks))
            if n > len(self.free_blocks):
                raise NoFreeBlocksError(f"asked for {n} blocks; only {len(self.free_blocks)} free after eviction")
        blocks = []
        for _ in range(n):
            block, _ = self.free_blocks.popitem(last=False)
            self.refcount[block] = 1
            if self.evictor is not None:
                self.evictor.forget(block)  # whatever K/V it cached is about to be overwritten
            blocks.append(block)
        return blocks

    def share(self, block: int) -> None:
        """One more holder of ``block`` (reviving it from the free list if it was free)."""
        if self.refcount[block] == 0:
            del self.free_blocks[block]
        self.refcount[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. A block reaching 0 goes to the back of the free list,
        or, with an evictor that does not index its K/V, to the front (nothing there to keep)."""
        for block in blocks:
            if self.refcount[block] <= 0:
                raise NanoserveError(f"double free of block {block}")
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self.free_blocks[block] = None
                if self.evictor is not None and not self.evictor.indexes(block):
                    self.free_blocks.move_to_end(block, last=False)

    def check_invariants(self, holders: dict[int, int] | None = None) -> None:
        """Assert the pool's invariants; ``holders`` (block -> number of tables) must match refcounts."""
        for block in range(self.num_blocks):
            is_free = block in self.free_blocks
            assert self.refcount[block] >= 0, f"block {block} has refcount {self.refcount[block]}"
            assert is_free == (self.refcount[block] == 0), f"block {block}: free={is_free}, refcount={self.refcount[block]}"
            if holders is not None:
                assert self.refcount[block] == holders.get(block, 0), (
                    f"block {block}: refcount {self.refcount[block]} but {holders.get(block, 0)} block tables hold it"
                )
        assert len(self.free_blocks) + sum(1 for r in self.refcount if r > 0) == self.num_blocks, "a block is lost"
