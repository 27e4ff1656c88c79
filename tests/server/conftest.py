"""Fixtures for the HTTP server tests: real servers on free loopback ports, in this process.

Each server runs uvicorn on a background thread (``ServerThread``) over its own engine,
so tests talk to it over real sockets with the official ``openai`` client and ``httpx``,
and can still check the engine's invariants on its own thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.server.app import create_app
from nanoserve.server.async_engine import AsyncEngine
from nanoserve.server.runner import ServerThread

TEST_MAX_BODY_BYTES = 64 * 1024


@dataclass
class RunningServer:
    url: str
    model: str
    async_engine: AsyncEngine
    api_key: str = "unused"
    app: FastAPI | None = None

    def client(self, **kwargs: Any) -> OpenAI:
        kwargs = {"api_key": self.api_key, "max_retries": 0, "timeout": 60.0, **kwargs}
        return OpenAI(base_url=self.url + "/v1", **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncOpenAI:
        kwargs = {"api_key": self.api_key, "max_retries": 0, "timeout": 60.0, **kwargs}
        return AsyncOpenAI(base_url=self.url + "/v1", **kwargs)

    def metrics(self) -> dict[str, float]:
        """``{sample name with labels: value}`` from GET /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def wait_until_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """Poll /metrics until nothing runs, nothing waits and every KV block is free or evictable.

        No block may be protected: none held by a request, and every prefix-cached block
        evictable (no lock left behind).
        """
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["nanoserve_num_requests_running"] == 0 and m["nanoserve_num_requests_waiting"] == 0
            cache = m["nanoserve_prefix_cache_cached_blocks"], m["nanoserve_prefix_cache_evictable_blocks"]
            if idle and m["nanoserve_kv_blocks_used"] == 0 and cache[0] == cache[1]:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {m}")
            time.sleep(0.05)

    def check_invariants(self) -> None:
        self.async_engine.run_in_engine(lambda engine: engine.check_invariants())


@contextmanager
def serve_tiny(
    model_dir: str,
    engine_kwargs: dict[str, Any] | None = None,
    server_kwargs: dict[str, Any] | None = None,
    **app_kwargs: Any,
) -> Iterator[RunningServer]:
    """A server over a fresh engine on the tiny model; stopped (and its engine thread) on exit.

    ``server_kwargs`` go to :class:`ServerThread` (uvicorn's connection limits), the rest to ``create_app``."""
    config = {"model": model_dir, "num_blocks": 128, "max_num_seqs": 32, **(engine_kwargs or {})}
    async_engine = AsyncEngine(
        LLMEngine(EngineConfig(**config)), max_waiting=app_kwargs.pop("max_waiting", None)
    )
    app_kwargs.setdefault("max_body_bytes", TEST_MAX_BODY_BYTES)
    app = create_app(async_engine, **app_kwargs)
    try:
        with ServerThread(app, **(server_kwargs or {})) as server:
            api_key = app_kwargs.get("api_key") or "unused"
            yield RunningServer(server.url, app.state.server.model_id, async_engine, api_key, app)
    finally:
        async_engine.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: str) -> Iterator[RunningServer]:
    """The shared server most tests use: tiny model, 128 blocks of 16, context 512."""
    with serve_tiny(tiny_model_dir) as server:
        yield server


@pytest.fixture()
def idle_server(tiny_server: RunningServer) -> RunningServer:
    """``tiny_server``, checked idle (all blocks free) before the test."""
    tiny_server.wait_until_idle()
    return tiny_server


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def token_counts(usage: Any) -> tuple[int, int, int]:
    """``(prompt, completion, total)`` tokens of an openai ``usage``: what two runs of one request share
    (the second may find more of its prompt in the prefix cache)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def assert_error_shape(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response is OpenAI's error JSON with this status (and ``param``, if given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not None:
        assert error["param"] == param, error
    return error
