"""Lab 04: the block pool, the engine's KV memory as a fixed set of ref-counted blocks.

Write the class below. The grader hands it to the real engine as its block allocator
(``EngineConfig.block_allocator = "student.py:BlockPool"``), so every request's KV blocks
come from your pool. Import nothing from ``nanoserve.cache`` but ``NoFreeBlocksError``.

    python -m nanoserve lab check 04 student.py
"""

from __future__ import annotations

from nanoserve.cache.block_pool import NoFreeBlocksError  # raise this when allocate() cannot
from nanoserve.interfaces import Evictor

__all__ = ["BlockPool", "NoFreeBlocksError"]


class BlockPool:
    """``num_blocks`` KV blocks, handed out by id (0 .. num_blocks-1) and reference-counted.

    Invariants (check them in ``check_invariants``):
      * a block is free iff its refcount is 0;
      * free + used == num_blocks: no block is ever lost;
      * no block is free twice.
    """

    def __init__(self, num_blocks: int) -> None:
        """All ``num_blocks`` blocks start free, with no evictor."""
        raise NotImplementedError("Lab 04: write BlockPool.__init__")

    @property
    def num_free(self) -> int:
        """Blocks with refcount 0."""
        raise NotImplementedError("Lab 04: write BlockPool.num_free")

    @property
    def num_used(self) -> int:
        """Blocks with refcount > 0."""
        raise NotImplementedError("Lab 04: write BlockPool.num_used")

    @property
    def num_allocatable(self) -> int:
        """What ``allocate`` can give now: the free blocks plus the evictor's ``num_evictable``."""
        raise NotImplementedError("Lab 04: write BlockPool.num_allocatable")

    def set_evictor(self, evictor: Evictor | None) -> None:
        """Remember the prefix cache ``allocate`` asks for blocks when the free list runs short."""
        raise NotImplementedError("Lab 04: write BlockPool.set_evictor")

    def allocate(self, n: int) -> list[int]:
        """``n`` distinct free blocks, each now with refcount 1.

        If fewer than ``n`` are free, first ask the evictor to ``evict`` the difference; if
        still short, raise ``NoFreeBlocksError`` having handed out nothing. Tell the evictor
        (``forget(block)``) of every block you hand out.
        """
        raise NotImplementedError("Lab 04: write BlockPool.allocate")

    def share(self, block: int) -> None:
        """One more holder of ``block``; a free block leaves the free list."""
        raise NotImplementedError("Lab 04: write BlockPool.share")

    def free(self, blocks: list[int]) -> None:
        """Drop one holder of each block; at refcount 0 it is free again. Freeing a free block raises."""
        raise NotImplementedError("Lab 04: write BlockPool.free")

    def check_invariants(self, holders: dict[int, int] | None = None) -> None:
        """Assert the invariants above; with ``holders`` (block -> holders), assert every refcount equals it."""
        raise NotImplementedError("Lab 04: write BlockPool.check_invariants")
