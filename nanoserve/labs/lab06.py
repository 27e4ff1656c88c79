"""Lab 06's grader: the radix prefix cache (the :class:`nanoserve.interfaces.PrefixCache` seam).

    property     random operation sequences over token sequences that share prefixes: a
                 request's life (match, lock, share, allocate, insert, move the lock, free),
                 plain lookups, unlocks, direct evictions and memory pressure through the
                 pool's Evictor calls, run on the student's tree and on a naive model (a dict
                 from every cached block-aligned prefix to its block, with a lock count and a
                 last use per prefix). A match must be the longest cached block-aligned prefix
                 leaving the last token, an eviction must free exactly min(asked, evictable)
                 blocks, least recently used leaves first, never a locked one, and the pool's
                 refcounts must show one reference per cached block. Hypothesis shrinks a
                 disagreement to the shortest sequence, printed as the Python that replays it
    invariants   the student's ``check_invariants`` accepts every true state of a fixed
                 sequence, and raises on eight broken trees (a child filed under the wrong
                 key, a lock count below zero, ...)
    integration  the student's tree inside the real engine (``prefix_cache="FILE.py:RadixCache"``)
                 on waves of requests sharing prefixes (system prompts, repeats, next turns),
                 on a pool small enough to force eviction: greedy tokens equal the reference
                 engine's without a prefix cache, with every part's invariants after each step
    counters     prompt tokens served from the cache (per request and in all), the hit rate
                 and the blocks evicted equal nanoserve's RadixCache's on the same workload;
                 the tokens computed are set against the engine's without a cache
    speed        insert and match_prefix on a larger tree against the reference's
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoserve.cache.block_pool import BlockPool, NoFreeBlocksError
from nanoserve.cache.radix import Node, RadixCache
from nanoserve.labs.common import check_imports, check_signatures, compare_tokens, load_module
from nanoserve.labs.grader import Criterion, CriterionFailed, Lab, Submission

B = 2  # the property suite's block size: small, so prefixes are shared and split often
POOL_BLOCKS = 10  # the property suite's pool: small, so memory pressure evicts
TIGHT = {"num_blocks": 22, "block_size": 4, "max_num_batched_tokens": 16, "max_num_seqs": 3}

HINT_ALIGN = "match whole blocks only: stop at (len(tokens) - 1) // B * B tokens, so the last token is always computed"
HINT_MATCH = "walk from the root, one child per block (children[tokens[i:i+B]]), and compare each node's blocks until they differ"
HINT_LOCK = "evict only leaves with lock_ref == 0: a locked node's blocks are in a running request's block table"
HINT_UNLOCK = "unlock walks from the node up to the root, as lock does; a node whose lock_ref reaches 0 is evictable again"
HINT_COUNT = "evict frees exactly min(num_blocks, num_evictable): split a leaf longer than needed and free only its tail"
HINT_LRU = "evict the unlocked leaf with the smallest last_access first; match_prefix and insert stamp every node they pass"
HINT_REFS = "share() each block a new node takes (once), keep the tree's own block where it has one, free() each block you evict"


# --- the naive model ---------------------------------------------------------------------------
class Model:
    """Every cached block-aligned prefix -> its block, last use and lock count."""

    def __init__(self) -> None:
        self.block: dict[tuple[int, ...], int] = {}
        self.last: dict[tuple[int, ...], int] = {}
        self.locks: dict[tuple[int, ...], int] = {}
        self.clock = 0
        self.num_evicted = 0

    def match(self, tokens: list[int]) -> list[tuple[int, ...]]:
        """The cached prefixes of ``tokens``, block by block, short of the last token."""
        found = []
        for i in range(1, (len(tokens) - 1) // B + 1):
            prefix = tuple(tokens[: i * B])
            if prefix not in self.block:
                break
            found.append(prefix)
        return found

    def touch(self, prefixes: list[tuple[int, ...]]) -> None:
        self.clock += 1
        for p in prefixes:
            self.last[p] = self.clock

    def insert(self, tokens: list[int], blocks: list[int]) -> None:
        prefixes = [tuple(tokens[: i * B]) for i in range(1, min(len(tokens) // B, len(blocks)) + 1)]
        for i, p in enumerate(prefixes):
            self.block.setdefault(p, blocks[i])
        self.touch(prefixes)

    def lock(self, prefix: tuple[int, ...], delta: int) -> None:
        for i in range(1, len(prefix) // B + 1):
            self.locks[prefix[: i * B]] = self.locks.get(prefix[: i * B], 0) + delta

    @property
    def evictable(self) -> int:
        return sum(1 for p in self.block if not self.locks.get(p, 0))

    def locked_blocks(self) -> dict[int, bool]:
        return {b: self.locks.get(p, 0) > 0 for p, b in self.block.items()}

    def evict(self, n: int) -> list[int]:
        """The blocks an LRU tree frees for ``evict(n)``, in order (and forget them)."""
        freed = []
        for _ in range(min(n, self.evictable)):
            parents = {p[:-B] for p in self.block}
            leaves = [p for p in self.block if p not in parents and not self.locks.get(p, 0)]
            oldest = min(leaves, key=lambda p: self.last[p])
            freed.append(self.block.pop(oldest))
            del self.last[oldest]
            self.locks.pop(oldest, None)
        self.num_evicted += len(freed)
        return freed


class RecordingPool(BlockPool):
    """nanoserve's pool, logging every block freed, so an eviction's blocks can be read off."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self.log: list[int] = []

    def free(self, blocks: list[int]) -> None:
        self.log.extend(blocks)
        super().free(blocks)


# --- replaying an operation sequence -----------------------------------------------------------
class Replay:
    """Runs operations on the student's tree and on the model; raises at the first difference.

    ``self.trace`` holds the operations run so far, as the Python that replays them.
    """

    def __init__(self, cls: type, own_checks: bool = False, label: str = "shortest failing sequence") -> None:
        self.trace = [f"pool = BlockPool({POOL_BLOCKS}); cache = RadixCache(pool, {B})"]
        self.label, self.own_checks = label, own_checks
        self.pool = RecordingPool(POOL_BLOCKS)
        self.cache = cls(self.pool, B)
        self.model = Model()
        self.held: list[tuple[str, Any, tuple[int, ...]]] = []  # (name in the trace, handle, prefix it covers)
        self.count = 0
        if self.pool.evictor is not self.cache:
            self.fail("RadixCache(pool, block_size) did not register itself as the pool's evictor", "call allocator.set_evictor(self) in __init__")
        self.agree()

    def fail(self, what: str, hint: str) -> None:
        raise CriterionFailed(what + f"\n  {self.label}:\n    " + "\n    ".join(self.trace), hint)

    def run(self, op: str, tokens: list[int], arg: int) -> None:
        if op == "request":
            self.request(tokens, keep=bool(arg & 1), use_match=not arg & 2)
        elif op == "match":
            self.count += 1
            self.match(tokens, f"p{self.count}")
        elif op == "unlock" and self.held:
            name, handle, prefix = self.held.pop(arg % len(self.held))
            self.trace.append(f"cache.unlock({name})")
            self.cache.unlock(handle)
            self.model.lock(prefix, -1)
        elif op == "evict":
            self.trace.append(f"cache.evict({arg + 1})")
            start = len(self.pool.log)
            returned = self.cache.evict(arg + 1)
            self.trace[-1] += f"  # -> {returned}, freed {self.pool.log[start:]}"
            self.check_evicted(arg + 1, self.pool.log[start:], returned)
        elif op == "pressure" and arg + 1 <= self.pool.num_free + self.model.evictable:
            self.trace.append(f"blocks = pool.allocate({arg + 1})")
            self.pool.free(self.allocate(arg + 1))
            self.trace.append("pool.free(blocks)  # memory pressure: someone else used them")
        else:
            return
        self.agree()

    def match(self, tokens: list[int], name: str) -> Any:
        """``cache.match_prefix(tokens)`` checked against the model; returns the ComputedPrefix."""
        self.trace.append(f"{name} = cache.match_prefix({tokens})")
        want = self.model.match(tokens)
        got = self.cache.match_prefix(tokens)
        self.trace[-1] += f"  # -> {got.num_tokens} tokens, blocks {list(got.blocks)}"
        n = got.num_tokens
        if n % B:
            self.fail(f"match_prefix({tokens}) returned num_tokens={n}, not a whole number of blocks (block size {B})", HINT_ALIGN)
        if n >= len(tokens):
            self.fail(f"match_prefix({tokens}) returned num_tokens={n}: it must leave the last token to compute", HINT_ALIGN)
        if len(got.blocks) != n // B:
            self.fail(f"match_prefix({tokens}) returned {n} tokens but {len(got.blocks)} blocks", HINT_MATCH)
        if n != len(want) * B:
            self.fail(f"match_prefix({tokens}) returned {n} tokens; the longest cached block-aligned prefix leaving the last token has {len(want) * B}", HINT_MATCH)
        if list(got.blocks) != [self.model.block[p] for p in want]:
            self.fail(f"match_prefix({tokens}) returned blocks {list(got.blocks)}; the tree caches {[self.model.block[p] for p in want]} for them", HINT_MATCH)
        self.model.touch(want)
        return got

    def request(self, tokens: list[int], keep: bool, use_match: bool) -> None:
        """A request's life as the KV manager runs it: match, lock and share the hit, allocate the
        rest, insert, lock the new node, give up the old lock and the table (keeping the lock if ``keep``)."""
        self.count += 1
        p, h, t = f"p{self.count}", f"h{self.count}", f"t{self.count}"
        hit, prefix, got = [], (), None
        if use_match:
            got = self.match(tokens, p)
            hit, prefix = list(got.blocks), tuple(tokens[: got.num_tokens])
            if hit:
                self.trace.append(f"cache.lock({p}.handle); " + "; ".join(f"pool.share({b})" for b in hit))
                self.cache.lock(got.handle)
                self.model.lock(prefix, +1)
                for b in hit:
                    self.pool.share(b)
        need = len(tokens) // B - len(hit)
        if need > self.pool.num_free + self.model.evictable:
            if hit:
                self.trace.append(f"pool.free({hit[::-1]}); cache.unlock({p}.handle)  # too few blocks: give the hit back")
                self.pool.free(hit[::-1])
                self.cache.unlock(got.handle)
                self.model.lock(prefix, -1)
            return
        self.trace.append(f"{t} = {hit} + pool.allocate({need})")
        table = hit + self.allocate(need)
        self.trace[-1] += f"  # -> {table}"
        self.trace.append(f"{h} = cache.insert({tokens}, {t})")
        handle = self.cache.insert(tokens, table)
        self.model.insert(tokens, table)
        covered = tuple(tokens[: len(tokens) // B * B])
        steps = []
        if covered:
            steps.append(f"cache.lock({h})")
            self.cache.lock(handle)
            self.model.lock(covered, +1)
        if hit:
            steps.append(f"cache.unlock({p}.handle)")
            self.cache.unlock(got.handle)
            self.model.lock(prefix, -1)
        steps.append(f"pool.free({t}[::-1])")
        self.pool.free(table[::-1])
        if covered and keep:
            self.held.append((h, handle, covered))
        elif covered:
            steps.append(f"cache.unlock({h})")
            self.cache.unlock(handle)
            self.model.lock(covered, -1)
        self.trace.append("; ".join(steps))

    def allocate(self, n: int) -> list[int]:
        """``pool.allocate(n)``; when the free list is short the pool asks the tree to evict."""
        short, start = n - self.pool.num_free, len(self.pool.log)
        try:
            blocks = self.pool.allocate(n)
        except NoFreeBlocksError as exc:
            self.fail(f"pool.allocate({n}) failed ({exc}): the pool asked your tree to evict {short} of its {self.model.evictable} evictable blocks", HINT_COUNT)
        if short > 0:
            self.trace[-1] += f"  # the pool calls cache.evict({short}), which freed {self.pool.log[start:]}"
            self.check_evicted(short, self.pool.log[start:], None)
        return blocks

    def check_evicted(self, asked: int, freed: list[int], returned: int | None) -> None:
        locked, cached = self.model.locked_blocks(), set(self.model.block.values())
        holders: dict[int, str] = {}  # block -> the first held handle whose path locks it
        for name, _, prefix in self.held:
            for j in range(1, len(prefix) // B + 1):
                holders.setdefault(self.model.block[prefix[: j * B]], name)
        for b in freed:
            if b not in cached:
                self.fail(f"evict({asked}) freed block {b}, which the tree does not cache", HINT_REFS)
            if locked[b]:
                who = f" (locked through {holders[b]})" if b in holders else ""
                self.fail(f"evict({asked}) freed block {b}, which a lock protects{who}", HINT_LOCK)
        evictable = self.model.evictable
        want = self.model.evict(asked)
        if returned is not None and returned != len(want):
            self.fail(f"evict({asked}) returned {returned}; it frees min({asked}, {evictable} evictable) = {len(want)}", HINT_COUNT)
        if len(freed) != len(want):
            self.fail(f"evict({asked}) freed {len(freed)} blocks {freed}; it must free exactly min({asked}, {evictable} evictable) = {len(want)}", HINT_COUNT)
        if sorted(freed) != sorted(want):
            self.fail(f"evict({asked}) freed blocks {sorted(freed)}; least recently used leaves first, it frees {sorted(want)}", HINT_LRU)

    def agree(self) -> None:
        """The tree's view (cached blocks, locks, evictable count, stats) and the pool's refcounts
        equal the model's; with ``own_checks``, the tree's own check_invariants accepts the state."""
        want, got = self.model.locked_blocks(), dict(self.cache.cached_blocks())
        for b in sorted(set(want) | set(got)):
            if b not in got:
                self.fail(f"block {b} should be cached (it holds {self.prefix_of(b)}), cached_blocks() lacks it", HINT_REFS)
            if b not in want:
                self.fail(f"cached_blocks() has block {b}, which the tree should not cache", HINT_REFS)
            if got[b] != want[b]:
                hint = HINT_UNLOCK if got[b] else "lock adds 1 to every node from the handle up to the root"
                self.fail(f"cached_blocks() says block {b} (tokens {self.prefix_of(b)}) is {'locked' if got[b] else 'unlocked'}, it should be {'locked' if want[b] else 'unlocked'}", hint)
        evictable = self.model.evictable
        if self.cache.num_evictable != evictable:
            self.fail(f"num_evictable is {self.cache.num_evictable}, the tree has {evictable} blocks in unlocked nodes", HINT_UNLOCK)
        s = self.cache.stats()
        have = (s.num_cached_blocks, s.num_evictable_blocks, s.num_evicted_blocks)
        if have != (len(want), evictable, self.model.num_evicted):
            self.fail(f"stats() gives (cached, evictable, evicted) blocks {have}, the model {(len(want), evictable, self.model.num_evicted)}", "count what the tree holds now, and every block evict freed")
        try:
            self.pool.check_invariants(dict.fromkeys(want, 1))
        except AssertionError as exc:
            self.fail(f"the pool's refcounts are wrong: {exc} (the tree holds one reference per cached block)", HINT_REFS)
        if self.own_checks:
            try:
                self.cache.check_invariants()
            except AssertionError as exc:
                self.fail(f"check_invariants rejected a correct tree: {exc}", "compare with the docstring's list; the root is exempt")

    def prefix_of(self, block: int) -> list[int]:
        return next((list(p) for p, b in self.model.block.items() if b == block), [])


def ops_strategy() -> Any:
    from hypothesis import strategies as st

    tokens = st.lists(st.integers(1, 2), min_size=1, max_size=9)
    op = st.tuples(st.sampled_from(["request", "request", "match", "unlock", "evict", "pressure"]), tokens, st.integers(0, 8))
    return st.lists(op, max_size=25)


def signatures(sub: Submission) -> str:
    module = load_module(sub, "lab06")
    return check_signatures(module, {"Node": Node, "RadixCache": RadixCache})


def imports(sub: Submission) -> str:
    forbidden = ("nanoserve.cache.radix", "nanoserve.cache.hash_cache", "nanoserve.cache.kv_cache_manager", "nanoserve.components")
    detail = check_imports(sub.path, forbidden, {"nanoserve.cache": {"radix", "hash_cache", "kv_cache_manager"}, "nanoserve": {"components"}})
    cls = sub.module.RadixCache
    if isinstance(cls, type) and issubclass(cls, RadixCache):
        raise CriterionFailed("RadixCache is (or extends) nanoserve's own RadixCache", "write the class from scratch")
    return detail


def property_suite(sub: Submission) -> str:
    from hypothesis import HealthCheck, Verbosity, given, settings

    cls = sub.module.RadixCache
    failure: list[CriterionFailed] = []
    runs = [0]

    @settings(max_examples=80 if sub.quick else 400, deadline=None, database=None, derandomize=True, verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(ops=ops_strategy())
    def prop(ops: list[tuple[str, list[int], int]]) -> None:
        runs[0] += 1
        replay = None
        try:
            replay = Replay(cls)
            for op in ops:
                replay.run(*op)
        except (CriterionFailed, NotImplementedError) as exc:
            failure[:] = [exc] if isinstance(exc, CriterionFailed) else []
            raise
        except Exception as exc:
            trace = "\n    ".join(replay.trace) if replay else ""
            failure[:] = [CriterionFailed(f"raised {type(exc).__name__}: {exc}\n  shortest failing sequence:\n    {trace}", HINT_MATCH)]
            raise

    try:
        prop()
    except NotImplementedError:
        raise
    except Exception:
        if failure:
            raise failure[-1] from None
        raise
    return f"{runs[0]} random operation sequences agree with the naive model (matches, locks, LRU evictions, refcounts)"


# --- invariants ---------------------------------------------------------------------------------
FIXED = [
    ("request", [1, 2, 1, 2, 1, 2], 1), ("request", [1, 2, 2, 2], 0), ("match", [1, 2, 1, 1, 1], 0),
    ("request", [2, 2, 1, 1], 0), ("pressure", [], 5), ("request", [1, 2, 1, 2, 2, 2, 1], 1),
    ("unlock", [], 0), ("evict", [], 1), ("request", [1, 2, 1, 2, 1, 2, 1], 1), ("unlock", [], 1), ("evict", [], 8),
]


def sample_tree(cls: type) -> tuple[Any, Node, Node, Node]:
    """root -> [1 2 3 4] -> {[5 6] locked, [7 8] unlocked}, built with the student's own calls."""
    pool = BlockPool(16)
    cache = cls(pool, 2)
    for tokens, lock in (([1, 2, 3, 4, 5, 6], True), ([1, 2, 3, 4, 7, 8], False)):
        table = pool.allocate(3)
        handle = cache.insert(tokens, table)
        if lock:
            cache.lock(handle)
        pool.free(table[::-1])
    try:
        cache.check_invariants()
    except AssertionError as exc:
        raise CriterionFailed(f"check_invariants rejected a correct tree: {exc}", "compare with the docstring's list") from exc
    mids = list(cache.root.children.values())
    if len(mids) != 1 or tuple(mids[0].key) != (1, 2, 3, 4) or set(mids[0].children) != {(5, 6), (7, 8)}:
        raise CriterionFailed(
            "after insert([1,2,3,4,5,6]) and insert([1,2,3,4,7,8]) (block size 2) the tree should be root -> (1,2,3,4) -> {(5,6), (7,8)}",
            "insert splits the node where the new tokens part from it; children are filed by their first block",
        )
    mid = mids[0]
    return cache, mid, mid.children[(5, 6)], mid.children[(7, 8)]


def _refile(cache: Any, mid: Node, locked: Node, free: Node) -> None:
    mid.children[(9, 9)] = mid.children.pop((7, 8))


def _duplicate(cache: Any, mid: Node, locked: Node, free: Node) -> None:
    free.blocks[0] = locked.blocks[0]


BROKEN = [
    ("a child filed under a first block its key does not start with", _refile),
    ("a lock count below zero", lambda c, m, lk, fr: setattr(fr, "lock_ref", -1)),
    ("a child locked more than its parent", lambda c, m, lk, fr: setattr(lk, "lock_ref", 2)),
    ("a node with more blocks than its tokens fill", lambda c, m, lk, fr: lk.blocks.append(15)),
    ("a node whose key is not whole blocks", lambda c, m, lk, fr: setattr(lk, "key", (5, 6, 5))),
    ("a child whose parent link points elsewhere", lambda c, m, lk, fr: setattr(fr, "parent", c.root)),
    ("one block in two nodes", _duplicate),
    ("a lock the evictable count did not see", lambda c, m, lk, fr: setattr(fr, "lock_ref", 1)),
]


def invariants(sub: Submission) -> str:
    cls = sub.module.RadixCache
    replay = Replay(cls, own_checks=True, label="the fixed sequence")
    for op in FIXED:
        replay.run(*op)
    missed = []
    for what, corrupt in BROKEN:
        cache, mid, locked, free = sample_tree(cls)
        corrupt(cache, mid, locked, free)
        try:
            cache.check_invariants()
        except AssertionError:
            continue
        except Exception as exc:
            missed.append(f"{what} (raised {type(exc).__name__}, not AssertionError)")
        else:
            missed.append(what)
    if missed:
        raise CriterionFailed(f"check_invariants accepted a broken tree: {'; '.join(missed)}", "assert each property the docstring lists, for every node below the root")
    return f"check_invariants accepts the {len(FIXED)}-step fixed sequence's states and rejects {len(BROKEN)} broken trees"


# --- the engine -----------------------------------------------------------------------------------
@dataclass
class Served:
    """What one run of :func:`serve` produced."""

    tokens: list[list[int]]
    cached_tokens: list[int]  # per request: prompt tokens served from the cache
    query_tokens: int
    hit_tokens: int
    evicted_blocks: int
    computed_tokens: int  # every token the engine computed, preemptions included
    cache_class: str

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


def waves(vocab_size: int, answers: list[list[int]], wave: int, seed: int = 6) -> list[list[int]]:
    """Wave ``wave``'s prompts: two system prompts with questions, a repeat, next turns of earlier
    conversations (their prompt + answer + more), and prompts sharing nothing."""
    rng = np.random.default_rng(seed)

    def rand(n: int) -> list[int]:
        return [int(t) for t in rng.integers(3, vocab_size, size=n)]

    sys_a, sys_b, q = rand(12), rand(9), [rand(n) for n in (5, 6, 4, 7, 3, 4, 5)]
    first = [sys_a + q[0], sys_b + q[1], rand(7)]
    second = [sys_a + q[2], sys_a + q[0], sys_b + q[3], rand(10), first[0][:16]]  # the last: cached whole, 4 blocks long
    if wave == 0:
        return first
    if wave == 1:
        return second
    if wave == 2:
        return [first[0] + answers[0] + q[4], second[2] + answers[5] + q[5], rand(9)]
    return [sys_a + q[6], sys_b + q[1], first[0] + answers[0] + q[4], second[0]]


def serve(loaded: Any, prefix_cache: str, max_tokens: int = 6) -> Served:
    """Serve four waves greedily (each runs to the end before the next arrives) on the tight pool,
    checking every part's invariants after each step."""
    from nanoserve.engine import LLMEngine
    from nanoserve.sampling import SamplingParams

    engine = LLMEngine(loaded=loaded, backend="ref", prefix_cache=prefix_cache, **TIGHT)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens: list[list[int]] = []
    cached: list[int] = []
    for wave in range(4):
        ids = [engine.add_request(p, params) for p in waves(loaded.config.vocab_size, tokens, wave)]
        final: dict[str, Any] = {}
        for step in range(10_000):
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if out.finished and out.finish_reason == "error":
                    raise CriterionFailed(f"a request failed inside the engine: {out.error}")
                if out.finished:
                    final[out.request_id] = out
            try:
                engine.check_invariants()
            except AssertionError as exc:
                raise CriterionFailed(f"wave {wave}, step {step}: the engine's invariants fail: {exc}", HINT_REFS) from exc
        if engine.has_unfinished_requests():
            raise CriterionFailed("the engine did not finish a wave in 10,000 steps", "a request never got the blocks it needed: is num_evictable right?")
        tokens += [list(final[i].token_ids) for i in ids]
        cached += [final[i].num_cached_tokens for i in ids]
    stats = engine.stats().prefix_cache
    cls = type(engine.kv.prefix_cache)
    computed = sum(s.num_tokens for s in engine.step_stats)
    return Served(tokens, cached, stats.num_query_tokens, stats.num_hit_tokens, stats.num_evicted_blocks, computed, f"{cls.__module__}.{cls.__name__}")


class _Tokens:
    """The shape ``compare_tokens`` reads."""

    def __init__(self, served: Served) -> None:
        self.tokens = served.tokens


def integration(sub: Submission) -> str:
    if sub.loaded is None:
        raise CriterionFailed("no model to serve (pass --model)")
    want = serve(sub.loaded, "none")
    got = serve(sub.loaded, f"{sub.path}:RadixCache")
    if got.cache_class.startswith("nanoserve."):
        raise CriterionFailed(f"the engine served with {got.cache_class}, not the student's class")
    detail = compare_tokens(_Tokens(got), _Tokens(want))  # type: ignore[arg-type]
    reference = serve(sub.loaded, "radix")
    if reference.evicted_blocks == 0 or reference.hit_tokens == 0:
        raise CriterionFailed("the workload was meant to hit the cache and force eviction")
    sub.scratch["counters"] = (got, reference, want)
    return detail + f" (without a prefix cache), through {got.evicted_blocks} evicted blocks"


def counters(sub: Submission) -> str:
    if "counters" not in sub.scratch:
        raise CriterionFailed("needs the integration runs, which failed")
    got, ref, none = sub.scratch["counters"]
    wrong = []
    if got.cached_tokens != ref.cached_tokens:
        i = next(i for i, (a, b) in enumerate(zip(got.cached_tokens, ref.cached_tokens, strict=True)) if a != b)
        wrong.append(f"request {i} got {got.cached_tokens[i]} prompt tokens from the cache (reference {ref.cached_tokens[i]})")
    pairs = {"hit tokens": (got.hit_tokens, ref.hit_tokens), "query tokens": (got.query_tokens, ref.query_tokens), "evicted blocks": (got.evicted_blocks, ref.evicted_blocks)}
    wrong += [f"{k} {g} (reference {w})" for k, (g, w) in pairs.items() if g != w]
    if any(c % TIGHT["block_size"] for c in got.cached_tokens):
        raise CriterionFailed(", ".join(wrong) + f"; a hit of {next(c for c in got.cached_tokens if c % TIGHT['block_size'])} tokens is not whole blocks", HINT_ALIGN)
    if wrong:
        raise CriterionFailed(", ".join(wrong), "fewer hits: an eviction took the wrong leaf or too many blocks; more: a match went too far, or a lock stayed")
    return (
        f"{got.hit_tokens} of {got.query_tokens} prompt tokens from the cache (hit rate {got.hit_rate:.1%}, the reference's too), "
        f"{got.evicted_blocks} blocks evicted; the engine computed {got.computed_tokens} tokens against {none.computed_tokens} "
        f"without a prefix cache ({none.computed_tokens - got.computed_tokens} saved)"
    )


def speed(sub: Submission) -> str:
    """Insert 64 sequences (8 system prompts x 8 questions, block size 16) into an empty tree, then
    match each 5 times; the best of 3 rounds, for the student's tree and the reference's."""
    rng = np.random.default_rng(3)
    systems = [[int(t) for t in rng.integers(3, 30_000, size=64)] for _ in range(8)]
    sequences = [s + [int(t) for t in rng.integers(3, 30_000, size=48)] for s in systems for _ in range(8)]

    def one_round(cls: type) -> tuple[float, float]:
        pool = BlockPool(1024)
        cache = cls(pool, 16)
        start = time.perf_counter()
        for seq in sequences:
            table = pool.allocate(len(seq) // 16)
            cache.insert(seq, table)
            pool.free(table)
        inserted = time.perf_counter()
        for _ in range(5):
            for seq in sequences:
                cache.match_prefix(seq)
        return inserted - start, time.perf_counter() - inserted

    best = [[min(t) for t in zip(*(one_round(cls) for _ in range(3)), strict=True)] for cls in (sub.module.RadixCache, RadixCache)]
    (ins, match), (ref_ins, ref_match) = best
    return f"64 inserts {1e3 * ins:.1f} ms ({ins / ref_ins:.2f}x the reference), 320 match_prefix {1e3 * match:.1f} ms ({match / ref_match:.2f}x the reference)"


CRITERIA = [
    Criterion("signatures", "Node and RadixCache have the reference's methods, properties and parameters", signatures, gate=True),
    Criterion("imports", "does not import nanoserve's radix or hash cache, the KV manager or the component registry", imports, gate=True),
    Criterion("property", "random insert/match/lock/unlock/evict sequences against a naive prefix->block model", property_suite, points=35),
    Criterion("invariants", "check_invariants accepts true states and rejects eight broken trees", invariants, points=20),
    Criterion("integration", "the tree in the real engine under eviction: greedy tokens equal the engine's without a cache", integration, points=30),
    Criterion("counters", "prompt tokens from the cache, hit rate and evictions equal the reference RadixCache's", counters, points=15),
]

LAB = Lab("06", "radix_cache", "the radix prefix cache: match, insert, locks and LRU eviction", "nanoserve.cache.radix", tuple(CRITERIA), speed)
