"""The radix prefix cache (SGLang's RadixAttention): a tree of token ids whose nodes hold KV blocks.

Every path from the root spells a token sequence whose K/V some finished or running request
computed; each node holds the pool's block ids for its own tokens, one block per
``block_size`` tokens (only full blocks are cached):

    root
     `-- [sys prompt: 32 tokens | blocks 4, 9]            lock 2   (two requests use it)
           |-- [question A: 16 tokens | block 12]          lock 1
           `-- [question B + answer: 32 tokens | 3, 7]     lock 0   last used at t=41: evictable

Operations:
  * ``match_prefix(tokens)``: the longest cached prefix, in whole blocks, capped so that at
    least one token is left to compute (its logits give the next token).
  * ``insert(tokens, blocks)``: add the full blocks of a sequence. The part already in the
    tree keeps the tree's blocks; a partial match inside a node splits it.
  * ``lock(node)`` / ``unlock(node)``: a running request holds its path from ``node`` to the
    root; locked nodes are never evicted.
  * ``evict(n)``: free at least ``n`` blocks, least recently used unlocked leaves first, by a
    logical clock (a counter, not wall time, so traces are deterministic).

Ownership: the tree holds one reference (``BlockAllocator.share``) to every block it caches,
so a cached block stays valid after its request is gone. A block only the tree holds, in an
unlocked node, is *evictable*: the tree is the pool's :class:`~nanoserve.interfaces.Evictor`,
and ``allocate`` evicts when the free list runs short. Every block is in exactly one of
three places: free, evictable, or protected (in a request's table or a locked node).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from nanoserve.interfaces import BlockAllocator, ComputedPrefix
from nanoserve.stats import PrefixCacheStats


@dataclass(eq=False)
class Node:
    """Tokens ``key`` (a multiple of the block size), their ``blocks``, and children by first block."""

    key: tuple[int, ...]
    blocks: list[int]
    parent: Node | None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)  # first block's tokens -> child
    lock_ref: int = 0  # running requests whose path goes through this node
    last_access: int = 0  # logical clock


class RadixCache:
    holds_references = True

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.root = Node(key=(), blocks=[], parent=None, lock_ref=1)  # the root is never evicted
        self._clock = itertools.count(1)
        self.num_evictable_blocks = 0  # blocks of unlocked nodes
        self.num_evicted = 0
        allocator.set_evictor(self)

    # --- lookup and insertion -----------------------------------------------------------------
    def match_prefix(self, tokens: list[int]) -> ComputedPrefix:
        """The longest cached block-aligned prefix of ``tokens``, leaving at least one token."""
        B = self.block_size
        limit = (len(tokens) - 1) // B * B  # whole blocks, and never the last token
        node, matched, blocks = self.root, 0, []
        now = next(self._clock)
        while matched < limit:
            child = node.children.get(tuple(tokens[matched : matched + B]))
            if child is None:
                break
            n = self._common_blocks(child.key, tokens, matched, limit)
            if n < len(child.blocks):
                child = self._split(child, n)
            child.last_access = now
            blocks.extend(child.blocks)
            matched += len(child.key)
            node = child
        return ComputedPrefix(blocks=blocks, num_tokens=matched, handle=node)

    def insert(self, tokens: list[int], blocks: list[int]) -> Node:
        """Cache the full blocks of ``tokens`` (``blocks[i]`` holds block i); returns the deepest node.

        Where the tree already has a block for these tokens it keeps its own; the caller's
        duplicate stays the caller's. New nodes take a reference to the caller's blocks.
        """
        B = self.block_size
        length = min(len(tokens) // B, len(blocks)) * B
        node, matched = self.root, 0
        now = next(self._clock)
        while matched < length:
            child = node.children.get(tuple(tokens[matched : matched + B]))
            if child is None:
                new_blocks = blocks[matched // B : length // B]
                for block in new_blocks:
                    self.allocator.share(block)
                child = Node(key=tuple(tokens[matched:length]), blocks=list(new_blocks), parent=node)
                node.children[child.key[:B]] = child
                self.num_evictable_blocks += len(new_blocks)  # unlocked until a request locks it
                child.last_access = now
                return child
            n = self._common_blocks(child.key, tokens, matched, length)
            if n < len(child.blocks):
                child = self._split(child, n)
            child.last_access = now
            matched += len(child.key)
            node = child
        return node

    # --- locks -------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        """A request now uses the path from ``node`` to the root: none of it may be evicted."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.num_evictable_blocks -= len(node.blocks)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without a lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.num_evictable_blocks += len(node.blocks)
            node = node.parent  # type: ignore[assignment]

    # --- eviction (the pool's Evictor) ----------------------------------------------------------
    @property
    def num_evictable(self) -> int:
        return self.num_evictable_blocks

    def evict(self, num_blocks: int) -> int:
        """Free ``num_blocks`` blocks (or all it can), from the least recently used unlocked leaves.

        A leaf with more blocks than still needed is split, and only its tail is evicted.
        """
        freed = 0
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        while freed < num_blocks and leaves:
            leaf = min(leaves, key=lambda n: n.last_access)
            leaves.remove(leaf)
            keep = len(leaf.blocks) - (num_blocks - freed)
            if keep > 0:
                self._split(leaf, keep)  # ``leaf`` is now the tail, under the kept upper part
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[: self.block_size]]
            self.allocator.free(list(reversed(leaf.blocks)))
            self.num_evictable_blocks -= len(leaf.blocks)
            self.num_evicted += len(leaf.blocks)
            freed += len(leaf.blocks)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                leaves.append(parent)
        return freed

    def forget(self, block: int) -> None:
        """The tree never holds a free block, so a block the pool hands out is never one of its own."""

    def indexes(self, block: int) -> bool:
        """Never: a block the tree keeps is held, so a block reaching the free list is not cached."""
        return False

    # --- helpers -----------------------------------------------------------------------------
    def _common_blocks(self, key: tuple[int, ...], tokens: list[int], start: int, end: int) -> int:
        """How many whole blocks of ``key`` equal ``tokens[start:end]`` from its start."""
        B, n = self.block_size, 0
        while (n + 1) * B <= len(key) and start + (n + 1) * B <= end:
            if key[n * B : (n + 1) * B] != tuple(tokens[start + n * B : start + (n + 1) * B]):
                break
            n += 1
        return n

    def _split(self, node: Node, num_blocks: int) -> Node:
        """Cut ``node`` after ``num_blocks`` blocks; returns the new upper part (same locks)."""
        B = self.block_size
        parent = node.parent
        assert parent is not None and 0 < num_blocks < len(node.blocks)
        upper = Node(
            key=node.key[: num_blocks * B],
            blocks=node.blocks[:num_blocks],
            parent=parent,
            lock_ref=node.lock_ref,
            last_access=node.last_access,
        )
        parent.children[upper.key[:B]] = upper
        node.key, node.blocks, node.parent = node.key[num_blocks * B :], node.blocks[num_blocks:], upper
        upper.children[node.key[:B]] = node
        return upper

    def _nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    # --- reporting and invariants --------------------------------------------------------------
    def cached_blocks(self) -> dict[int, bool]:
        """Every block the tree holds -> whether its node is locked."""
        return {b: n.lock_ref > 0 for n in self._nodes() for b in n.blocks}

    def stats(self) -> PrefixCacheStats:
        nodes = self._nodes()
        return PrefixCacheStats(
            num_cached_blocks=sum(len(n.blocks) for n in nodes),
            num_evictable_blocks=self.num_evictable_blocks,
            num_evicted_blocks=self.num_evicted,
        )

    def check_invariants(self) -> None:
        """Tree structure, lock counts against the evictable total, and one reference per block."""
        B = self.block_size
        seen: set[int] = set()
        evictable = 0
        for node in self._nodes():
            parent = node.parent
            assert parent is not None and parent.children.get(node.key[:B]) is node, "a broken parent link"
            assert node.key and len(node.key) % B == 0, f"a node of {len(node.key)} tokens (block size {B})"
            assert len(node.blocks) == len(node.key) // B, "a node's blocks do not match its tokens"
            assert node.lock_ref >= 0
            if parent is not self.root:
                assert parent.lock_ref >= node.lock_ref, "a child is locked more than its parent"
            for key, child in node.children.items():
                assert child.key[:B] == key, "a child is filed under the wrong key"
            for block in node.blocks:
                assert block not in seen, f"block {block} is cached twice"
                seen.add(block)
            if node.lock_ref == 0:
                evictable += len(node.blocks)
        assert evictable == self.num_evictable_blocks, f"{evictable} evictable blocks, counted {self.num_evictable_blocks}"
