"""The engine's seams: other implementations plug in and change no output; bad ones are refused.

Also the pieces the seams promise to later features: an eviction hook in the block pool,
logits processors in the sampler, several logits rows per request, rollback of computed
tokens, and one stats snapshot.
"""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoserve import components
from nanoserve.cache.block_pool import BlockPool, NoFreeBlocksError
from nanoserve.cache.contiguous import ContiguousKVCache
from nanoserve.cache.kv_cache_manager import KVCacheManager
from nanoserve.cache.paged import PagedKVCache
from nanoserve.engine import LLMEngine
from nanoserve.errors import ComponentError
from nanoserve.interfaces import ScheduledBatch
from nanoserve.kernels import get_backend
from nanoserve.model import LlamaModel
from nanoserve.model_runner import ModelRunner
from nanoserve.request import Request
from nanoserve.sampling import SamplingParams
from tests import test_engine
from tests.test_engine import make_engine, random_prompt, run_to_completion

ALT = os.path.join(os.path.dirname(__file__), "alt_components.py")
ALTERNATIVES = {
    "block_allocator": f"{ALT}:StackBlockPool",
    "kv_manager": f"{ALT}:OneBlockAtATimeKVManager",
    "scheduler": f"{ALT}:ShortestPromptFirstScheduler",
    "sampler": f"{ALT}:ReferenceKernelSampler",
}


def run_workload(engine: LLMEngine, work: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    ids = [engine.add_request(prompt, params) for prompt, params in work]
    final = run_to_completion(engine)  # checks every part's invariants after each step
    return [final[i].token_ids for i in ids]


def mixed_workload(vocab: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(seed)
    work = []
    for i in range(7):
        prompt = random_prompt(rng, vocab, int(rng.integers(1, 30)))
        temperature = 0.0 if i % 2 == 0 else 0.8  # greedy and seeded random requests side by side
        work.append((prompt, SamplingParams(temperature=temperature, top_p=0.9, seed=i, max_tokens=int(rng.integers(1, 12)), ignore_eos=True)))
    return work


@pytest.mark.parametrize("seam", sorted(ALTERNATIVES))
def test_another_implementation_of_each_seam_gives_the_same_outputs(tiny_loaded, seam):
    """A tight pool (preemption) and a small budget (chunking); greedy and seeded outputs unchanged."""
    work = mixed_workload(tiny_loaded.config.vocab_size, seed=1)
    kwargs = {"num_blocks": 14, "block_size": 4, "max_num_batched_tokens": 8, "max_num_seqs": 3}
    plain = run_workload(make_engine(tiny_loaded, **kwargs), work)
    engine = make_engine(tiny_loaded, **kwargs, **{seam: ALTERNATIVES[seam]})
    part = {"block_allocator": engine.kv.allocator, "kv_manager": engine.kv, "scheduler": engine.scheduler, "sampler": engine.sampler}[seam]
    assert type(part).__name__ == ALTERNATIVES[seam].rsplit(":", 1)[1]
    assert run_workload(engine, work) == plain
    assert engine.stats().num_preemptions > 0, "the pool was meant to force preemption"


def test_all_alternative_implementations_together_give_the_same_outputs(tiny_loaded):
    work = mixed_workload(tiny_loaded.config.vocab_size, seed=2)
    kwargs = {"num_blocks": 20, "block_size": 4, "max_num_batched_tokens": 16, "max_num_seqs": 4}
    assert run_workload(make_engine(tiny_loaded, **kwargs, **ALTERNATIVES), work) == run_workload(make_engine(tiny_loaded, **kwargs), work)


@pytest.mark.parametrize("seam", sorted(ALTERNATIVES))
def test_engine_state_machine_on_another_implementation(tiny_loaded, seam):
    class Machine(test_engine.EngineMachine):
        loaded = tiny_loaded
        engine_kwargs = {seam: ALTERNATIVES[seam]}

    case = Machine.TestCase
    case.settings = settings(max_examples=6, stateful_step_count=25, deadline=None, derandomize=True)
    case().runTest()


def test_a_seam_refuses_an_object_missing_a_method_and_names_it(tiny_loaded):
    with pytest.raises(ComponentError, match=r"\(NotAScheduler\) does not implement Scheduler: missing update_from_output$"):
        make_engine(tiny_loaded, scheduler=f"{ALT}:NotAScheduler")
    with pytest.raises(ComponentError, match="missing num_blocks, num_free, num_used, num_allocatable, allocate, "):
        components.require(object(), "block_allocator")


@pytest.mark.parametrize(
    "seam, name, message",
    [
        ("scheduler", "nope", "unknown scheduler 'nope'; registered: fcfs"),
        ("sampler", "/no/such/file.py:Sampler", "does not exist"),
        ("kv_manager", f"{ALT}:Missing", "defines no class or function 'Missing'"),
        ("block_allocator", "no_such_module_xyz:Pool", "cannot import"),
    ],
)
def test_unknown_or_missing_implementations_get_a_clear_error(tiny_loaded, seam, name, message):
    with pytest.raises(ComponentError, match=message):
        make_engine(tiny_loaded, **{seam: name})


def test_a_registered_name_resolves_to_its_implementation(tiny_loaded):
    from tests.alt_components import ShortestPromptFirstScheduler

    components.register_component("scheduler", "shortest-prompt-first", ShortestPromptFirstScheduler)
    assert "shortest-prompt-first" in components.available_components("scheduler")
    engine = make_engine(tiny_loaded, scheduler="shortest-prompt-first")
    assert isinstance(engine.scheduler, ShortestPromptFirstScheduler)
    long_, short = engine.add_request(list(range(3, 30)), SamplingParams(max_tokens=1)), engine.add_request([5, 6], SamplingParams(max_tokens=1))
    assert engine.stats().waiting == (short, long_)


# --- the block pool's eviction hook ---------------------------------------------------------
class HoldingCache:
    """An evictor that keeps references to some blocks, least recently added first."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool, self.held = pool, []

    def keep(self, block: int) -> None:
        self.pool.share(block)
        self.held.append(block)

    @property
    def num_evictable(self) -> int:
        return len(self.held)

    def evict(self, num_blocks: int) -> int:
        gone, self.held = self.held[:num_blocks], self.held[num_blocks:]
        self.pool.free(gone)
        return len(gone)

    def forget(self, block: int) -> None:
        assert block not in self.held, "the pool handed out a block the cache still holds"

    def indexes(self, block: int) -> bool:
        return False  # it holds references: a freed block is never one of its own


def test_allocation_evicts_from_the_evictor_only_when_the_free_list_runs_short():
    pool = BlockPool(6)
    cache = HoldingCache(pool)
    pool.set_evictor(cache)
    request_blocks = pool.allocate(4)
    for b in request_blocks[:3]:
        cache.keep(b)
    pool.free(request_blocks)  # the request is done; the cache still holds three of its blocks
    pool.check_invariants({b: 1 for b in cache.held})
    assert (pool.num_free, pool.num_allocatable) == (3, 6)
    assert len(pool.allocate(3)) == 3 and cache.held == request_blocks[:3]  # free blocks first: no eviction
    assert sorted(pool.allocate(2)) == sorted(request_blocks[:2])  # now it must evict the two oldest
    assert cache.held == request_blocks[2:3]
    pool.check_invariants({b: 1 for b in cache.held} | {b: 1 for b in range(6) if b not in cache.held})
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert cache.held == request_blocks[2:3], "a failed allocation evicts nothing"


# --- logits processors ------------------------------------------------------------------------
def test_a_logits_processor_changes_only_its_own_request(tiny_loaded):
    prompt = random_prompt(np.random.default_rng(4), tiny_loaded.config.vocab_size, 9)
    free = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    engine = make_engine(tiny_loaded)
    plain = run_workload(engine, [(prompt, free)])[0]
    banned = plain[3]

    def ban(output_ids: list[int], logits: np.ndarray) -> np.ndarray:
        logits[banned] = -np.inf
        return logits

    def force_seven(output_ids: list[int], logits: np.ndarray) -> np.ndarray:
        forced = np.full_like(logits, -np.inf)
        forced[7] = 0.0
        return forced

    banning = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logits_processors=[ban])
    forcing = SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True, logits_processors=[force_seven], logprobs=0)
    engine = make_engine(tiny_loaded)
    ids = [engine.add_request(prompt, p) for p in (free, banning, forcing)]
    final = run_to_completion(engine)
    assert final[ids[0]].token_ids == plain, "an unconstrained request in the same batch is unchanged"
    got = final[ids[1]].token_ids
    assert banned not in got
    first_ban = plain.index(banned)
    assert got[:first_ban] == plain[:first_ban] and got[first_ban] != banned
    assert final[ids[2]].token_ids == [7] * 6
    raw = [r.logprob for r in final[ids[2]].logprobs]
    assert all(lp < 0 for lp in raw), "logprobs stay those of the raw model, not of the forced distribution"


def test_sampling_params_refuse_a_processor_that_is_not_callable():
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=["ban"])


# --- several logits rows per request ------------------------------------------------------------
@given(length=st.integers(2, 30), rows=st.integers(1, 6), seed=st.integers(0, 10**6))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_runner_returns_logits_for_the_last_rows_of_a_chunk(tiny_loaded, length, rows, seed):
    """A verification-shaped chunk: its last k rows equal each position's one-shot logits."""
    rows = min(rows, length)
    config, backend = tiny_loaded.config, get_backend("ref")
    model = LlamaModel(config, tiny_loaded.weights, backend)
    prompt = random_prompt(np.random.default_rng(seed), config.vocab_size, length)
    one_shot = ContiguousKVCache(config, 64, backend)
    one_shot.set_positions(np.arange(length))
    expected = model.compute_logits(model.forward(np.asarray(prompt), np.arange(length), one_shot))[-rows:]
    kv = KVCacheManager(BlockPool(32), block_size=4)
    runner = ModelRunner(model, PagedKVCache(config, 32, 4, backend), kv)
    request = Request("r", prompt, SamplingParams(), 4, np.random.default_rng(0))
    assert kv.allocate_slots(request, length)
    logits = runner.execute(ScheduledBatch([request], [length], [rows]))
    assert logits.shape == (rows, config.vocab_size)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


# --- rollback -----------------------------------------------------------------------------------
@given(plan=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3), st.integers(1, 8)), min_size=1, max_size=6))
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_rolling_back_computed_tokens_recomputes_them_and_changes_no_output(tiny_loaded, plan):
    """At random steps, forget the K/V of a request's last few tokens: the text must not change."""
    work = mixed_workload(tiny_loaded.config.vocab_size, seed=5)
    plain = run_workload(make_engine(tiny_loaded, max_num_batched_tokens=8), work)
    engine = make_engine(tiny_loaded, max_num_batched_tokens=8)
    ids = [engine.add_request(prompt, params) for prompt, params in work]
    final = {}
    for step in range(2000):
        for at, which, n in plan:
            live = [engine.requests[i] for i in engine.stats().running]
            if at == step and live:
                request = live[which % len(live)]
                engine.scheduler.rollback(request, min(n, request.num_computed_tokens))
        final.update({o.request_id: o for o in engine.step() if o.finished})
        engine.check_invariants()
        if not engine.has_unfinished_requests():
            break
    assert [final[i].token_ids for i in ids] == plain


def test_rollback_refuses_more_than_was_computed(tiny_loaded):
    engine = make_engine(tiny_loaded)
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4))
    engine.step()
    with pytest.raises(ValueError, match="cannot roll back 9 of 3 computed tokens"):
        engine.scheduler.rollback(engine.requests[rid], 9)


# --- one stats surface ----------------------------------------------------------------------------
def test_stats_is_one_consistent_snapshot(tiny_loaded):
    engine = make_engine(tiny_loaded, num_blocks=32, max_num_seqs=2)
    idle = engine.stats()
    assert (idle.num_running, idle.num_waiting, idle.num_used_blocks, idle.num_steps, idle.last_step) == (0, 0, 0, 0, None)
    ids = [engine.add_request(list(range(3, 3 + n)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)) for n in (5, 9, 13)]
    engine.step()
    s = engine.stats()
    assert s.running == tuple(ids[:2]) and s.waiting == (ids[2],)
    assert s.num_used_blocks + s.num_free_blocks == s.num_blocks == 32
    assert sum(len(t) for t in s.block_tables.values()) == s.num_used_blocks == 2 + 3  # 5 and 9 tokens, blocks of 4
    assert s.prompt_tokens == 27 and s.generation_tokens == 2 and s.num_steps == 1
    assert s.last_step.scheduled == ((ids[0], 5), (ids[1], 9))
    engine.step()
    assert s.num_steps == 1, "a snapshot does not change afterwards"
    run_to_completion(engine)
    end = engine.stats()
    assert (end.finished, end.generation_tokens, end.num_used_blocks, end.block_tables) == (3, 15, 0, {})
    assert end.last_step.blocks_used == 0 and end.last_step.kv_utilization == 0.0, "an empty pool is not 100% utilised"


# --- one config ---------------------------------------------------------------------------------
def imported_modules(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_config_is_a_leaf_and_the_server_command_line_does_not_import_the_cli():
    import nanoserve

    root = os.path.dirname(nanoserve.__file__)
    assert not any(m.startswith("nanoserve") for m in imported_modules(os.path.join(root, "config.py")))
    assert not any(m == "nanoserve.cli" for m in imported_modules(os.path.join(root, "server", "cli.py")))


def test_every_config_field_is_a_flag_with_its_default():
    import dataclasses

    from nanoserve.cli import build_parser
    from nanoserve.config import EngineConfig, ServerConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command, classes in {"generate": [EngineConfig], "chat": [EngineConfig], "serve": [EngineConfig, ServerConfig]}.items():
        actions = {a.dest: a for a in sub[command]._actions}
        for cls in classes:
            for f in dataclasses.fields(cls):
                assert f.name in actions, f"{command} has no flag for {cls.__name__}.{f.name}"
                if f.metadata.get("env") is None:
                    assert actions[f.name].default == f.default, f"{command} --{f.name}: default differs"
                assert actions[f.name].help.startswith(f.metadata["help"])
