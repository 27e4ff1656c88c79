"""Lab 05's grader: the scheduler (the :class:`nanoserve.interfaces.Scheduler` seam), for plain requests.

    property     random arrival sequences (prompt lengths, max_tokens, arrival steps) with random
                 pool sizes, block sizes, budgets and seat counts, served by the student's
                 scheduler over a fake model whose next token is a hash of every token before
                 it, read back from the K/V slots it wrote. Every step: the tokens scheduled fit
                 the budget, at most ``max_num_seqs`` requests run, each scheduled request holds
                 slots for its chunk and the K/V of its earlier tokens is intact, a preempted
                 request is the newest running one and starts again from 0 computed tokens,
                 ``update_from_output`` appends exactly the sampled token and finishes requests
                 on EOS or ``max_tokens``. At the end every request finished, with exactly the
                 tokens of an unbatched run. Hypothesis shrinks a failure to the shortest
                 arrival sequence, which the detail prints.
    invariants   the student's ``check_invariants``, looking at the states of a run of nanoserve's
                 scheduler with preemptions (so a scheduling bug does not count twice), accepts
                 every one, and rejects three broken ones: a running request whose blocks were
                 freed behind its back, a request in both queues, a preempted request that kept
                 its blocks
    integration  the engine on the given model with the student's scheduler (``scheduler =
                 "FILE.py:Scheduler"``, prefix cache off): requests arriving over time, a budget
                 that chunks the prompts, a pool small enough to force preemption; greedy tokens
                 equal the reference engine's
    counters     steps, preemptions and the peak batch (requests in one step) equal nanoserve's
                 FCFS scheduler's, on the engine run and on twelve fixed fake-model workloads
    speed        schedule() time per step against the reference, on a 64-request workload

The student's class handles plain requests only: no speculative drafts (the engine refuses
``speculative`` with a scheduler that does not set ``supports_speculation = True``), no
prefix cache (the grader's engine runs turn it off) and no admission policy but FCFS.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoserve.cache.block_pool import BlockPool
from nanoserve.cache.kv_cache_manager import KVCacheManager
from nanoserve.labs.common import check_imports, check_signatures, load_module, workload
from nanoserve.labs.grader import Criterion, CriterionFailed, Lab, Submission
from nanoserve.request import Request, RequestStatus
from nanoserve.sampling import SampleResult, SamplingParams
from nanoserve.scheduler import Scheduler

LESSON_MEMBERS = ("__init__", "add_request", "has_unfinished_requests", "schedule", "update_from_output", "rollback", "finish_request", "stats", "check_invariants")
REFERENCE = type("Scheduler", (), {name: vars(Scheduler)[name] for name in LESSON_MEMBERS})  # the lab's part of nanoserve's class

VOCAB, EOS = 64, 0  # the fake model's vocabulary; token 0 ends a request
MAX_STEPS = 3000
TIGHT = {"num_blocks": 14, "block_size": 4, "max_num_batched_tokens": 8, "max_num_seqs": 3}  # the engine runs: chunks and preempts
ARRIVAL_GAP = 2  # engine steps between two arrivals in the engine runs

HINT_BUDGET = "every chunk's tokens come off the budget, a decode's 1 included; cap each chunk at what is left"
HINT_SEATS = "admit a waiting request only while len(self.running) < self.max_num_seqs"
HINT_NEWEST = "preempt the newest running request (self.running.pop()): it has done the least work, and FCFS keeps the oldest"
HINT_RESET = "a preempted request's blocks are freed, so its K/V is gone: set num_computed_tokens = 0 and recompute prompt + outputs"
HINT_ALLOCATE = "call kv.allocate_slots(request, n) before scheduling n tokens; when it returns False, preempt or stop admitting"
HINT_UPDATE = "update_from_output: num_computed_tokens += n; append each sampled token; check stop_reason after each; finish_request frees the blocks"


def signatures(sub: Submission) -> str:
    module = load_module(sub, "lab05")
    return check_signatures(module, {"Scheduler": REFERENCE})


def imports(sub: Submission) -> str:
    detail = check_imports(sub.path, ("nanoserve.scheduler", "nanoserve.engine", "nanoserve.llm", "nanoserve.components"), {})
    cls = sub.module.Scheduler
    if isinstance(cls, type) and issubclass(cls, Scheduler):
        raise CriterionFailed("Scheduler is (or extends) nanoserve's own Scheduler", "write the class from the stub")
    return detail


# --- the fake model and the workloads ----------------------------------------------------------
def prompt_tokens(index: int, length: int) -> list[int]:
    """Request ``index``'s prompt: token ids in 1 .. VOCAB-1 (never EOS), different for each request."""
    return [1 + (7 * index + 3 * j + j * j) % (VOCAB - 1) for j in range(length)]


def next_token(tokens: list[int]) -> int:
    """The fake model: a hash of every token before the next one, so a lost or repeated token changes it."""
    return zlib.crc32(np.asarray(tokens, dtype=np.int32).tobytes()) % VOCAB


def unbatched_output(prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake model generates for one request on its own: up to EOS or ``max_tokens``."""
    tokens, out = list(prompt), []
    while len(out) < max_tokens:
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if out[-1] == EOS:
            break
    return out


@dataclass(frozen=True)
class Case:
    """A pool, a scheduler's limits, and requests ``(arrival step, prompt length, max_tokens)`` in arrival order."""

    num_blocks: int
    block_size: int
    budget: int
    max_num_seqs: int
    arrivals: tuple[tuple[int, int, int], ...]

    def requests(self) -> list[Request]:
        return [
            Request(f"req-{i}", prompt_tokens(i, p), SamplingParams(temperature=0.0, max_tokens=m), m, np.random.default_rng(0), eos_token_ids=frozenset({EOS}))
            for i, (_, p, m) in enumerate(self.arrivals)
        ]

    def __str__(self) -> str:
        parts = [f"pool of {self.num_blocks} blocks x {self.block_size} slots, max_num_batched_tokens={self.budget}, max_num_seqs={self.max_num_seqs}"]
        for i, (step, p, m) in enumerate(self.arrivals):
            parts.append(f"step {step}: req-{i} arrives (prompt {p} tokens, max_tokens {m})")
        return "; ".join(parts)


def make_case(num_blocks: int, block_size: int, budget: int, max_num_seqs: int, arrivals: list[tuple[int, int, int]]) -> Case:
    """A Case whose every request fits the whole pool (the engine refuses one that does not)."""
    num_blocks = max(num_blocks, -(-2 // block_size))
    capacity = num_blocks * block_size
    clipped = []
    for step, p, m in arrivals:
        p = min(p, capacity - 1)
        clipped.append((step, p, min(m, capacity - p)))
    return Case(num_blocks, block_size, budget, max_num_seqs, tuple(sorted(clipped, key=lambda a: a[0])))


def fixed_cases(n: int = 12, seed: int = 5) -> list[Case]:
    """``n`` seeded workloads on pools tight enough to preempt (the counters' fake-model half)."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        arrivals = [(int(rng.integers(0, 6)), int(rng.integers(1, 20)), int(rng.integers(1, 9))) for _ in range(int(rng.integers(4, 9)))]
        cases.append(make_case(int(rng.integers(4, 17)), int(rng.choice([2, 4])), int(rng.integers(4, 17)), int(rng.integers(2, 5)), arrivals))
    return cases


@dataclass
class Run:
    outputs: list[list[int]]
    num_steps: int  # steps that scheduled something
    num_preemptions: int
    peak_batch: int  # most requests in one step's batch
    schedule_seconds: float  # time spent in schedule()


class Simulation:
    """A scheduler ``cls`` serving ``case`` over the fake model, like the engine's step loop.

    The KV pool is a record of what was written where: ``written[slot] = (request id, position,
    token)``. With ``checked``, every step checks the contract (module docstring) and raises
    :class:`CriterionFailed` naming the step, what was wrong, and the case.
    """

    def __init__(self, cls: Any, case: Case, checked: bool = True) -> None:
        self.case, self.checked = case, checked
        self.kv = KVCacheManager(BlockPool(case.num_blocks), case.block_size)
        self.scheduler = cls(self.kv, case.budget, case.max_num_seqs)
        self.requests = case.requests()
        self.pending = deque(range(len(self.requests)))
        self.written: dict[int, tuple[str, int, int]] = {}
        self.clock = 0
        self.run = Run([], 0, 0, 0, 0.0)

    def fail(self, what: str, hint: str) -> None:
        raise CriterionFailed(f"step {self.clock}: {what}\n  shortest failing arrival sequence: {self.case}", hint)

    def done(self) -> bool:
        return not self.pending and not self.scheduler.has_unfinished_requests()

    def step(self) -> None:
        """Admit this step's arrivals, then schedule, run the fake model, and update (one engine step)."""
        self.clock += 1
        while self.pending and self.case.arrivals[self.pending[0]][0] < self.clock:
            self.scheduler.add_request(self.requests[self.pending.popleft()])
        if not self.scheduler.has_unfinished_requests():
            return
        before = list(self.scheduler.stats().running)
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        self.run.schedule_seconds += time.perf_counter() - start
        chunks = [(r, r.num_computed_tokens, n, k, len(r.output_token_ids)) for r, n, k in zip(batch.requests, batch.num_new_tokens, batch.num_logits)]
        if self.checked:
            self.check_schedule(batch, before)
        sampled = [self.forward(r, start, n, k) for r, start, n, k, _ in chunks]
        updates = self.scheduler.update_from_output(batch, sampled)
        if self.checked:
            self.check_update(chunks, sampled, updates)
            self.kv.check_invariants()
        self.run.num_steps += bool(batch.requests)
        self.run.num_preemptions += len(batch.preempted)
        self.run.peak_batch = max(self.run.peak_batch, len(batch.requests))

    def forward(self, request: Request, start: int, n: int, num_logits: int) -> list[SampleResult]:
        """Write the chunk's K/V (its token ids) into its slots; read the earlier ones back (checked)."""
        rid = request.request_id
        tokens = request.token_ids(0, start + n)
        slots = self.kv.slot_mapping(rid, 0 if self.checked else start, start + n).tolist()
        if self.checked:
            for pos in range(start):
                if self.written.get(slots[pos]) != (rid, pos, tokens[pos]):
                    self.fail(f"{rid} computes tokens {start}..{start + n - 1}, but the K/V of its token {pos} is not in its blocks: it was lost", HINT_RESET)
            slots = slots[start:]
        for pos, slot in enumerate(slots, start):
            self.written[slot] = (rid, pos, tokens[pos])
        return [SampleResult(next_token(tokens))] if num_logits else []

    def check_schedule(self, batch: Any, before: list[str]) -> None:
        case, kv = self.case, self.kv
        if not len(batch.requests) == len(batch.num_new_tokens) == len(batch.num_logits):
            self.fail("the batch's requests, num_new_tokens and num_logits differ in length", "append to all three together")
        chunks = ", ".join(f"{r.request_id}: {n}" for r, n in zip(batch.requests, batch.num_new_tokens))
        total = sum(batch.num_new_tokens)
        if total > case.budget:
            self.fail(f"scheduled {total} tokens ({chunks}), over the budget of {case.budget}", HINT_BUDGET)
        running = self.scheduler.stats()
        if len(batch.requests) > case.max_num_seqs or len(running.running) > case.max_num_seqs:
            self.fail(f"{len(running.running)} requests run and {len(batch.requests)} are scheduled, more than max_num_seqs={case.max_num_seqs}", HINT_SEATS)
        ids = [r.request_id for r in batch.requests]
        if len(set(ids)) != len(ids) or any(n < 1 for n in batch.num_new_tokens):
            self.fail(f"the batch lists a request twice or a chunk of no tokens ({chunks})", "schedule each request once, with n >= 1")
        if not batch.requests and not batch.preempted:
            self.fail(f"scheduled nothing though requests wait ({list(running.waiting)}) and the pool is free", HINT_ALLOCATE)
        victims = [r.request_id for r in batch.preempted]
        if victims and set(victims) != set(before[len(before) - len(victims):]):
            self.fail(f"preempted {victims}, but the newest running requests were {before[len(before) - len(victims):]} (running, oldest first: {before})", HINT_NEWEST)
        for r in batch.preempted:  # (one admitted again in the same step is checked as any scheduled request below)
            if r.num_computed_tokens != 0:
                self.fail(f"preempted {r.request_id} still counts {r.num_computed_tokens} computed tokens, but its blocks were freed", HINT_RESET)
            if r.request_id not in ids and (kv.block_table(r.request_id) or r.status != RequestStatus.WAITING or r.request_id not in running.waiting):
                self.fail(f"preempted {r.request_id} must give up its blocks and wait (status {r.status.value}, {len(kv.block_table(r.request_id))} blocks)", HINT_RESET)
        for r, n, k in zip(batch.requests, batch.num_new_tokens, batch.num_logits):
            start, rid = r.num_computed_tokens, r.request_id
            if r.status != RequestStatus.RUNNING:
                self.fail(f"{rid} is scheduled with status {r.status.value}", "a request runs from its admission until it finishes or is preempted")
            if start + n > r.num_tokens:
                self.fail(f"{rid}: {n} tokens from {start}, but it has only {r.num_tokens} known tokens", "a chunk is at most num_tokens - num_computed_tokens")
            if k != (start + n == r.num_tokens):
                self.fail(f"{rid}: num_logits {k} for tokens {start}..{start + n - 1} of {r.num_tokens}", "ask for 1 logits row when the chunk reaches the last known token, else 0")
            held = len(kv.block_table(rid)) * case.block_size
            if held < start + n:
                self.fail(f"{rid} holds {held} slots but its chunk needs {start + n}", HINT_ALLOCATE)

    def check_update(self, chunks: list[tuple[Request, int, int, int, int]], sampled: list[list[SampleResult]], updates: Any) -> None:
        live = self.scheduler.stats()
        want_updates = []
        for (r, start, n, _, outputs_before), results in zip(chunks, sampled):
            rid, new = r.request_id, [s.token_id for s in results]
            if new:
                want_updates.append((rid, new))
            if r.output_token_ids[outputs_before:] != new:
                self.fail(f"{rid} was sampled {new} but appended {r.output_token_ids[outputs_before:]}", HINT_UPDATE)
            reason = None
            if new and new[-1] == EOS:
                reason = "stop"
            elif len(r.output_token_ids) >= r.max_tokens:
                reason = "length"
            if reason is None:
                if r.is_finished:
                    self.fail(f"{rid} finished ({r.finish_reason}) after {len(r.output_token_ids)} of {r.max_tokens} tokens, no EOS", HINT_UPDATE)
                if r.num_computed_tokens != start + n:
                    self.fail(f"{rid} has {r.num_computed_tokens} computed tokens after computing {start}..{start + n - 1}", HINT_UPDATE)
            elif not r.is_finished or r.finish_reason != reason:
                self.fail(f"{rid} should have finished ({reason!r}) but is {r.status.value} ({r.finish_reason!r})", HINT_UPDATE)
            elif self.kv.block_table(rid) or rid in live.running or rid in live.waiting:
                self.fail(f"finished {rid} still holds blocks or a place in a queue", "finish_request removes the request from its queue and frees its blocks")
        got = [(r.request_id, list(new)) for r, new in updates]
        if got != want_updates:
            self.fail(f"update_from_output returned {got}, should return {want_updates}", "return (request, new token ids) for every request that got tokens, in batch order")

    def finish(self) -> Run:
        """Step until every request finished; check the outputs against unbatched runs."""
        while not self.done():
            if self.clock >= MAX_STEPS:
                queues = self.scheduler.stats()
                self.fail(f"not finished after {MAX_STEPS} steps: running {list(queues.running)}, waiting {list(queues.waiting)}", HINT_ALLOCATE)
            self.step()
        self.run.outputs = [list(r.output_token_ids) for r in self.requests]
        if self.checked:
            for r in self.requests:
                want = unbatched_output(r.prompt_token_ids, r.max_tokens)
                if r.output_token_ids != want:
                    self.fail(f"{r.request_id} generated {r.output_token_ids}, alone it generates {want}", HINT_RESET)
            counted = self.scheduler.stats().num_preemptions
            if counted != self.run.num_preemptions:
                self.fail(f"stats().num_preemptions is {counted}, but the batches listed {self.run.num_preemptions} preemptions", "count each preemption in self.num_preemptions")
        return self.run


# --- the criteria -------------------------------------------------------------------------------
def cases_strategy() -> Any:
    from hypothesis import strategies as st

    arrival = st.tuples(st.integers(0, 6), st.integers(1, 24), st.integers(1, 8))
    return st.builds(
        make_case, num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4]), budget=st.integers(1, 16),
        max_num_seqs=st.integers(1, 4), arrivals=st.lists(arrival, min_size=1, max_size=8),
    )


def property_suite(sub: Submission) -> str:
    from hypothesis import HealthCheck, Verbosity, given, settings

    cls = sub.module.Scheduler
    failure: list[CriterionFailed] = []
    totals = {"runs": 0, "preemptions": 0, "steps": 0}

    @settings(max_examples=60 if sub.quick else 300, deadline=None, database=None, derandomize=True, verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(case=cases_strategy())
    def prop(case: Case) -> None:
        sim = Simulation(cls, case)
        try:
            run = sim.finish()
        except CriterionFailed as failed:
            failure[:] = [failed]
            raise
        except NotImplementedError:
            raise
        except Exception as exc:
            failure[:] = [CriterionFailed(f"step {sim.clock}: raised {type(exc).__name__}: {exc}\n  shortest failing arrival sequence: {case}", HINT_ALLOCATE)]
            raise
        totals["runs"] += 1
        totals["preemptions"] += run.num_preemptions
        totals["steps"] += run.num_steps

    try:
        prop()
    except NotImplementedError:
        raise
    except Exception:
        if failure:
            raise failure[-1] from None
        raise
    return (f"{totals['runs']} random arrival sequences ({totals['steps']} steps, {totals['preemptions']} preemptions): "
            "budget, seats, K/V and outputs hold, every request finished")


INVARIANTS_CASE = make_case(8, 2, 6, 3, [(0, 5, 8), (0, 3, 8), (1, 4, 8), (2, 2, 6)])


def seen_by(cls: Any, sim: Simulation) -> Any:
    """The student's class looking at the state of the reference scheduler's run: the same
    ``kv``, ``waiting``, ``running`` and count (the stub's constructor names them), so only
    ``check_invariants`` is graded here, never the student's own scheduling."""
    ref = sim.scheduler
    view = cls(ref.kv, ref.max_num_batched_tokens, ref.max_num_seqs)
    view.waiting, view.running, view.num_preemptions = ref.waiting, ref.running, ref.num_preemptions
    return view


def state_to_break() -> Simulation:
    """The reference's run of the invariants case, stopped when two requests run with computed
    tokens and one waits."""
    sim = Simulation(Scheduler, INVARIANTS_CASE)
    while not sim.done():
        sim.step()
        running = sim.scheduler.running
        if len(running) >= 2 and all(r.num_computed_tokens > 0 for r in running) and sim.scheduler.waiting:
            return sim
    raise AssertionError("the invariants case never had two running requests and one waiting")


def freed_behind_its_back(s: Any) -> None:
    s.kv.free(s.running[0])


def queued_twice(s: Any) -> None:
    s.waiting.append(s.running[0])


def kept_its_blocks(s: Any) -> None:
    victim = s.running.pop()
    victim.status = RequestStatus.WAITING
    s.waiting.appendleft(victim)


BROKEN = [
    (freed_behind_its_back, "a running request whose blocks were freed (it holds fewer slots than its computed tokens)",
     "assert every running request holds len(kv.block_table(id)) * kv.block_size >= num_computed_tokens"),
    (queued_twice, "a request both running and waiting", "assert no request id is queued twice, and each queue's statuses"),
    (kept_its_blocks, "a preempted request that kept its blocks", "assert a waiting request holds no blocks (kv.block_table(id) is empty)"),
]


def invariants(sub: Submission) -> str:
    cls = sub.module.Scheduler
    sim = Simulation(Scheduler, INVARIANTS_CASE)
    while not sim.done():
        sim.step()
        try:
            seen_by(cls, sim).check_invariants()
        except AssertionError as exc:
            queues = sim.scheduler.stats()
            raise CriterionFailed(
                f"check_invariants rejected a correct state after step {sim.clock} (running {list(queues.running)}, waiting {list(queues.waiting)}): {exc}",
                "assert only what always holds between steps",
            ) from exc
    if sim.run.num_preemptions == 0:
        raise CriterionFailed("the invariants case was meant to preempt")
    num_states = sim.clock
    for corrupt, what, hint in BROKEN:
        broken = state_to_break()
        view = seen_by(cls, broken)
        corrupt(view)
        try:
            view.check_invariants()
        except AssertionError:
            continue
        raise CriterionFailed(f"check_invariants accepted {what}", hint)
    return f"check_invariants accepts {num_states} states of a run with {sim.run.num_preemptions} preemptions and rejects {len(BROKEN)} broken ones"


@dataclass
class Served:
    tokens: list[list[int]]
    num_steps: int
    num_preemptions: int
    peak_batch: int


def serve(loaded: Any, scheduler: str = "fcfs", max_tokens: int = 8) -> Served:
    """Serve :func:`~nanoserve.labs.common.workload` greedily, one arrival every ARRIVAL_GAP steps,
    on the engine with ``scheduler``, the prefix cache off and the TIGHT pool and budget."""
    from nanoserve.engine import LLMEngine

    engine = LLMEngine(loaded=loaded, backend="ref", prefix_cache="none", scheduler=scheduler, **TIGHT)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = deque(workload(loaded.config.vocab_size))
    ids: list[str] = []
    final: dict[str, list[int]] = {}
    for step in range(10_000):
        if prompts and step % ARRIVAL_GAP == 0:
            ids.append(engine.add_request(prompts.popleft(), params))
        if not prompts and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished and out.finish_reason == "error":
                raise CriterionFailed(f"a request failed inside the engine: {out.error}", "every scheduled request must hold slots for its chunk until the step ends")
            if out.finished:
                final[out.request_id] = list(out.token_ids)
        engine.kv.check_invariants()
        if set(engine.kv.stats().block_tables) - set(engine.requests):
            raise CriterionFailed("a finished request still holds blocks", "finish_request frees the request's blocks")
    if engine.has_unfinished_requests() or len(final) != len(ids):
        raise CriterionFailed("the engine did not finish the workload in 10,000 steps", HINT_ALLOCATE)
    stats = engine.stats()
    return Served([final[i] for i in ids], stats.num_steps, stats.num_preemptions, max(s.batch_size for s in engine.step_stats))


def integration(sub: Submission) -> str:
    if sub.loaded is None:
        raise CriterionFailed("no model to serve (pass --model)")
    want = serve(sub.loaded)
    if want.num_preemptions == 0:
        raise CriterionFailed("the workload was meant to force preemption")
    got = serve(sub.loaded, f"{sub.path}:Scheduler")
    sub.scratch["counters"] = (got, want)
    for i, (g, w) in enumerate(zip(got.tokens, want.tokens, strict=True)):
        if g != w:
            at = next((j for j, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), min(len(g), len(w)))
            raise CriterionFailed(f"request {i}: token {at} is {g[at] if at < len(g) else 'missing'}, the reference engine's is {w[at] if at < len(w) else 'none'}", HINT_RESET)
    longest = max(len(p) for p in workload(sub.loaded.config.vocab_size))
    return (f"{len(got.tokens)} requests, {sum(map(len, got.tokens))} greedy tokens equal the reference engine's, "
            f"prompts up to {longest} tokens chunked under a budget of {TIGHT['max_num_batched_tokens']}, through {want.num_preemptions} preemptions")


def counters(sub: Submission) -> str:
    if "counters" not in sub.scratch:
        raise CriterionFailed("needs the integration runs, which failed")
    got, want = sub.scratch["counters"]
    hint = "FCFS: running requests first in arrival order, then admit from the front of the queue; admit none in a step that preempted"
    pairs = {"steps": (got.num_steps, want.num_steps), "preemptions": (got.num_preemptions, want.num_preemptions), "peak batch": (got.peak_batch, want.peak_batch)}
    wrong = [f"{k} {g} (reference {w})" for k, (g, w) in pairs.items() if g != w]
    if wrong:
        raise CriterionFailed("the engine run: " + ", ".join(wrong), hint)
    cases = fixed_cases()
    for case in cases:
        g, w = Simulation(sub.module.Scheduler, case, checked=False).finish(), Simulation(Scheduler, case, checked=False).finish()
        pairs = {"steps": (g.num_steps, w.num_steps), "preemptions": (g.num_preemptions, w.num_preemptions), "peak batch": (g.peak_batch, w.peak_batch)}
        wrong = [f"{k} {a} (reference {b})" for k, (a, b) in pairs.items() if a != b]
        if wrong:
            raise CriterionFailed(f"{', '.join(wrong)} on the fake-model workload: {case}", hint)
    return (f"the engine run: {got.num_steps} steps, {got.num_preemptions} preemptions, peak batch {got.peak_batch}, as the reference; "
            f"so are {len(cases)} fixed fake-model workloads")


def speed(sub: Submission) -> str:
    """schedule() time per step for 64 requests (16-200 prompt tokens, 16-64 outputs) against the reference."""
    rng = np.random.default_rng(0)
    arrivals = [(i // 4, int(rng.integers(16, 201)), int(rng.integers(16, 65))) for i in range(64)]
    case = make_case(400, 16, 256, 32, arrivals)
    per_step, steps = [float("inf"), float("inf")], 0
    for _ in range(5):  # alternating, best of five: the first run of either warms the caches
        for i, cls in enumerate((sub.module.Scheduler, Scheduler)):
            run = Simulation(cls, case, checked=False).finish()
            per_step[i] = min(per_step[i], run.schedule_seconds / max(run.num_steps, 1))
            steps = steps or run.num_steps
    return f"schedule(): {1e6 * per_step[0]:.0f} us per step over {steps} steps ({per_step[0] / per_step[1]:.2f}x the reference scheduler)"


CRITERIA = [
    Criterion("signatures", "Scheduler has the reference's methods and parameters", signatures, gate=True),
    Criterion("imports", "does not import or extend nanoserve's scheduler (or the engine)", imports, gate=True),
    Criterion("property", "random arrival sequences over a fake model: budget, seats, K/V, preemption, outputs", property_suite, points=40),
    Criterion("invariants", "check_invariants accepts true states and rejects three broken ones", invariants, points=15),
    Criterion("integration", "the scheduler in the real engine: chunked prefill and preemption, greedy tokens equal", integration, points=30),
    Criterion("counters", "steps, preemptions and peak batch equal the reference scheduler's", counters, points=15),
]

LAB = Lab("05", "scheduler", "the scheduler: continuous batching, chunked prefill, preemption", "nanoserve.scheduler", tuple(CRITERIA), speed)
