"""The engine: requests in, tokens out, one ``step()`` at a time; and the offline ``LLM`` API.

    add_request()  validate, tokenize, queue
    step()         scheduler.schedule() -> model_runner.execute() -> sample()
                   -> append tokens, check stop conditions, free finished requests
    abort()        drop a request wherever it is and free its blocks at once

Stop conditions: an EOS / stop token (unless ``ignore_eos``), ``max_tokens``, the end of the
context, or a stop string. Stop strings never reach the user: text is streamed only once
no stop string could still start inside it (the last ``len(longest stop) - 1`` characters
are held back), and the final text is cut where the stop string begins.

Every accepted request ends with exactly one finished output: "stop", "length", "abort",
or "error" (if a step fails, its requests end with the error and the engine carries on).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoserve.cache.kv_cache_manager import KVCacheManager
from nanoserve.cache.paged import PagedKVCache, bytes_per_block
from nanoserve.errors import CapacityError, PromptTooLongError, RequestError
from nanoserve.kernels import Backend, get_backend
from nanoserve.model.llama import LlamaModel
from nanoserve.model.loader import LoadedModel, load_checkpoint
from nanoserve.model_runner import ModelRunner
from nanoserve.request import Request
from nanoserve.sampling import SampleResult, SamplingParams, sample
from nanoserve.scheduler import Scheduler
from nanoserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class EngineConfig:
    model: str | None = None  # name, .gguf path or HF directory (None: SmolLM2-135M-Instruct)
    backend: str = "cpu"  # kernels: cpu (Numba, fast), ref (NumPy, the spec), cuda, or a .py path
    weights: str = "fp32"  # fp32 | fp16 | int8 | int4 | gguf
    block_size: int = 16
    num_blocks: int | None = None  # explicit pool size; else from kv_cache_memory
    kv_cache_memory: float = 1.0  # GiB of K/V pages when num_blocks is None
    kv_cache_dtype: str = "float32"  # float32 | float16 (half the memory, rounded K/V)
    max_num_batched_tokens: int = 512  # the per-step token budget
    max_num_seqs: int = 32
    max_model_len: int | None = None  # default: the model's context (capped by the pool)


@dataclass
class RequestOutput:
    """The state of one request after a step. ``delta``/``new_token_ids`` are this step's part."""

    request_id: str
    prompt_token_ids: list[int]
    text: str  # all output text released so far
    delta: str
    token_ids: list[int]
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[SampleResult] = field(default_factory=list)  # all, if requested
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        n = len(self.token_ids)
        if self.finish_time is None or self.first_token_time is None or n < 2:
            return None
        return (self.finish_time - self.first_token_time) / (n - 1)


@dataclass
class StepStats:
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
    kv_utilization: float  # slots holding real tokens / slots in allocated blocks


class _Stream:
    """Per-request text state: detokenizer, released text, stop-string holdback."""

    def __init__(self, tokenizer: Tokenizer, request: Request) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        self.stops = request.params.stop
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.released = 0  # characters of detok.text already given out
        self.cut: int | None = None  # where a stop string starts, once found

    def add(self, token_id: int) -> bool:
        """Feed a token; True if a stop string has now appeared."""
        self.detok.add(token_id)
        text = self.detok.text
        window = max(0, self.released - self.holdback)
        hits = [i for i in (text.find(s, window) for s in self.stops) if i >= 0]
        if hits:
            self.cut = min(hits)
        return self.cut is not None

    def release(self, finished: bool) -> tuple[str, str]:
        """``(all released text, newly released delta)``."""
        if finished and self.cut is None:
            self.detok.flush()
        text = self.detok.text
        end = self.cut if self.cut is not None else len(text) if finished else max(self.released, len(text) - self.holdback)
        delta = text[self.released : end]
        self.released = max(self.released, end)
        return text[: self.released], delta


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None, **kwargs: Any) -> None:
        config = config or EngineConfig(**kwargs)
        self.config = config
        loaded = loaded or load_checkpoint(config.model, config.weights)
        self.model_name = loaded.name
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.backend: Backend = get_backend(config.backend)
        self.model = LlamaModel(loaded.config, loaded.weights, self.backend)
        mc = loaded.config
        block_bytes = bytes_per_block(mc, config.block_size, config.kv_cache_dtype)
        num_blocks = config.num_blocks or max(1, int(config.kv_cache_memory * 2**30) // block_bytes)
        self.cache = PagedKVCache(mc, num_blocks, config.block_size, self.backend, config.kv_cache_dtype)
        self.kv = KVCacheManager(num_blocks, config.block_size)
        self.runner = ModelRunner(self.model, self.cache, self.kv)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.requests: dict[str, Request] = {}
        self._streams: dict[str, _Stream] = {}
        self._pending: list[RequestOutput] = []  # outputs of aborted requests, given out next step
        self._ids = itertools.count()
        self.step_stats: deque[StepStats] = deque(maxlen=100_000)
        self.num_steps = 0
        self.totals = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "aborted": 0, "errors": 0}

    # --- requests -----------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Validate and queue a request; returns its id. Raises RequestError subclasses."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
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
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        capacity = self.kv.pool.num_blocks * self.kv.block_size
        if len(ids) + max_tokens > capacity:
            raise CapacityError(
                f"prompt ({len(ids)}) + max_tokens ({max_tokens}) tokens exceed the whole KV pool "
                f"({capacity} slots); lower max_tokens or start with a larger --kv-cache-memory"
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        request = Request(request_id, ids, params, max_tokens, params.make_generator())
        self.requests[request_id] = request
        self._streams[request_id] = _Stream(self.tokenizer, request)
        self.scheduler.add(request)
        self.totals["prompt_tokens"] += len(ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; its final output comes with the next step."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        self.totals["aborted"] += 1
        self._pending.append(self._finish(request, "abort"))
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    # --- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that changed."""
        outputs, self._pending = self._pending, []
        start = time.monotonic()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return outputs
        try:
            logits, to_sample = self.runner.execute(batch)
            for request, n in zip(batch.requests, batch.num_new_tokens):
                request.num_computed_tokens += n
            results = sample(logits, [r.params for r in to_sample], [r.generator for r in to_sample], self.backend.kernels)
        except Exception as exc:  # a failed step fails its requests, never the engine
            for request in batch.requests:
                request.error = f"{type(exc).__name__}: {exc}"
                self.totals["errors"] += 1
                outputs.append(self._finish(request, "error"))
            return outputs
        for request, result in zip(to_sample, results):
            outputs.append(self._append_token(request, result))
        self._record_stats(batch, start)
        return outputs

    def _append_token(self, request: Request, result: SampleResult) -> RequestOutput:
        now = time.monotonic()
        token = result.token_id
        request.output_token_ids.append(token)
        if request.params.logprobs is not None:
            request.output_logprobs.append(result)
        if request.first_token_time is None:
            request.first_token_time = now
        self.totals["generation_tokens"] += 1
        stream = self._streams[request.request_id]
        params = request.params
        reason = None
        if (token in self.tokenizer.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif stream.add(token):
            reason = "stop"
        elif len(request.output_token_ids) >= request.max_tokens:
            reason = "length"
        if reason is not None:
            return self._finish(request, reason, new_tokens=[token])
        text, delta = stream.release(finished=False)
        return self._output(request, text, delta, [token], finished=False)

    def _finish(self, request: Request, reason: str, new_tokens: list[int] | None = None) -> RequestOutput:
        self.scheduler.finish(request)
        request.finish_reason = reason
        request.finish_time = time.monotonic()
        self.totals["finished"] += 1
        stream = self._streams.pop(request.request_id)
        text, delta = stream.release(finished=True)
        del self.requests[request.request_id]
        return self._output(request, text, delta, new_tokens or [], finished=True)

    def _output(self, request: Request, text: str, delta: str, new: list[int], finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            text=text,
            delta=delta,
            token_ids=list(request.output_token_ids),
            new_token_ids=new,
            finished=finished,
            finish_reason=request.finish_reason,
            error=request.error,
            logprobs=list(request.output_logprobs),
            num_preemptions=request.num_preemptions,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            finish_time=request.finish_time,
        )

    def _record_stats(self, batch: Any, start: float) -> None:
        self.num_steps += 1
        used = self.kv.pool.num_used
        cached_tokens = sum(r.num_computed_tokens for r in self.scheduler.running)
        now = time.monotonic()
        self.step_stats.append(
            StepStats(
                step=self.num_steps,
                time=now,
                duration=now - start,
                batch_size=len(batch),
                num_tokens=batch.total_tokens,
                num_running=len(self.scheduler.running),
                num_waiting=len(self.scheduler.waiting),
                blocks_used=used,
                blocks_free=self.kv.pool.num_free,
                preemptions=len(batch.preempted),
                kv_utilization=cached_tokens / (used * self.kv.block_size) if used else 1.0,
            )
        )

    def check_invariants(self) -> None:
        """Pool and block-table invariants, and that every live request is tracked once."""
        self.kv.check_invariants()
        live = list(self.scheduler.running) + list(self.scheduler.waiting)
        assert len({r.request_id for r in live}) == len(live), "a request is queued twice"
        assert {r.request_id for r in live} == set(self.requests), "scheduler and engine disagree on live requests"
        for r in self.scheduler.waiting:
            assert r.request_id not in self.kv.block_tables, f"waiting request {r.request_id} holds blocks"
        for r in self.scheduler.running:
            held = len(self.kv.block_tables.get(r.request_id, []))
            assert held >= self.kv.blocks_needed(r.num_computed_tokens), f"{r.request_id} computed more than it holds"
        assert set(self.kv.block_tables) <= set(self.requests), "a finished request still holds blocks"


class LLM:
    """Offline batched generation, in the shape of vLLM's ``LLM``.

    >>> llm = LLM()                                   # SmolLM2-135M-Instruct on the cpu backend
    >>> outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
    >>> outs[0].text, outs[0].finish_reason, outs[0].time_to_first_token
    """

    def __init__(self, model: str | None = None, engine: LLMEngine | None = None, **engine_kwargs: Any) -> None:
        self.engine = engine or LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run all prompts as one continuously batched workload; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while len(final) < len(ids) and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [final[i] for i in ids]

    def chat(
        self, conversations: list[dict[str, Any]] | list[list[dict[str, Any]]], sampling_params: SamplingParams | None = None, use_tqdm: bool = False
    ) -> list[RequestOutput]:
        """Apply the chat template to each conversation and generate."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.tokenizer.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
