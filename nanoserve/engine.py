"""The engine: requests in, tokens out, one ``step()`` at a time.

    add_request()  validate, tokenize, queue
    step()         scheduler.schedule() -> runner.execute() -> sampler.sample()
                   -> scheduler.update_from_output(): the one place a request advances
                   (computed tokens, new tokens, stop conditions, freeing blocks)
    abort()        drop a request wherever it is and free its blocks at once
    stats()        one typed snapshot of queues, pool and totals (nanoserve.stats)

The engine is built from parts named in :class:`~nanoserve.config.EngineConfig` (block
allocator, KV manager, scheduler, sampler: :mod:`nanoserve.interfaces`), each constructed
from the one below it.

Stop conditions: an EOS / stop token (unless ``ignore_eos``), ``max_tokens``, the end of the
context, or a stop string (:func:`nanoserve.request.stop_reason`). Stop strings never reach
the user (:mod:`nanoserve.output`).

Every accepted request ends with exactly one finished output: "stop", "length", "abort",
or "error" (if a step fails, its requests end with the error and the engine carries on).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import Any

import numpy as np

from nanoserve import components, threads
from nanoserve.cache.paged import PagedKVCache, bytes_per_block
from nanoserve.config import (
    ACTIVATIONS,
    INT8_ACTIVATION_WEIGHTS,
    KV_CACHE_DTYPES,
    SPECULATIVE_METHODS,
    WEIGHT_FORMATS,
    EngineConfig,
)
from nanoserve.errors import (
    CapacityError,
    ConfigError,
    ContextLengthExceededError,
    PromptTooLongError,
    RequestError,
)
from nanoserve.interfaces import ScheduledBatch
from nanoserve.kernels import Backend, get_backend
from nanoserve.model.llama import LlamaModel
from nanoserve.model.loader import LoadedModel, load_checkpoint
from nanoserve.model_runner import ModelRunner
from nanoserve.output import RequestOutput, TextStream, make_output
from nanoserve.request import Request
from nanoserve.sampling import SamplingParams
from nanoserve.spec import build_speculator
from nanoserve.stats import EngineStats, SpecDecodingStats, StepStats
from nanoserve.tokenizer import Tokenizer

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput"]


def check_config(config: EngineConfig) -> None:
    """Raise ConfigError naming the first setting that is out of range (checked before loading)."""
    for name, label, allowed in (("weights", "weights", WEIGHT_FORMATS), ("kv_cache_dtype", "KV cache dtype", KV_CACHE_DTYPES),
                                 ("activations", "activations", ACTIVATIONS)):  # fmt: skip
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{label} must be one of {', '.join(allowed)}; got {getattr(config, name)!r}")
    if config.activations == "int8" and config.weights not in INT8_ACTIVATION_WEIGHTS:
        raise ConfigError(
            f"activations int8 needs GGUF block weights (weights {', '.join(INT8_ACTIVATION_WEIGHTS)}), "
            f"got weights {config.weights!r}"
        )
    at_least_one = ("block_size", "max_num_batched_tokens", "max_num_seqs")
    for name in at_least_one + ("num_blocks", "max_model_len"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if config.num_blocks is None and not config.kv_cache_memory > 0:
        raise ConfigError(f"kv_cache_memory must be > 0 GiB, got {config.kv_cache_memory!r}")
    if config.speculative not in SPECULATIVE_METHODS:
        raise ConfigError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {config.speculative!r}")
    for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    cost = config.spec_draft_cost
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost < float("inf"):
        raise ConfigError(f"spec_draft_cost must be a number >= 0, got {cost!r}")
    if config.prompt_lookup_max < config.prompt_lookup_min:
        raise ConfigError(
            f"prompt_lookup_max ({config.prompt_lookup_max}) must be >= prompt_lookup_min ({config.prompt_lookup_min})"
        )


def check_pool_size(num_blocks: int, block_bytes: int, config: EngineConfig) -> None:
    """Raise ConfigError if the KV pool holds no block, or needs more memory than is available."""
    if num_blocks < 1:
        raise ConfigError(
            f"kv_cache_memory={config.kv_cache_memory} GiB holds no KV block ({block_bytes / 2**20:.2f} MiB each); "
            f"give at least {block_bytes / 2**30:.4f}"
        )
    available = _available_memory()
    if available is not None and num_blocks * block_bytes > available:
        raise ConfigError(
            f"the KV pool needs {num_blocks * block_bytes / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB "
            "of memory is available; lower --kv-cache-memory or --num-blocks"
        )


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable, else all physical memory), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None, **kwargs: Any) -> None:
        config = config or EngineConfig(**kwargs)
        check_config(config)  # before the model loads: a bad flag fails in a moment
        self.config = config
        self.threads = threads.apply(config.threads)  # BLAS threads, by the policy (nanoserve.threads)
        loaded = loaded or load_checkpoint(config.model, config.weights)
        self.model_name = loaded.name
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.backend: Backend = get_backend(config.backend)
        self.model = LlamaModel(loaded.config, loaded.weights, self.backend, config.activations)
        mc = loaded.config
        if config.max_model_len is not None and config.max_model_len > mc.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={config.max_model_len} is longer than the model's context "
                f"({mc.max_position_embeddings} tokens); give at most {mc.max_position_embeddings}"
            )
        block_bytes = bytes_per_block(mc, config.block_size, config.kv_cache_dtype)
        num_blocks = config.num_blocks or int(config.kv_cache_memory * 2**30) // block_bytes
        check_pool_size(num_blocks, block_bytes, config)
        self.cache = PagedKVCache(mc, num_blocks, config.block_size, self.backend, config.kv_cache_dtype)
        allocator = components.build("block_allocator", config.block_allocator, num_blocks)
        prefix_cache = None
        if config.prefix_cache != "none":
            prefix_cache = components.build("prefix_cache", config.prefix_cache, allocator, config.block_size)
        self.kv = components.build("kv_manager", config.kv_manager, allocator, config.block_size, prefix_cache)
        self.scheduler = components.build(
            "scheduler", config.scheduler, self.kv, config.max_num_batched_tokens, config.max_num_seqs
        )
        self.sampler = components.build("sampler", config.sampler, self.backend.kernels)
        self.runner = ModelRunner(self.model, self.cache, self.kv)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.speculator = None  # speculative decoding (nanoserve.spec), when configured
        if config.speculative != "none":
            if not getattr(self.scheduler, "supports_speculation", False):  # drafts it would ignore: refuse, never guess
                raise ConfigError(
                    f"scheduler {config.scheduler!r} does not schedule speculative drafts (it does not set "
                    "supports_speculation = True); use --speculative none, or the fcfs or lpm scheduler"
                )
            self.sampler, self.speculator = build_speculator(config, loaded, self.backend, self.sampler, num_blocks, self.max_model_len)
        self.num_kv_slots = num_blocks * config.block_size
        self.requests: dict[str, Request] = {}
        self._streams: dict[str, TextStream] = {}
        self._pending: list[RequestOutput] = []  # outputs of aborted requests, given out next step
        self._ids = itertools.count()
        self.step_stats: deque[StepStats] = deque(maxlen=100_000)  # one record per step, oldest first
        self._num_steps = 0
        self._cache_counts = (0, 0)  # prefix-cache (queried, hit) tokens as of the last step
        self._totals = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "aborted": 0, "errors": 0}

    # --- requests -----------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Validate and queue a request; returns its id. Raises RequestError subclasses."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()  # again: a field may have been changed since construction
        if params.constrained:  # compile the constraint now: unsatisfiable, or too long for max_tokens, is an error
            from nanoserve import structured

            structured.prepare(params, self.tokenizer)
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise RequestError(f"prompt token ids must be in [0, {self.model.config.vocab_size}); got {bad[:5]}")
        else:
            raise RequestError("prompt must be a string or a list of token ids")
        if not ids:
            raise RequestError("prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                f"(prompt + at least 1 new token); shorten the prompt"
            )
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_model_len} tokens; you requested "
                f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt, {params.max_tokens} max_tokens): "
                f"lower max_tokens to at most {self.max_model_len - len(ids)}"
            )
        max_tokens = params.max_tokens
        if len(ids) + max_tokens > self.num_kv_slots:
            raise CapacityError(
                f"prompt ({len(ids)}) + max_tokens ({max_tokens}) tokens exceed the whole KV pool "
                f"({self.num_kv_slots} slots); lower max_tokens or start with a larger --kv-cache-memory"
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        eos = frozenset(self.tokenizer.eos_token_ids)
        request = Request(request_id, ids, params, max_tokens, params.make_generator(), eos_token_ids=eos)
        request.text = self._streams[request_id] = TextStream(self.tokenizer, request)
        self.requests[request_id] = request
        self.scheduler.add_request(request)
        self._totals["prompt_tokens"] += len(ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; its final output comes with the next step."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        self._totals["aborted"] += 1
        self.scheduler.finish_request(request, "abort")
        self._pending.append(self._output(request, []))
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._pending)

    # --- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that changed."""
        outputs, self._pending = self._pending, []
        start = time.monotonic()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return outputs
        drafted = [(r, len(r.spec_token_ids), r.num_accepted_tokens) for r in batch.requests if r.spec_token_ids]
        try:
            logits = self.runner.execute(batch)  # [sum(batch.num_logits), V]
            sampled = self.sampler.sample(logits, batch.requests, batch.num_logits)
        except Exception as exc:  # a failed step fails its requests, never the engine
            for request in batch.requests:
                request.error = f"{type(exc).__name__}: {exc}"
                self._totals["errors"] += 1
                self.scheduler.finish_request(request, "error")
                outputs.append(self._output(request, []))
            return outputs
        for request, new_token_ids in self.scheduler.update_from_output(batch, sampled):
            self._totals["generation_tokens"] += len(new_token_ids)
            outputs.append(self._output(request, new_token_ids))
        spec = (0, 0)  # (drafts verified, accepted) in this step
        if self.speculator is not None:
            for request, num_drafts, accepted_before in drafted:
                accepted = request.num_accepted_tokens - accepted_before
                self.speculator.observe(request, num_drafts, accepted)
                spec = (spec[0] + num_drafts, spec[1] + accepted)
            self.speculator.propose([self.requests[rid] for rid in self.scheduler.stats().running])
        self._record_stats(batch, start, spec)
        return outputs

    def _output(self, request: Request, new_token_ids: list[int]) -> RequestOutput:
        """The request's output now; a finished request is forgotten here."""
        stream = self._streams[request.request_id]
        text, delta = stream.release(finished=request.is_finished)
        if request.is_finished:
            if self.speculator is not None:
                self.speculator.finish(request)
            self._totals["finished"] += 1
            del self._streams[request.request_id]
            del self.requests[request.request_id]
        return make_output(request, text, delta, new_token_ids)

    def _record_stats(self, batch: ScheduledBatch, start: float, spec: tuple[int, int]) -> None:
        kv = self.kv.stats()
        queues = self.scheduler.stats()
        computed = sum(r.num_computed_tokens for r in self.requests.values())
        cache = kv.prefix_cache
        queried, hit = cache.num_query_tokens - self._cache_counts[0], cache.num_hit_tokens - self._cache_counts[1]
        self._cache_counts = (cache.num_query_tokens, cache.num_hit_tokens)
        now = time.monotonic()
        self._num_steps += 1
        self.step_stats.append(
            StepStats(
                step=self._num_steps,
                time=now,
                duration=now - start,
                batch_size=len(batch),
                num_tokens=batch.total_tokens,
                num_running=len(queues.running),
                num_waiting=len(queues.waiting),
                blocks_used=kv.num_used_blocks,
                blocks_free=kv.num_free_blocks,
                preemptions=len(batch.preempted),
                kv_utilization=computed / (kv.num_used_blocks * kv.block_size) if kv.num_used_blocks else 0.0,
                scheduled=tuple((r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)),
                preempted=tuple(r.request_id for r in batch.preempted),
                prefix_cache_queried_tokens=queried,
                prefix_cache_hit_tokens=hit,
                evictable_blocks=cache.num_evictable_blocks,
                spec_draft_tokens=spec[0],
                spec_accepted_tokens=spec[1],
            )
        )

    # --- reporting --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of the engine now: queues, KV pool, lifetime totals, the latest step."""
        kv = self.kv.stats()
        queues = self.scheduler.stats()
        last = self.step_stats[-1] if self.step_stats else None
        return EngineStats(
            num_running=len(queues.running),
            num_waiting=len(queues.waiting),
            num_blocks=kv.num_blocks,
            block_size=kv.block_size,
            num_free_blocks=kv.num_free_blocks,
            num_used_blocks=kv.num_used_blocks,
            num_preemptions=queues.num_preemptions,
            num_steps=self._num_steps,
            running=queues.running,
            waiting=queues.waiting,
            block_tables=kv.block_tables,
            prefix_cache=kv.prefix_cache,
            spec_decoding=self.speculator.stats() if self.speculator is not None else SpecDecodingStats(),
            last_step=last,
            **self._totals,
        )

    def check_invariants(self) -> None:
        """Every part's invariants, and that every live request is tracked exactly once."""
        self.kv.check_invariants()
        self.scheduler.check_invariants()
        queues = self.scheduler.stats()
        live = queues.running + queues.waiting
        assert set(live) == set(self.requests), "scheduler and engine disagree on live requests"
        assert set(self._streams) == set(self.requests), "a live request has no text stream, or a finished one has"
        assert set(self.kv.stats().block_tables) <= set(self.requests), "a finished request still holds blocks"
