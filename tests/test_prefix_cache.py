"""The prefix caches (radix tree and hash chain): correct reuse, invariants, and no output change.

A cached block is correct if it holds the K/V of exactly the tokens the lookup asked for,
*and of everything before them* (a token's K/V depends on its whole prefix). The state
machine below records, for every block, the prefix its K/V was computed from, and checks
every match against that record and against a naive oracle: the set of sequences inserted.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanoserve.cache.block_pool import BlockPool
from nanoserve.cache.hash_cache import HashPrefixCache
from nanoserve.cache.kv_cache_manager import KVCacheManager
from nanoserve.cache.radix import RadixCache
from nanoserve.request import Request
from nanoserve.sampling import SamplingParams
from tests.test_engine import make_engine, random_prompt, run_to_completion

CACHES = {"radix": RadixCache, "hash": HashPrefixCache}


def run_one(engine, prompt: list[int], params: SamplingParams):
    """Add one request, run the engine dry, return that request's final output."""
    rid = engine.add_request(prompt, params)
    return run_to_completion(engine)[rid]
B = 2  # block size of the state machine: small, so prefixes collide often


class PrefixCacheMachine(RuleBasedStateMachine):
    """Requests over a 3-token alphabet share prefixes; a 10-block pool forces eviction."""

    cache_class: type = RadixCache

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(10)
        self.cache = self.cache_class(self.pool, B)
        self.kv = KVCacheManager(self.pool, B, self.cache)
        self.live: list[Request] = []
        self.written: dict[int, tuple[int, ...]] = {}  # block -> the prefix its K/V was computed from
        self.inserted: set[tuple[int, ...]] = set()  # oracle: every full-block prefix ever cached
        self.ids = 0

    def _write(self, request: Request, start: int, end: int) -> None:
        """'Compute' tokens start..end-1: each slot's K/V now stands for the prefix up to it."""
        tokens = request.token_ids(0, end)
        table = self.kv.block_table(request.request_id)
        for t in range(start, end):
            if (t + 1) % B == 0:  # a block is full: record what it holds
                self.written[table[t // B]] = tuple(tokens[: t + 1])

    def _check_match(self, tokens: list[int], prefix) -> None:
        """The match holds exactly this prefix's K/V, and is as long as the oracle allows."""
        assert prefix.num_tokens % B == 0 and prefix.num_tokens < len(tokens), "at least one token is computed"
        assert prefix.num_tokens == len(prefix.blocks) * B
        for i, block in enumerate(prefix.blocks):
            assert self.written.get(block) == tuple(tokens[: (i + 1) * B]), f"block {block} holds other K/V"
        limit = (len(tokens) - 1) // B  # whole blocks short of the last token
        best = max((i * B for i in range(1, limit + 1) if tuple(tokens[: i * B]) in self.inserted), default=0)
        assert prefix.num_tokens <= best, "a hit the oracle never cached"
        if self.cache.stats().num_evicted_blocks == 0:
            assert prefix.num_tokens == best, "a miss with nothing evicted"

    def _cached(self, request: Request) -> None:
        n = request.num_computed_tokens // B * B
        tokens = tuple(request.token_ids(0, n))
        self.inserted |= {tokens[: i * B] for i in range(1, n // B + 1)}

    @rule(tokens=st.lists(st.integers(1, 3), min_size=1, max_size=9))
    def admit(self, tokens):
        request = Request(f"r{self.ids}", tokens, SamplingParams(), 8, np.random.default_rng(0))
        self.ids += 1
        prefix = self.kv.get_computed_prefix(request)
        self._check_match(tokens, prefix)
        if not self.kv.allocate_slots(request, len(tokens), prefix=prefix):
            return
        request.num_computed_tokens = prefix.num_tokens
        self._write(request, prefix.num_tokens, len(tokens))
        request.num_computed_tokens = len(tokens)
        self.kv.cache_blocks(request)
        self._cached(request)
        self.live.append(request)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 50), token=st.integers(1, 3))
    def decode(self, index, token):
        request = self.live[index % len(self.live)]
        request.output_token_ids.append(token)
        if self.kv.allocate_slots(request, 1):
            self._write(request, request.num_computed_tokens, request.num_computed_tokens + 1)
            request.num_computed_tokens += 1
        else:
            request.output_token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 50))
    def preempt_and_resume(self, index):
        """Free a running request (its computed blocks get cached), then admit it again."""
        request = self.live.pop(index % len(self.live))
        self.kv.free(request)
        self._cached(request)
        request.num_computed_tokens = 0
        prefix = self.kv.get_computed_prefix(request)
        self._check_match(request.token_ids(0, request.num_tokens), prefix)
        if self.kv.allocate_slots(request, request.num_tokens, prefix=prefix):
            request.num_computed_tokens = prefix.num_tokens
            self._write(request, prefix.num_tokens, request.num_tokens)
            request.num_computed_tokens = request.num_tokens
            self.kv.cache_blocks(request)
            self.live.append(request)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 50))
    def finish(self, index):
        request = self.live.pop(index % len(self.live))
        self.kv.free(request)
        self._cached(request)

    @rule(n=st.integers(1, 10))
    def memory_pressure(self, n):
        """Someone else allocates n blocks and gives them back: eviction if the pool is short."""
        if n <= self.pool.num_allocatable:
            blocks = self.pool.allocate(n)
            for block in blocks:
                self.written.pop(block, None)  # overwritten by the other user
            self.pool.free(blocks)

    @invariant()
    def invariants_hold(self):
        self.kv.check_invariants()
        for request in self.live:  # no block a running request uses was evicted or overwritten
            self._still_mine(request)

    def _still_mine(self, request: Request) -> None:
        table = self.kv.block_table(request.request_id)
        tokens = request.token_ids(0, request.num_computed_tokens)
        for i in range(request.num_computed_tokens // B):
            assert self.written.get(table[i]) == tuple(tokens[: (i + 1) * B]), f"{request.request_id} lost block {table[i]}"

    def teardown(self):
        for request in self.live:
            self.kv.free(request)
        self.kv.check_invariants()
        assert self.kv.stats().num_used_blocks == 0, "an idle pool has every block free or evictable"


@pytest.mark.parametrize("name", sorted(CACHES))
def test_prefix_cache_state_machine_against_an_oracle(name):
    class Machine(PrefixCacheMachine):
        cache_class = CACHES[name]

    case = Machine.TestCase
    case.settings = settings(max_examples=150, stateful_step_count=40, deadline=None, derandomize=True)
    case().runTest()


# --- the engine: no output changes ------------------------------------------------------------------
def conversation_outputs(loaded, prefix_cache: str, turns: list[list[int]], **kwargs) -> tuple[list[list[int]], list[int]]:
    """Each turn's prompt is the previous prompt + its answer + the next user tokens."""
    engine = make_engine(loaded, prefix_cache=prefix_cache, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    history: list[int] = []
    answers, cached = [], []
    for user in turns:
        history = history + user
        rid = engine.add_request(history, params)
        out = run_to_completion(engine)[rid]
        answers.append(out.token_ids)
        cached.append(out.num_cached_tokens)
        history = history + out.token_ids
        assert engine.stats().num_used_blocks == 0, "idle: every block free or evictable, none protected"
    return answers, cached


@pytest.mark.parametrize("prefix_cache", ["radix", "hash"])
def test_multi_turn_conversations_hit_the_cache_and_give_the_same_tokens(tiny_loaded, prefix_cache):
    rng = np.random.default_rng(0)
    turns = [random_prompt(rng, tiny_loaded.config.vocab_size, n) for n in (13, 6, 9, 4)]
    plain, none_cached = conversation_outputs(tiny_loaded, "none", turns)
    got, cached = conversation_outputs(tiny_loaded, prefix_cache, turns)
    assert got == plain and none_cached == [0, 0, 0, 0]
    assert cached[0] == 0 and all(c >= 12 for c in cached[1:]), f"later turns hit the earlier ones: {cached}"


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    order=st.permutations(range(6)),
    shared=st.integers(1, 24),
    budget=st.sampled_from([5, 16, 64]),
    blocks=st.sampled_from([14, 40]),
    policy=st.sampled_from(["fcfs", "lpm"]),
)
def test_batches_sharing_a_prefix_give_the_same_tokens_in_any_order(tiny_loaded, order, shared, budget, blocks, policy):
    """Shared prefixes, arrival order, chunked prefill, a tight pool (preemption) and both policies."""
    rng = np.random.default_rng(shared)
    vocab = tiny_loaded.config.vocab_size
    prefix = random_prompt(rng, vocab, shared)
    prompts = [prefix + random_prompt(rng, vocab, int(rng.integers(1, 8))) for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = {}
    for cache in ("none", "radix", "hash"):
        engine = make_engine(tiny_loaded, prefix_cache=cache, scheduler=policy, num_blocks=blocks, max_num_batched_tokens=budget, max_num_seqs=3)
        ids, final = {}, {}
        for step, i in enumerate(order):  # arrivals in the drawn order, 0-2 steps apart
            ids[i] = engine.add_request(prompts[i], params)
            for _ in range(step % 3):
                final.update({o.request_id: o for o in engine.step() if o.finished})
                engine.check_invariants()
        final.update(run_to_completion(engine))
        assert engine.stats().num_used_blocks == 0
        results[cache] = [final[ids[i]].token_ids for i in range(6)]
    assert results["radix"] == results["none"] == results["hash"]


# --- named regressions ---------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_cache", ["radix", "hash"])
def test_a_fully_cached_prompt_of_whole_blocks_still_computes_its_last_token(tiny_loaded, prefix_cache):
    prompt = list(range(3, 3 + 16))  # 4 whole blocks of 4
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine = make_engine(tiny_loaded, prefix_cache=prefix_cache)
    rid = engine.add_request(prompt, params)
    first = run_to_completion(engine)[rid]
    rid = engine.add_request(prompt, params)
    engine.step()
    assert engine.stats().last_step.scheduled == ((rid, 4),), "12 tokens cached, the last block computed"
    again = run_to_completion(engine)[rid]
    assert again.num_cached_tokens == 12 and again.token_ids == first.token_ids


@pytest.mark.parametrize("prefix_cache", ["radix", "hash"])
def test_two_running_requests_share_cached_blocks(tiny_loaded, prefix_cache):
    prompt = random_prompt(np.random.default_rng(2), tiny_loaded.config.vocab_size, 21)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = make_engine(tiny_loaded, prefix_cache=prefix_cache)
    expected = run_one(engine, prompt, params).token_ids
    a, b = engine.add_request(prompt, params), engine.add_request(prompt, params)
    engine.step()
    tables = engine.stats().block_tables
    assert tables[a][:5] == tables[b][:5], "both use the 5 cached blocks"
    assert len(set(tables[a][5:]) & set(tables[b][5:])) == 0, "and write only their own"
    final = run_to_completion(engine)
    assert final[a].token_ids == final[b].token_ids == expected


@pytest.mark.parametrize("prefix_cache", ["radix", "hash"])
def test_eviction_under_memory_pressure_spares_blocks_in_use(tiny_loaded, prefix_cache):
    rng = np.random.default_rng(3)
    vocab = tiny_loaded.config.vocab_size
    shared = random_prompt(rng, vocab, 16)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    others = [random_prompt(rng, vocab, 14) for _ in range(4)]
    plain = make_engine(tiny_loaded, prefix_cache="none", num_blocks=16)
    want = [run_one(plain, p, params).token_ids for p in [shared + [5]] + others]
    engine = make_engine(tiny_loaded, prefix_cache=prefix_cache, num_blocks=16)  # 64 slots
    run_one(engine, shared, SamplingParams(max_tokens=1))
    holder = engine.add_request(shared + [5], params)  # runs on the cached blocks while others come
    engine.step()
    ids = [engine.add_request(p, params) for p in others]
    final = run_to_completion(engine)
    assert engine.stats().prefix_cache.num_evicted_blocks > 0, "the pool was meant to force eviction"
    assert [final[i].token_ids for i in [holder] + ids] == want


@pytest.mark.parametrize("prefix_cache", ["radix", "hash"])
def test_abort_in_the_middle_of_a_prefill_keeps_only_computed_blocks(tiny_loaded, prefix_cache):
    prompt = random_prompt(np.random.default_rng(4), tiny_loaded.config.vocab_size, 30)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    plain = make_engine(tiny_loaded, prefix_cache="none")
    expected = run_one(plain, prompt, params).token_ids
    engine = make_engine(tiny_loaded, prefix_cache=prefix_cache, max_num_batched_tokens=10)
    rid = engine.add_request(prompt, params)
    engine.step()  # 10 of 30 prompt tokens computed
    assert engine.abort(rid)
    run_to_completion(engine)
    assert engine.stats().num_used_blocks == 0
    again = engine.add_request(prompt, params)
    final = run_to_completion(engine)[again]
    assert final.num_cached_tokens == 8 and final.token_ids == expected  # 2 whole blocks were computed


@pytest.mark.parametrize("prefix_cache", ["radix", "hash"])
def test_a_prompt_sharing_only_part_of_its_first_block_hits_nothing(tiny_loaded, prefix_cache):
    engine = make_engine(tiny_loaded, prefix_cache=prefix_cache)
    run_one(engine, [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=2))
    rid = engine.add_request([5, 6, 7, 11, 9, 10], SamplingParams(max_tokens=2))
    assert run_to_completion(engine)[rid].num_cached_tokens == 0


def test_a_preempted_request_resumes_from_its_own_cached_blocks(tiny_loaded):
    rng = np.random.default_rng(7)
    prompts = [random_prompt(rng, tiny_loaded.config.vocab_size, n) for n in (17, 9, 21, 13, 5)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = {}
    for cache in ("none", "radix"):
        engine = make_engine(tiny_loaded, prefix_cache=cache, num_blocks=14, block_size=4)
        ids = [engine.add_request(p, params) for p in prompts]
        final = run_to_completion(engine)
        assert engine.stats().num_preemptions > 0
        outs[cache] = ([final[i].token_ids for i in ids], engine.stats().prefix_cache.num_hit_tokens)
    assert outs["radix"][0] == outs["none"][0]
    assert outs["radix"][1] > 0, "resumed requests found their own blocks"


def test_lpm_admits_the_longest_cached_prefix_first_but_never_starves_a_request(tiny_loaded):
    from nanoserve.scheduler import LongestPrefixMatchScheduler

    engine = make_engine(tiny_loaded, scheduler="lpm", max_num_seqs=1)
    cached = list(range(3, 3 + 24))
    run_one(engine, cached, SamplingParams(max_tokens=1))
    loner = engine.add_request([200, 201, 202], SamplingParams(max_tokens=1))
    sharers = [engine.add_request(cached + [300 + i], SamplingParams(max_tokens=1)) for i in range(40)]
    admitted = []
    while engine.has_unfinished_requests():
        engine.step()
        admitted += [rid for rid, _ in engine.stats().last_step.scheduled if rid not in admitted]
    assert admitted[0] == sharers[0], "a request with 24 cached tokens goes before one with none"
    assert admitted.index(loner) == LongestPrefixMatchScheduler.MAX_PASSED_OVER, "but only 32 may pass it"


def test_cached_and_recomputed_positions_give_the_same_logits(tiny_loaded):
    """K/V of a position depends only on its prefix, so a request served from cached blocks gets
    the logits of a full recomputation within fp32 rounding. Not bit for bit: the cached K/V was
    computed in another batch, and BLAS sums a matmul's terms in an order that depends on the
    number of rows, so the last bits differ (on the ref backend as on cpu)."""
    from tests.engine_helpers import greedy_tokens_and_logits

    rng = np.random.default_rng(8)
    prompt = random_prompt(rng, tiny_loaded.config.vocab_size, 26)
    logits = {}
    for cache in ("none", "radix"):
        engine = make_engine(tiny_loaded, prefix_cache=cache, backend="ref")
        greedy_tokens_and_logits(engine, [prompt], 3)  # fills the cache
        tokens, seen = greedy_tokens_and_logits(engine, [prompt + [9]], 8)
        logits[cache] = (tokens, np.concatenate(seen))
    assert logits["radix"][0] == logits["none"][0]
    np.testing.assert_allclose(logits["radix"][1], logits["none"][1], atol=1e-4, rtol=1e-4)


def test_hash_cache_reuses_uncached_free_blocks_before_cached_ones():
    """Two finished requests leave each a cached full block and an uncached partial one: new
    allocations take the partial ones first, and both cached blocks survive."""
    from nanoserve.cache.block_pool import BlockPool
    from nanoserve.cache.hash_cache import HashPrefixCache

    pool = BlockPool(4)
    cache = HashPrefixCache(pool, block_size=4)
    for tokens in ([1, 2, 3, 4], [5, 6, 7, 8]):
        table = pool.allocate(2)  # a full block, then a partial one
        cache.insert(tokens, table[:1])
        pool.free(list(reversed(table)))
    pool.allocate(2)
    assert cache.match_prefix([1, 2, 3, 4, 0]).num_tokens == 4
    assert cache.match_prefix([5, 6, 7, 8, 0]).num_tokens == 4
    assert cache.stats().num_evicted_blocks == 0
