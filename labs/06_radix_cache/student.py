"""Lab 06: the radix prefix cache, a tree of token ids whose nodes hold KV blocks.

Write the class ``RadixCache`` below (``Node`` is given). The grader hands it to the real
engine as its prefix cache (``EngineConfig.prefix_cache = "student.py:RadixCache"``), so
every request's cached prefix comes from your tree and every eviction goes through it.
Import nothing from ``nanoserve.cache`` (the block pool you get is passed in).

    python -m nanoserve lab check 06 student.py

The tree, for block size 4 (each node's ``key`` is its own tokens, whole blocks only):

    root
     `-- key (1,2,3,4, 5,6,7,8)  blocks [4, 9]   lock_ref 1
           |-- key (9,9,9,9)      blocks [12]     lock_ref 1   (a running request's path)
           `-- key (7,7,7,7)      blocks [3]      lock_ref 0   evictable
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoserve.interfaces import BlockAllocator, ComputedPrefix
from nanoserve.stats import PrefixCacheStats

__all__ = ["Node", "RadixCache"]


@dataclass(eq=False)
class Node:
    """One edge of the tree: its own tokens ``key`` and the blocks holding their K/V.

    The grader reads (and, to test ``check_invariants``, breaks) your tree through these
    fields, so keep them:
      * ``key``: this node's tokens only, a whole number of blocks (``len(key) % B == 0``);
      * ``blocks``: one block id per ``B`` tokens of ``key`` (``len(blocks) == len(key) // B``);
      * ``parent``: the node above (None for the root only);
      * ``children``: child nodes filed by their first block, ``children[child.key[:B]] is child``;
      * ``lock_ref``: running requests whose path goes through this node (never below 0);
      * ``last_access``: your logical clock's value when a lookup or insert last passed through.
    """

    key: tuple[int, ...]
    blocks: list[int]
    parent: Node | None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)  # first block's tokens -> child
    lock_ref: int = 0
    last_access: int = 0


class RadixCache:
    """Cached K/V blocks by the tokens they hold; the block pool's evictor.

    Ownership: the tree holds one reference (``allocator.share``) to every block it caches
    and drops it (``allocator.free``) when it evicts the block. A block of a node with
    ``lock_ref == 0`` is *evictable*.

    Recency: a cached block's last use is the latest ``match_prefix`` or ``insert`` whose
    prefix included it. ``evict`` frees least recently used blocks first, only ever a leaf's
    (a block nothing cached extends) and never a locked one.
    """

    holds_references = True  # the tree holds a reference to each block it caches (it is not a hash index)

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        """An empty tree (a root with no tokens, never evicted), registered as the pool's evictor
        (``allocator.set_evictor(self)``)."""
        raise NotImplementedError("Lab 06: write RadixCache.__init__")

    def match_prefix(self, tokens: list[int]) -> ComputedPrefix:
        """The longest cached prefix of ``tokens`` in whole blocks, never covering the last token.

        Returns ``ComputedPrefix(blocks, num_tokens, handle)``: ``num_tokens`` is a multiple of
        the block size and ``< len(tokens)`` (the last token's logits give the next token),
        ``blocks`` the cached block of each of those ``num_tokens // B`` blocks, and ``handle``
        the node where the match ends (the caller locks it). A match that ends inside a node
        splits it there, so the handle covers exactly the match. Marks the match as used.
        """
        raise NotImplementedError("Lab 06: write RadixCache.match_prefix")

    def insert(self, tokens: list[int], blocks: list[int]) -> Node:
        """Cache the full blocks of ``tokens`` (``blocks[i]`` holds block i's K/V); returns the
        node that ends at the last inserted block (the root if there is none).

        The part already in the tree keeps the tree's blocks (the caller's duplicates stay the
        caller's); a node the new tokens leave part way through is split there. The new part
        becomes one new node whose blocks the tree takes a reference to (``allocator.share``).
        Marks the whole inserted prefix as used.
        """
        raise NotImplementedError("Lab 06: write RadixCache.insert")

    def lock(self, node: Node) -> None:
        """A request now uses the path from ``node`` up to the root: add 1 to each node's
        ``lock_ref`` (a node going from 0 to 1 stops being evictable). ``lock(root)`` does nothing."""
        raise NotImplementedError("Lab 06: write RadixCache.lock")

    def unlock(self, node: Node) -> None:
        """Undo one ``lock(node)``: subtract 1 on the whole path up to the root (a node reaching
        0 becomes evictable again)."""
        raise NotImplementedError("Lab 06: write RadixCache.unlock")

    @property
    def num_evictable(self) -> int:
        """Blocks of unlocked nodes: what ``evict`` could free now (the pool adds it to ``num_allocatable``)."""
        raise NotImplementedError("Lab 06: write RadixCache.num_evictable")

    def evict(self, num_blocks: int) -> int:
        """Free ``num_blocks`` blocks, or every evictable one if there are fewer; returns how many.

        Least recently used unlocked leaves go first, block by block from their end: a leaf with
        more blocks than still needed is split, and only its tail is freed. A parent whose last
        child goes becomes a leaf and may go next. Each freed block gets ``allocator.free``.
        """
        raise NotImplementedError("Lab 06: write RadixCache.evict")

    def forget(self, block: int) -> None:
        """Nothing to do: the tree never holds a free block, so a block the pool hands out is never cached."""

    def indexes(self, block: int) -> bool:
        """Never: a block the tree keeps is held, so a block reaching the free list is not cached."""
        return False

    def cached_blocks(self) -> dict[int, bool]:
        """Every block the tree holds -> whether its node is locked (``lock_ref > 0``)."""
        raise NotImplementedError("Lab 06: write RadixCache.cached_blocks")

    def stats(self) -> PrefixCacheStats:
        """``PrefixCacheStats(num_cached_blocks, num_evictable_blocks, num_evicted_blocks)``:
        blocks in the tree now, of those evictable, and blocks evicted since the start."""
        raise NotImplementedError("Lab 06: write RadixCache.stats")

    def check_invariants(self) -> None:
        """Assert (with ``assert``, so a broken tree raises AssertionError) that every node:
        is filed under its own first block in its parent's children and points back to that
        parent; has a non-empty key of whole blocks and one block per block of key; has
        ``lock_ref >= 0`` and no more than its parent's (below the root); that no block is in
        two nodes; and that ``num_evictable`` equals the blocks of nodes with ``lock_ref == 0``."""
        raise NotImplementedError("Lab 06: write RadixCache.check_invariants")
