"""Prometheus metrics of a running server (``GET /metrics``, text exposition format).

Two sources, both safe to read from the HTTP thread:

* gauges and counters read from :attr:`AsyncEngine.stats`, the engine's
  :class:`~nanoserve.stats.EngineStats` that the engine thread publishes after every step
  (requests running/waiting, KV blocks, tokens, preemptions, the prefix cache);
* latency histograms fed on the engine thread by a step observer: time to first token
  (arrival -> first token), inter-token latency (gap between a request's consecutive
  tokens) and end-to-end latency (arrival -> finish).

Every server has its own ``CollectorRegistry``, so several servers can live in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nanoserve.output import RequestOutput
from nanoserve.server.async_engine import AsyncEngine

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _EngineCollector:
    """Reads the engine snapshot at scrape time."""

    def __init__(self, async_engine: AsyncEngine) -> None:
        self.async_engine = async_engine

    def collect(self) -> Iterator[Metric]:
        s = self.async_engine.stats
        cache = s.prefix_cache
        gauges = {
            "nanoserve_num_requests_running": ("Requests in the running batch.", s.num_running),
            "nanoserve_num_requests_waiting": ("Requests queued, waiting to be scheduled.", s.num_waiting),
            "nanoserve_kv_blocks_total": ("KV-cache blocks in the pool.", s.num_blocks),
            "nanoserve_kv_blocks_used": ("KV-cache blocks held by running requests.", s.num_used_blocks),
            "nanoserve_kv_blocks_free": (
                "KV-cache blocks allocatable now: free, or cached and evictable.",
                s.num_free_blocks,
            ),
            "nanoserve_kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use.", s.kv_cache_usage),
            "nanoserve_prefix_cache_cached_blocks": (
                "KV blocks the prefix cache holds.",
                cache.num_cached_blocks,
            ),
            "nanoserve_prefix_cache_evictable_blocks": (
                "Prefix-cached KV blocks no running request holds (counted in kv_blocks_free).",
                cache.num_evictable_blocks,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "nanoserve_prompt_tokens": ("Prompt tokens of admitted requests.", s.prompt_tokens),
            "nanoserve_generation_tokens": ("Tokens generated.", s.generation_tokens),
            "nanoserve_preemptions": (
                "Requests preempted (blocks freed, recomputed later).",
                s.num_preemptions,
            ),
            "nanoserve_engine_steps": ("Engine steps run.", s.num_steps),
            "nanoserve_requests_aborted": ("Requests aborted (client gone, shutdown).", s.aborted),
            "nanoserve_prefix_cache_queries": (
                "Tokens of admitted requests looked up in the prefix cache.",
                cache.num_query_tokens,
            ),
            "nanoserve_prefix_cache_hits": (
                "Tokens of admitted requests found in the prefix cache (not computed).",
                cache.num_hit_tokens,
            ),
            "nanoserve_prefix_cache_evictions": (
                "KV blocks evicted from the prefix cache.",
                cache.num_evicted_blocks,
            ),
        }
        spec = s.spec_decoding  # vLLM's speculative-decoding counters (all 0 with speculation off)
        counters |= {
            "nanoserve_spec_decode_num_drafts": ("Verifications of a request's drafts.", spec.num_drafts),
            "nanoserve_spec_decode_num_draft_tokens": ("Drafted tokens verified.", spec.num_draft_tokens),
            "nanoserve_spec_decode_num_accepted_tokens": ("Drafted tokens accepted.", spec.num_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        per_pos = CounterMetricFamily(
            "nanoserve_spec_decode_num_accepted_tokens_per_pos", "Drafted tokens accepted, by draft position.",
            labels=["position"],
        )
        for position, value in enumerate(spec.num_accepted_tokens_per_pos):
            per_pos.add_metric([str(position)], value)
        yield per_pos


class ServerMetrics:
    """The registry of one server; ``observe`` runs on the engine thread after each step."""

    def __init__(self, async_engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(async_engine))  # type: ignore[arg-type]
        self.ttft = Histogram(
            "nanoserve_time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "nanoserve_inter_token_latency_seconds",
            "Gap between consecutive tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "nanoserve_e2e_request_latency_seconds",
            "Arrival to finish of a request.",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "nanoserve_requests_finished",
            "Requests finished, by finish reason.",
            ["finish_reason"],
            registry=self.registry,
        )
        self.http_errors = Counter(
            "nanoserve_http_errors", "Error responses, by HTTP status.", ["status"], registry=self.registry
        )
        self._last_token_time: dict[str, float] = {}  # engine thread only
        async_engine.add_observer(self.observe)

    def observe(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            if out.new_token_ids:
                last = self._last_token_time.get(out.request_id)
                if last is None and out.first_token_time is not None:
                    self.ttft.observe(out.first_token_time - out.arrival_time)
                elif last is not None:
                    gap = (now - last) / len(out.new_token_ids)
                    for _ in out.new_token_ids:
                        self.itl.observe(gap)
                self._last_token_time[out.request_id] = now
            if out.finished:
                self._last_token_time.pop(out.request_id, None)
                self.finished.labels(out.finish_reason or "unknown").inc()
                if out.finish_time is not None:
                    self.e2e.observe(out.finish_time - out.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
