"""The API schema behind the key, prompts tokenized off the event loop, and an access line for a
request whose client left before its answer."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import RunningServer, assert_error_shape, chat, serve_tiny

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: str) -> Iterator[RunningServer]:
    with serve_tiny(tiny_model_dir, {"num_blocks": 32}, api_key=KEY) as server:
        yield server


# --- /openapi.json ---------------------------------------------------------------------------------
def test_the_api_schema_needs_the_key_when_one_is_set(keyed_server: RunningServer) -> None:
    url = keyed_server.url + "/openapi.json"
    assert_error_shape(httpx.get(url, timeout=30), 401)
    assert_error_shape(httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30), 401)
    r = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]
    assert "/openapi.json" not in r.json()["paths"]


def test_the_api_schema_is_open_without_a_key_and_no_docs_page_is_served(tiny_server: RunningServer) -> None:
    r = httpx.get(tiny_server.url + "/openapi.json", timeout=30)
    assert r.status_code == 200 and r.json()["info"]["title"] == "nanoserve"
    for page in ("/docs", "/redoc"):
        assert_error_shape(httpx.get(tiny_server.url + page, timeout=30), 404)


# --- tokenizing off the event loop -------------------------------------------------------------------
class BlockingTokenizer:
    """The server's tokenizer, except that encoding a text containing ``marker`` records the
    thread it runs on and waits until the test says /health has answered."""

    def __init__(self, tokenizer: Any, marker: str) -> None:
        self._tokenizer = tokenizer
        self.marker = marker
        self.entered = threading.Event()
        self.health_answered = threading.Event()
        self.thread_name: str | None = None
        self.saw_health_first: bool | None = None

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        if self.marker in text:
            self.thread_name = threading.current_thread().name
            self.entered.set()
            self.saw_health_first = self.health_answered.wait(30)  # the safety net: never a deadlock
        return self._tokenizer.encode(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_health_answers_while_a_huge_prompt_is_tokenized(tiny_model_dir: str, path: str) -> None:
    marker = "zebra-marker "
    text = marker + "lorem ipsum " * 4000  # ~48 KB, under the tests' body limit
    body: dict[str, Any] = {"max_tokens": 1, "temperature": 0}
    body.update({"prompt": text} if path == "/v1/completions" else {"messages": chat(text)})
    with serve_tiny(tiny_model_dir, {"num_blocks": 32, "max_model_len": 512}) as server:
        spy = BlockingTokenizer(server.async_engine.tokenizer, marker)
        server.async_engine.tokenizer = spy
        results: list[httpx.Response] = []
        post = threading.Thread(
            target=lambda: results.append(httpx.post(server.url + path, json=body, timeout=60)), daemon=True
        )
        post.start()
        assert spy.entered.wait(30), "the prompt was never tokenized"
        health = httpx.get(server.url + "/health", timeout=30)  # would wait for the tokenizer if on the loop
        spy.health_answered.set()
        post.join(60)
    assert health.status_code == 200
    assert spy.saw_health_first is True, "/health answered only after tokenizing finished"
    assert spy.thread_name != "nanoserve-http", "tokenized on the event loop's thread"
    (answer,) = results
    assert_error_shape(answer, 400, "prompt" if path == "/v1/completions" else "messages")  # past the context
    assert "context" in answer.json()["error"]["message"] or "long" in answer.json()["error"]["message"]


# --- the access line of an abandoned request -----------------------------------------------------------
@pytest.fixture()
def access_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog``, also capturing uvicorn's access log (whose logger does not propagate)."""
    access = logging.getLogger("uvicorn.access")
    level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        access.removeHandler(caplog.handler)
        access.setLevel(level)


def completion_lines(records: list[logging.LogRecord]) -> list[tuple[Any, ...]]:
    """(method, path, status) of each access line for /v1/completions."""
    return [
        (r.args[1], r.args[2], r.args[4])
        for r in records
        if r.name == "uvicorn.access" and isinstance(r.args, tuple) and r.args[2] == "/v1/completions"
    ]


def test_a_non_streamed_request_whose_client_left_gets_one_access_line(
    idle_server: RunningServer, access_log: pytest.LogCaptureFixture
) -> None:
    server = idle_server
    server.async_engine.run_in_engine(slow_steps)  # the client must leave before the 490 tokens are done
    try:
        abandon_a_long_completion(server, access_log)
    finally:
        server.async_engine.run_in_engine(normal_steps)
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=30)
    assert ok.status_code == 200
    deadline = time.monotonic() + 10
    while len(completion_lines(access_log.records)) < 2:
        assert time.monotonic() < deadline, "no access line for the answered request"
        time.sleep(0.02)
    assert completion_lines(access_log.records) == [
        ("POST", "/v1/completions", 499),
        ("POST", "/v1/completions", 200),
    ]


def slow_steps(engine: Any) -> None:
    """5 ms more per engine step: 490 tokens take >2.4 s, not the tiny model's fraction of a second."""
    step = engine.step
    engine.step = lambda: (time.sleep(0.005), step())[1]


def normal_steps(engine: Any) -> None:
    """Undo :func:`slow_steps` (the instance attribute shadows the class's method)."""
    engine.__dict__.pop("step", None)


def abandon_a_long_completion(server: RunningServer, access_log: pytest.LogCaptureFixture) -> None:
    """Send a 490-token completion, close the socket once it is computing, and see it logged as 499."""
    body = json.dumps(
        {"prompt": "Tell me everything", "max_tokens": 490, "temperature": 0, "ignore_eos": True}
    )
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body.encode())
        deadline = time.monotonic() + 10
        while server.metrics()["nanoserve_kv_blocks_used"] == 0:  # until the request is being computed
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    # the socket is closed, with most of the 490 tokens still to come
    deadline = time.monotonic() + 10
    while not completion_lines(access_log.records):
        assert time.monotonic() < deadline, "no access line for the abandoned request"
        time.sleep(0.02)
    server.wait_until_idle(timeout=10)
    assert completion_lines(access_log.records) == [("POST", "/v1/completions", 499)]
