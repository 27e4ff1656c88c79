"""Lab 04's grader: the block pool (the :class:`nanoserve.interfaces.BlockAllocator` seam).

    property     random operation sequences (allocate, share, free, sharing a free block,
                 a double free) run on the student's pool and on a naive model (a refcount
                 per block); hypothesis shrinks a disagreement to the shortest sequence
    invariants   the student's ``check_invariants(holders)`` accepts every true state and
                 rejects a wrong one (a block given one holder too many)
    integration  the pool inside the real engine, on a pool small enough to force
                 preemption and with the radix prefix cache evicting through it
    counters     peak blocks used and preemptions equal the reference pool's (no prefix
                 cache, so they depend on the scheduler alone), set against a contiguous cache
    speed        allocate/free cycles against the reference pool
"""

from __future__ import annotations

import time
from typing import Any

from nanoserve.cache.block_pool import BlockPool, NoFreeBlocksError
from nanoserve.labs.common import check_imports, check_signatures, compare_tokens, load_module, run_engine
from nanoserve.labs.grader import Criterion, CriterionFailed, Lab, Submission

HINT_REFCOUNT = "free() drops ONE holder: the block is free only when its refcount reaches 0"
TIGHT = {"num_blocks": 14, "block_size": 4, "max_num_batched_tokens": 8, "max_num_seqs": 3}


def signatures(sub: Submission) -> str:
    module = load_module(sub, "lab04")
    return check_signatures(module, {"BlockPool": BlockPool})


def imports(sub: Submission) -> str:
    detail = check_imports(sub.path, ("nanoserve.cache.kv_cache_manager", "nanoserve.cache.paged"), {"nanoserve.cache.block_pool": {"BlockPool"}, "nanoserve.cache": {"block_pool", "BlockPool"}})
    cls = sub.module.BlockPool
    if isinstance(cls, type) and issubclass(cls, BlockPool):
        raise CriterionFailed("BlockPool is (or extends) nanoserve's own BlockPool", "write the class from scratch")
    return detail


class Trace:
    """The operations run so far, printed as the Python that reproduces them."""

    def __init__(self, num_blocks: int) -> None:
        self.lines = [f"pool = BlockPool({num_blocks})"]

    def add(self, line: str) -> None:
        self.lines.append(line)

    def __str__(self) -> str:
        return "; ".join(self.lines)


def replay(cls: type, num_blocks: int, ops: list[tuple[str, int]], trace: Trace, holders_check: bool = False, label: str = "shortest failing sequence") -> None:
    """Run ``ops`` on ``cls(num_blocks)`` and on the naive model; raise at the first difference."""
    pool = cls(num_blocks)
    refcount = [0] * num_blocks
    held: list[int] = []  # one entry per reference handed out

    def fail(what: str, hint: str = HINT_REFCOUNT) -> None:
        raise CriterionFailed(f"{what}\n  {label}: {trace}", hint)

    def agree() -> None:
        free = refcount.count(0)
        got = (pool.num_free, pool.num_used, pool.num_allocatable)
        if got != (free, num_blocks - free, free):
            fail(f"(num_free, num_used, num_allocatable) = {got}, the model says {(free, num_blocks - free, free)}")
        if holders_check:
            pool.check_invariants({b: c for b, c in enumerate(refcount) if c})

    agree()
    for op, arg in ops:
        free_blocks = [b for b in range(num_blocks) if refcount[b] == 0]
        if op == "allocate":
            trace.add(f"pool.allocate({arg})")
            if arg > len(free_blocks):
                try:
                    pool.allocate(arg)
                except NoFreeBlocksError:
                    trace.add("  -> NoFreeBlocksError")
                else:
                    fail(f"allocate({arg}) with {len(free_blocks)} free must raise NoFreeBlocksError", "check the count before taking any block, so a refusal changes nothing")
            else:
                blocks = pool.allocate(arg)
                trace.add(f"  -> {blocks}")
                if len(blocks) != arg or len(set(blocks)) != arg:
                    fail(f"allocate({arg}) returned {blocks}: need {arg} distinct blocks")
                taken = [b for b in blocks if not (isinstance(b, int) and 0 <= b < num_blocks) or refcount[b] != 0]
                if taken:
                    fail(f"allocate({arg}) returned block {taken[0]}, which is not free", "a block leaves the free list when it is handed out")
                for b in blocks:
                    refcount[b] = 1
                    held.append(b)
        elif op == "share" and held:
            b = held[arg % len(held)]
            trace.add(f"pool.share({b})")
            pool.share(b)
            refcount[b] += 1
            held.append(b)
        elif op == "revive" and free_blocks:
            b = free_blocks[arg % len(free_blocks)]
            trace.add(f"pool.share({b})  # a free block, shared again")
            pool.share(b)
            refcount[b] = 1
            held.append(b)
        elif op == "free" and held:
            b = held.pop(arg % len(held))
            trace.add(f"pool.free([{b}])")
            pool.free([b])
            refcount[b] -= 1
        elif op == "double_free" and free_blocks:
            b = free_blocks[arg % len(free_blocks)]
            trace.add(f"pool.free([{b}])  # already free")
            try:
                pool.free([b])
            except Exception:
                trace.add("  -> raised")
            else:
                fail(f"free([{b}]) of a free block must raise", "a refcount can never go below 0")
        else:
            continue
        agree()


def ops_strategy() -> Any:
    from hypothesis import strategies as st

    op = st.tuples(st.sampled_from(["allocate", "share", "revive", "free", "double_free"]), st.integers(0, 8))
    return st.tuples(st.integers(1, 8), st.lists(op, max_size=30))


def property_suite(sub: Submission) -> str:
    from hypothesis import HealthCheck, Verbosity, given, settings

    cls = sub.module.BlockPool
    failure: list[CriterionFailed] = []
    runs = [0]

    @settings(max_examples=60 if sub.quick else 300, deadline=None, database=None, derandomize=True, verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(case=ops_strategy())
    def prop(case: tuple[int, list[tuple[str, int]]]) -> None:
        runs[0] += 1
        num_blocks, ops = case
        trace = Trace(num_blocks)
        try:
            replay(cls, num_blocks, ops, trace)
        except CriterionFailed as failed:
            failure[:] = [failed]
            raise
        except NotImplementedError:
            raise
        except Exception as exc:
            failure[:] = [CriterionFailed(f"raised {type(exc).__name__}: {exc}\n  shortest failing sequence: {trace}", HINT_REFCOUNT)]
            raise

    try:
        prop()
    except NotImplementedError:
        raise
    except Exception:
        if failure:
            raise failure[-1] from None
        raise
    return f"{runs[0]} random operation sequences agree with the naive model"


def invariants(sub: Submission) -> str:
    cls = sub.module.BlockPool
    ops = [("allocate", 3), ("share", 0), ("share", 1), ("free", 0), ("revive", 0), ("allocate", 2), ("free", 2), ("free", 0), ("double_free", 0)]
    try:
        replay(cls, 6, ops, Trace(6), holders_check=True, label="the sequence it failed on")
    except AssertionError as exc:
        raise CriterionFailed(f"check_invariants rejected a correct state: {exc}", "compare refcounts with the holders given, block by block") from exc
    pool = cls(4)
    blocks = pool.allocate(2)
    pool.share(blocks[0])
    pool.check_invariants()
    try:
        pool.check_invariants({blocks[0]: 2, blocks[1]: 2})
    except AssertionError:
        pass
    else:
        raise CriterionFailed(f"check_invariants accepted holders {{{blocks[0]}: 2, {blocks[1]}: 2}} though block {blocks[1]} has one holder", "assert refcount[b] == holders.get(b, 0) for every block")
    return "check_invariants accepts every true state and rejects a wrong holder count"


def integration(sub: Submission) -> str:
    if sub.loaded is None:
        raise CriterionFailed("no model to serve (pass --model)")
    allocator = f"{sub.path}:BlockPool"
    want = run_engine(sub.loaded, backend="ref", **TIGHT)
    got = run_engine(sub.loaded, backend="ref", block_allocator=allocator, **TIGHT)
    if want.num_preemptions == 0:
        raise CriterionFailed("the workload was meant to force preemption")
    detail = compare_tokens(got, want)
    sub.scratch["counters"] = (
        run_engine(sub.loaded, backend="ref", prefix_cache="none", block_allocator=allocator, **TIGHT),
        run_engine(sub.loaded, backend="ref", prefix_cache="none", **TIGHT),
    )
    return detail + f", through {want.num_preemptions} preemptions and prefix-cache eviction"


def counters(sub: Submission) -> str:
    if "counters" not in sub.scratch:
        raise CriterionFailed("needs the integration runs, which failed")
    got, want = sub.scratch["counters"]
    compare_tokens(got, want)
    pairs = {"peak blocks used": (got.peak_used_blocks, want.peak_used_blocks), "preemptions": (got.num_preemptions, want.num_preemptions), "steps": (got.num_steps, want.num_steps)}
    wrong = [f"{k} {g} (reference {w})" for k, (g, w) in pairs.items() if g != w]
    if wrong:
        raise CriterionFailed(", ".join(wrong), "num_allocatable must count exactly the free blocks (plus the evictable ones)")
    slots = got.peak_used_blocks * got.block_size
    return f"peak {got.peak_used_blocks} blocks = {slots} slots against {got.contiguous_slots} for a contiguous cache ({slots / got.contiguous_slots:.1%}); {got.num_preemptions} preemptions"


def speed(sub: Submission) -> str:
    """10,000 allocate(4)/free cycles on the student's pool and on the reference's."""
    times = []
    for cls in (sub.module.BlockPool, BlockPool):
        pool = cls(256)
        start = time.perf_counter()
        for _ in range(10_000):
            pool.free(pool.allocate(4))
        times.append(time.perf_counter() - start)
    return f"10,000 allocate(4)+free cycles: {1e3 * times[0]:.1f} ms ({times[0] / times[1]:.2f}x the reference pool)"


CRITERIA = [
    Criterion("signatures", "BlockPool has the reference's methods, properties and parameters", signatures, gate=True),
    Criterion("imports", "does not import nanoserve's BlockPool or the KV manager", imports, gate=True),
    Criterion("property", "random operation sequences against a naive refcount model", property_suite, points=40),
    Criterion("invariants", "check_invariants accepts true states and rejects a wrong one", invariants, points=20),
    Criterion("integration", "the pool in the real engine: preemption and eviction, greedy tokens equal", integration, points=30),
    Criterion("counters", "peak blocks and preemptions equal the reference pool's", counters, points=10),
]

LAB = Lab("04", "block_pool", "the block pool: refcounts and a free list", "nanoserve.cache.block_pool", tuple(CRITERIA), speed)
