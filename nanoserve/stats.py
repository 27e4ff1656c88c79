"""What the engine reports about itself: one typed snapshot, read by the server, benches and notebooks.

    engine.stats()        -> EngineStats   counters and gauges now (cheap: the server calls
                                           it after every step)
    engine.step_stats     -> deque[StepStats]  one record per step, oldest first

Both are plain frozen values: reading them never touches the scheduler or the block pool,
and holding one never changes what the engine does. A component (scheduler, KV manager)
reports its part through its own ``stats()``; the engine assembles the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepStats:
    """One engine step: what ran, and what the pool looked like afterwards."""

    step: int
    time: float  # monotonic time at the end of the step
    duration: float  # seconds the step took
    batch_size: int  # requests in the batch
    num_tokens: int  # tokens computed
    num_running: int
    num_waiting: int
    blocks_used: int
    blocks_free: int
    preemptions: int  # in this step
    kv_utilization: float  # slots holding computed tokens / slots in allocated blocks (0 when none)
    scheduled: tuple[tuple[str, int], ...] = ()  # (request id, tokens computed) in batch order
    preempted: tuple[str, ...] = ()  # request ids preempted in this step
    prefix_cache_queried_tokens: int = 0  # tokens of the requests admitted in this step
    prefix_cache_hit_tokens: int = 0  # of those, found in the prefix cache (not computed)
    evictable_blocks: int = 0  # cached blocks no running request holds, after the step
    spec_draft_tokens: int = 0  # drafts verified in this step (speculative decoding)
    spec_accepted_tokens: int = 0  # of those, accepted


@dataclass(frozen=True)
class SpecDecodingStats:
    """Speculative decoding's lifetime counters (vLLM's names): drafts verified, and accepted."""

    num_drafts: int = 0  # verifications of a request's drafts
    num_draft_tokens: int = 0  # drafted tokens verified
    num_accepted_tokens: int = 0  # of those, accepted
    num_accepted_tokens_per_pos: tuple[int, ...] = ()  # [k]: accepted drafts at position 0, 1, ..

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per verification: accepted drafts plus the one more token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass(frozen=True)
class SchedulerStats:
    """A scheduler's queues, by request id in order, and its preemption count."""

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    num_preemptions: int = 0


@dataclass(frozen=True)
class PrefixCacheStats:
    """A prefix cache's contents and lifetime counters (tokens, blocks)."""

    num_cached_blocks: int = 0  # blocks the cache indexes now
    num_evictable_blocks: int = 0  # of those, held by no running request
    num_evicted_blocks: int = 0  # since start
    num_query_tokens: int = 0  # tokens of admitted requests looked up, since start
    num_hit_tokens: int = 0  # of those, found cached


@dataclass(frozen=True)
class KVCacheStats:
    """The block pool's occupancy, and every live request's block table.

    A cached block that no request holds counts as free: allocation takes it when it must
    (``prefix_cache.num_evictable_blocks`` says how many of the free ones are such).
    """

    num_blocks: int = 0
    block_size: int = 0
    num_free_blocks: int = 0  # allocatable now: free, or cached and evictable
    num_used_blocks: int = 0  # held by running requests (or locked for them)
    block_tables: dict[str, tuple[int, ...]] = field(default_factory=dict)  # request id -> block ids
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)


@dataclass(frozen=True)
class EngineStats:
    """The engine as of its latest step: queues, KV pool and lifetime totals."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    block_size: int = 0
    num_free_blocks: int = 0
    num_used_blocks: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    prompt_tokens: int = 0  # of every admitted request
    generation_tokens: int = 0
    finished: int = 0  # requests ended for any reason (aborts and errors included)
    aborted: int = 0
    errors: int = 0
    running: tuple[str, ...] = ()  # request ids, batch order
    waiting: tuple[str, ...] = ()  # request ids, queue order
    block_tables: dict[str, tuple[int, ...]] = field(default_factory=dict)
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    spec_decoding: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    last_step: StepStats | None = None

    @property
    def num_kv_slots(self) -> int:
        """Token slots in the whole pool."""
        return self.num_blocks * self.block_size

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of blocks in use."""
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0
