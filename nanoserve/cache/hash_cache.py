"""The hash-chained prefix cache (vLLM v1's automatic prefix caching), beside the radix tree.

A full block is known by a hash of everything before it and its own tokens:

    hash(block i) = hash((hash(block i-1), tokens of block i))        hash(block -1) = None

so equal hashes mean equal prefixes, and a lookup walks a prompt block by block through one
dict, ``cached[hash] -> block id``, with no tree. Each entry also keeps its parent hash and
tokens, and a lookup compares them, so a hash collision can never hand out the wrong K/V.

Lazy eviction: the cache holds no reference to its blocks. When the last request using a
cached block frees it, the block goes to the back of the pool's LRU free list *still
indexed*: free, yet valid, and found by the next lookup (``share`` takes it back off the
free list). A freed block the cache does not index (a request's partial last block) goes
to the front instead, so it is reused before any cached one. Only when ``allocate`` hands that block out again does the pool tell the cache
(``forget``), and the entry is dropped then. The least recently freed cached block is
therefore the first to go, and nothing is evicted until memory is actually needed.

``lock`` / ``unlock`` have nothing to do here: a running request's table holds a reference
to each of its blocks, and a referenced block is not on the free list.
"""

from __future__ import annotations

from collections.abc import Hashable

from nanoserve.interfaces import BlockAllocator, ComputedPrefix
from nanoserve.stats import PrefixCacheStats

BlockHash = Hashable


class HashPrefixCache:
    holds_references = False

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.cached: dict[BlockHash, int] = {}  # block hash -> block id
        self.entries: dict[int, tuple[BlockHash, BlockHash, tuple[int, ...]]] = {}  # block -> (hash, parent, tokens)
        self.num_evicted = 0
        allocator.set_evictor(self)

    def _lookup(self, parent: BlockHash, tokens: tuple[int, ...]) -> tuple[BlockHash, int | None]:
        """The hash of a block after ``parent``, and the cached block holding it (verified), if any."""
        block_hash = hash((parent, tokens))
        block = self.cached.get(block_hash)
        if block is not None and self.entries[block][1:] != (parent, tokens):
            block = None  # a collision: not the same prefix
        return block_hash, block

    def match_prefix(self, tokens: list[int]) -> ComputedPrefix:
        """Cached blocks for the longest block-aligned prefix of ``tokens``, leaving at least one token."""
        B = self.block_size
        blocks: list[int] = []
        parent: BlockHash = None
        for start in range(0, (len(tokens) - 1) // B * B, B):
            parent, block = self._lookup(parent, tuple(tokens[start : start + B]))
            if block is None:
                break
            blocks.append(block)
        return ComputedPrefix(blocks=blocks, num_tokens=len(blocks) * B)

    def insert(self, tokens: list[int], blocks: list[int]) -> None:
        """Index the full blocks of ``tokens`` (``blocks[i]`` holds block i); known hashes keep their block."""
        B = self.block_size
        parent: BlockHash = None
        for i in range(min(len(tokens) // B, len(blocks))):
            block_tokens = tuple(tokens[i * B : (i + 1) * B])
            block_hash, cached = self._lookup(parent, block_tokens)
            if cached is None and block_hash not in self.cached and blocks[i] not in self.entries:
                self.cached[block_hash] = blocks[i]
                self.entries[blocks[i]] = (block_hash, parent, block_tokens)
            parent = block_hash

    def lock(self, handle: object) -> None:
        """Nothing to do: the request's block table holds references to its blocks."""

    def unlock(self, handle: object) -> None:
        """Nothing to do: freeing the request's table drops its references."""

    # --- the pool's Evictor ------------------------------------------------------------------------
    @property
    def num_evictable(self) -> int:
        """Evictable cached blocks are already on the free list: ``evict`` has nothing more to free."""
        return 0

    def evict(self, num_blocks: int) -> int:
        return 0

    def forget(self, block: int) -> None:
        """The pool is handing out ``block`` again: drop its entry (the lazy eviction)."""
        entry = self.entries.pop(block, None)
        if entry is not None:
            del self.cached[entry[0]]
            self.num_evicted += 1

    def indexes(self, block: int) -> bool:
        """Whether the freed ``block`` is cached: then it waits at the back of the free list."""
        return block in self.entries

    # --- reporting and invariants ---------------------------------------------------------------------
    def cached_blocks(self) -> dict[int, bool]:
        """No locks: a running request protects its blocks by holding references to them."""
        return dict.fromkeys(self.entries, False)

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(num_cached_blocks=len(self.entries), num_evicted_blocks=self.num_evicted)

    def check_invariants(self) -> None:
        assert len(self.cached) == len(self.entries), "the hash index and the block entries disagree"
        for block_hash, block in self.cached.items():
            entry = self.entries.get(block)
            assert entry is not None and entry[0] == block_hash, f"block {block} is indexed under another hash"
            assert 0 <= block < self.allocator.num_blocks, f"cached block {block} is not in the pool"
            assert hash(entry[1:]) == block_hash, f"block {block}'s hash is not hash((parent hash, tokens))"
            assert len(entry[2]) == self.block_size, f"block {block} is cached with {len(entry[2])} tokens"
