"""Prefix caching seen from the API: ``usage.prompt_tokens_details.cached_tokens`` and the
``nanoserve_prefix_cache_*`` metrics, with the radix tree, the hash cache and no cache."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from nanoserve.server.shapes import Job
from tests.server.conftest import RunningServer, serve_tiny

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
PREFIX_METRICS = (
    "nanoserve_prefix_cache_queries_total",
    "nanoserve_prefix_cache_hits_total",
    "nanoserve_prefix_cache_evictions_total",
    "nanoserve_prefix_cache_evictable_blocks",
    "nanoserve_prefix_cache_cached_blocks",
)


def unique_prompt(repeats: int = 3) -> str:
    """A prompt no earlier request shares a block with: it starts with a fresh random tag."""
    return f"[{uuid.uuid4().hex}] " + TEXT * repeats


def cached_part(server: RunningServer, num_prompt_tokens: int) -> int:
    """What a repeat of a prompt finds cached: its whole blocks, short of the last token."""
    block_size = server.async_engine.stats.block_size
    return (num_prompt_tokens - 1) // block_size * block_size


def cached_tokens(usage: Any) -> int:
    """``prompt_tokens_details.cached_tokens`` of an openai ``usage``."""
    return usage.prompt_tokens_details.cached_tokens


def finish(server: RunningServer) -> dict[str, float]:
    """The idle check after a test: no request left, no block protected, invariants hold."""
    metrics = server.wait_until_idle()
    server.check_invariants()
    return metrics


@pytest.fixture(scope="module", params=["radix", "hash"])
def cache_server(request: pytest.FixtureRequest, tiny_model_dir: str) -> Iterator[RunningServer]:
    """A tiny-model server with each prefix cache."""
    with serve_tiny(tiny_model_dir, {"prefix_cache": request.param}) as server:
        yield server


@pytest.fixture(scope="module")
def uncached_server(tiny_model_dir: str) -> Iterator[RunningServer]:
    """A tiny-model server with ``--prefix-cache none``."""
    with serve_tiny(tiny_model_dir, {"prefix_cache": "none"}) as server:
        yield server


def test_a_repeated_completion_reports_its_cached_blocks(idle_server: RunningServer) -> None:
    server, prompt = idle_server, unique_prompt()
    client = server.client()
    first = client.completions.create(model=server.model, prompt=prompt, max_tokens=4, **GREEDY)
    second = client.completions.create(model=server.model, prompt=prompt, max_tokens=4, **GREEDY)
    assert cached_tokens(first.usage) == 0
    expected = cached_part(server, first.usage.prompt_tokens)
    assert expected > 0 and expected % server.async_engine.stats.block_size == 0
    assert cached_tokens(second.usage) == expected
    assert second.choices[0].text == first.choices[0].text
    finish(server)


def test_a_repeated_chat_reports_cached_tokens_streamed_and_not(idle_server: RunningServer) -> None:
    server = idle_server
    messages = [{"role": "system", "content": unique_prompt()}, {"role": "user", "content": "Hello world"}]
    client, kwargs = server.client(), {"model": server.model, "messages": messages, "max_tokens": 5, **GREEDY}
    first = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert cached_tokens(first.usage) == 0
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert cached_tokens(chunks[-1].usage) == cached_part(server, first.usage.prompt_tokens) > 0
    finish(server)


def test_cached_tokens_are_in_the_raw_usage_object(idle_server: RunningServer) -> None:
    server = idle_server
    body = {"model": server.model, "prompt": unique_prompt(), "max_tokens": 2, "temperature": 0}
    first = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=30,
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = events[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == cached_part(server, usage["prompt_tokens"])
    finish(server)


@pytest.mark.parametrize("stream", [False, True])
def test_several_prompts_and_choices_count_each_prompt_once(idle_server: RunningServer, stream: bool) -> None:
    server, tok = idle_server, idle_server.async_engine.tokenizer
    prompts = [unique_prompt(2), unique_prompt(4)]
    client = server.client()

    def usage() -> Any:
        kwargs = {"model": server.model, "prompt": prompts, "n": 2, "max_tokens": 3, **GREEDY}
        if not stream:
            return client.completions.create(**kwargs).usage
        chunks = list(
            client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
        )
        return chunks[-1].usage

    first, second = usage(), usage()
    assert cached_tokens(first) == 0
    assert cached_tokens(second) == sum(cached_part(server, len(tok.encode(p))) for p in prompts)
    assert second.prompt_tokens == first.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    finish(server)


def test_a_prompt_counts_the_tokens_none_of_its_choices_computed() -> None:
    job = Job("cmpl-x", 0, "m", None, {}, prompts=[[1] * 40, [2] * 40], prompt_texts=["", ""], n=2)  # type: ignore[arg-type]
    assert job.num_cached_tokens({0: 32, 1: 16, 2: 0, 3: 32}) == 16
    assert job.num_cached_tokens({0: 32, 1: 32, 2: 16, 3: 16}) == 48
    assert job.num_cached_tokens({}) == 0


def test_metrics_count_prefix_cache_queries_and_hits(cache_server: RunningServer) -> None:
    server, prompt = cache_server, unique_prompt()
    before = server.wait_until_idle()
    assert all(name in before for name in PREFIX_METRICS)
    client = server.client()
    first = client.completions.create(model=server.model, prompt=prompt, max_tokens=4, **GREEDY)
    second = client.completions.create(model=server.model, prompt=prompt, max_tokens=4, **GREEDY)
    after = finish(server)
    hits = after["nanoserve_prefix_cache_hits_total"] - before["nanoserve_prefix_cache_hits_total"]
    queries = after["nanoserve_prefix_cache_queries_total"] - before["nanoserve_prefix_cache_queries_total"]
    assert hits == cached_tokens(second.usage) == cached_part(server, first.usage.prompt_tokens) > 0
    assert queries == first.usage.prompt_tokens + second.usage.prompt_tokens
    block_size = server.async_engine.stats.block_size
    assert after["nanoserve_prefix_cache_cached_blocks"] >= first.usage.prompt_tokens // block_size
    assert after["nanoserve_prefix_cache_evictable_blocks"] == after["nanoserve_prefix_cache_cached_blocks"]
    assert after["nanoserve_kv_blocks_free"] == after["nanoserve_kv_blocks_total"]


def test_evictions_are_counted_once_the_pool_is_full_of_cached_blocks(cache_server: RunningServer) -> None:
    server = cache_server
    client = server.client()
    total = int(server.metrics()["nanoserve_kv_blocks_total"])
    before = server.wait_until_idle()
    prompt_blocks = 0
    while prompt_blocks < total + 8:  # more distinct blocks than the pool holds: some must go
        r = client.completions.create(model=server.model, prompt=unique_prompt(12), max_tokens=2, **GREEDY)
        prompt_blocks += r.usage.prompt_tokens // server.async_engine.stats.block_size
    after = finish(server)
    assert after["nanoserve_prefix_cache_evictions_total"] > before["nanoserve_prefix_cache_evictions_total"]
    assert after["nanoserve_prefix_cache_cached_blocks"] <= total


def test_without_a_prefix_cache_nothing_is_cached(uncached_server: RunningServer) -> None:
    server, prompt = uncached_server, unique_prompt()
    client = server.client()
    usages = [
        client.completions.create(model=server.model, prompt=prompt, max_tokens=3, **GREEDY).usage
        for _ in range(2)
    ]
    assert [cached_tokens(u) for u in usages] == [0, 0]
    after = finish(server)
    assert all(after[name] == 0 for name in PREFIX_METRICS)
