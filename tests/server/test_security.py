"""What keeps other sites and broken clients out: the Content-Type and Host checks, CORS only
when asked for, a client gone mid-body, and limits that would make a valid request impossible."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from nanoserve.config import ServerConfig
from nanoserve.errors import NanoserveError
from nanoserve.server.cli import check_server_config
from nanoserve.server.protocol import MAX_CHOICES
from nanoserve.server.security import host_name, host_names
from tests.server.conftest import RunningServer, assert_error_shape, chat, serve_tiny

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OK_CHAT = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}'
OK_COMPLETION = b'{"prompt": "Hi", "max_tokens": 1}'
ERRORS = "nanoserve_http_errors_total"


def post(server: RunningServer, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir: str) -> Iterator[RunningServer]:
    """A server with one extra Host name, one CORS origin and a waiting queue of 8."""
    with serve_tiny(
        tiny_model_dir,
        {"num_blocks": 64},
        allowed_hosts=["api.example:443"],
        allowed_origins=["https://app.example"],
        max_waiting=8,
    ) as server:
        yield server


# --- Content-Type ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ],
)
def test_a_post_body_not_declared_json_is_415(
    tiny_server: RunningServer, path: str, content_type: str | None
) -> None:
    body = OK_CHAT if path == CHAT else OK_COMPLETION
    headers = {} if content_type is None else {"content-type": content_type}
    error = assert_error_shape(post(tiny_server, path, body, headers), 415)
    assert "application/json" in error["message"] and error["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_served(tiny_server: RunningServer) -> None:
    r = post(tiny_server, COMPLETIONS, OK_COMPLETION, {"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_the_official_client_sends_json_to_a_loopback_host(tiny_server: RunningServer) -> None:
    sent: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [sent.append]}) as http:
        client = tiny_server.client(http_client=http)
        client.chat.completions.create(model=tiny_server.model, messages=chat("Hi"), max_tokens=1)
    assert sent[0].headers["content-type"] == "application/json"
    assert host_name(sent[0].headers["host"]) == "127.0.0.1"


# --- Host -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models"])
def test_a_foreign_host_header_is_refused_on_every_route(tiny_server: RunningServer, path: str) -> None:
    r = httpx.get(tiny_server.url + path, headers={"host": "attacker.example"}, timeout=10)
    error = assert_error_shape(r, 403)
    assert "attacker.example" in error["message"] and "--allowed-hosts" in error["message"]


def test_a_foreign_host_header_is_refused_before_the_body_is_used(tiny_server: RunningServer) -> None:
    headers = {"host": "attacker.example:8000", "content-type": "application/json"}
    assert_error_shape(post(tiny_server, COMPLETIONS, OK_COMPLETION, headers), 403)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.1:1", "localhost:8000", "LOCALHOST", "[::1]:8000", "[::1]"]
)
def test_loopback_names_with_any_port_are_answered(tiny_server: RunningServer, host: str) -> None:
    assert httpx.get(tiny_server.url + "/v1/models", headers={"host": host}, timeout=10).status_code == 200


def test_allowed_hosts_add_names(guarded_server: RunningServer) -> None:
    get = guarded_server.url + "/v1/models"
    assert httpx.get(get, headers={"host": "api.example"}, timeout=10).status_code == 200
    assert httpx.get(get, headers={"host": "API.example:8443"}, timeout=10).status_code == 200
    assert httpx.get(get, headers={"host": "other.example"}, timeout=10).status_code == 403


def testhost_names() -> None:
    assert host_name("[::1]:8000") == "::1" and host_name("::1") == "::1"
    assert host_name("Example.COM.:80") == "example.com"
    assert host_names(["a", "*"]) is None
    assert host_names([" 0.0.0.0 "]) == {"0.0.0.0", "127.0.0.1", "localhost", "::1"}


# --- CORS -----------------------------------------------------------------------------------
def preflight(server: RunningServer, origin: str) -> httpx.Response:
    headers = {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    return httpx.options(server.url + CHAT, headers=headers, timeout=10)


def test_cors_is_off_by_default(tiny_server: RunningServer) -> None:
    assert "access-control-allow-origin" not in preflight(tiny_server, "https://app.example").headers
    r = httpx.get(tiny_server.url + "/v1/models", headers={"origin": "https://app.example"}, timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allows_only_the_allowed_origins(guarded_server: RunningServer) -> None:
    allowed = preflight(guarded_server, "https://app.example")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in preflight(guarded_server, "https://evil.example").headers


# --- a client gone mid-body ------------------------------------------------------------------
def error_counts(server: RunningServer) -> dict[str, float]:
    return {k: v for k, v in server.metrics().items() if k.startswith(ERRORS)}


def wait_for_change(
    server: RunningServer, before: dict[str, float], timeout: float = 10.0
) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (after := error_counts(server)) == before:
        assert time.monotonic() < deadline, "the server never finished the request"
        time.sleep(0.05)
    return after


def half_a_request(server: RunningServer) -> None:
    """Headers promising 100 bytes of body, 10 of them, then the connection closed."""
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n"
    )
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"prompt":')
        time.sleep(0.3)  # the route is waiting for the rest of the body


def test_a_client_gone_mid_body_is_counted_as_499_quietly(
    idle_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(caplog.handler)
    try:
        before = error_counts(idle_server)
        half_a_request(idle_server)
        after = wait_for_change(idle_server, before)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    key = ERRORS + '{status="%s"}'
    assert after.get(key % 500, 0) == before.get(key % 500, 0), after
    assert after.get(key % 499, 0) == before.get(key % 499, 0) + 1, after
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert (
        post(idle_server, COMPLETIONS, OK_COMPLETION, {"content-type": "application/json"}).status_code == 200
    )


# --- impossible requests and limits ------------------------------------------------------------
def test_more_choices_than_the_waiting_queue_is_400_naming_the_limit(guarded_server: RunningServer) -> None:
    body = b'{"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}'
    r = post(guarded_server, COMPLETIONS, body, {"content-type": "application/json"})
    error = assert_error_shape(r, 400, "n")
    assert "9" in error["message"] and "--max-waiting 8" in error["message"]
    body = b'{"prompt": ["a", "b"], "n": 4, "max_tokens": 1}'  # 8: fits
    assert post(guarded_server, COMPLETIONS, body, {"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"max_waiting": 0}, "--max-waiting"),
        ({"max_waiting": MAX_CHOICES - 1}, "--max-waiting"),
        ({"max_body_bytes": 0}, "--max-body-bytes"),
    ],
)
def test_impossible_limits_are_refused_before_the_model_loads(fields: dict[str, Any], flag: str) -> None:
    with pytest.raises(NanoserveError, match=flag):
        check_server_config(ServerConfig(**fields))


def test_possible_limits_pass(capsys: pytest.CaptureFixture[str]) -> None:
    check_server_config(ServerConfig(max_waiting=MAX_CHOICES))
    check_server_config(ServerConfig())
    assert capsys.readouterr().err == ""


def test_serve_with_an_impossible_limit_exits_2(tiny_model_dir: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "nanoserve",
        "serve",
        "--model",
        tiny_model_dir,
        "--max-waiting",
        "0",
        "--port",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--max-waiting 0" in proc.stderr and "Traceback" not in proc.stderr
