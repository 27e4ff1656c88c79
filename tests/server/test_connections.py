"""Connections and startup: idle keep-alive sockets close, past ``--limit-concurrency`` a request
gets 503, the open-file limit is raised, a failing ``accept()`` is logged once and then
summarised, and ``serve`` logs what it runs."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from nanoserve.config import EngineConfig, ServerConfig
from nanoserve.engine import LLMEngine
from nanoserve.errors import NanoserveError
from nanoserve.server import cli as server_cli
from nanoserve.server.runner import AcceptErrorHandler, DrainingServer, RateLimitedLog
from tests.server.conftest import RunningServer, serve_tiny

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)  # the timeout is a safety net


def read_response(sock: socket.socket) -> bytes:
    """One whole response to GET /health (its body is small JSON): the head and the body."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def limited_server(tiny_model_dir: str) -> Iterator[RunningServer]:
    """A server whose idle connections close after 0.2 s and that takes 2 connections at most."""
    with serve_tiny(
        tiny_model_dir, {"num_blocks": 32}, server_kwargs={"limit_concurrency": 2, "timeout_keep_alive": 0.2}
    ) as server:
        yield server


# --- uvicorn's limits ---------------------------------------------------------------------------
def test_an_idle_keep_alive_connection_is_closed_after_timeout_keep_alive(limited_server: RunningServer) -> None:
    with connect(limited_server) as sock:
        sock.sendall(GET_HEALTH)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        assert sock.recv(4096) == b"", "the server closes the idle connection (recv sees the end)"


def test_past_limit_concurrency_a_request_gets_503_and_then_is_served_again(limited_server: RunningServer) -> None:
    with connect(limited_server) as first:  # open, mid-request: one of the two connections
        first.sendall(b"GET /health HTTP/1.1\r\n")
        with connect(limited_server) as second:
            second.sendall(GET_HEALTH)
            refused = read_response(second)
        assert refused.startswith(b"HTTP/1.1 503"), refused
        first.sendall(b"Host: 127.0.0.1\r\n\r\n")
        assert read_response(first).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 30
    while True:  # once the server has seen the others close, a new connection is served
        with connect(limited_server) as sock:
            sock.sendall(GET_HEALTH)
            if read_response(sock).startswith(b"HTTP/1.1 200"):
                break
        assert time.monotonic() < deadline, "still refused after the other connections closed"
        time.sleep(0.05)


def test_serve_hands_its_connection_limits_to_uvicorn(tiny_model_dir: str) -> None:
    from fastapi import FastAPI

    nanoserve_logger = logging.getLogger("nanoserve")
    saved = nanoserve_logger.handlers[:], nanoserve_logger.propagate, nanoserve_logger.level
    try:
        config = server_cli.uvicorn_config(FastAPI(), ServerConfig(limit_concurrency=7, timeout_keep_alive=0.25))
    finally:
        nanoserve_logger.handlers[:], nanoserve_logger.propagate, nanoserve_logger.level = saved
    assert config.limit_concurrency == 7
    assert config.timeout_keep_alive == 0.25


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"limit_concurrency": 1}, "--limit-concurrency"),
        ({"timeout_keep_alive": 0.0}, "--timeout-keep-alive"),
        ({"timeout_keep_alive": float("nan")}, "--timeout-keep-alive"),
    ],
)
def test_connection_limits_that_refuse_every_request_are_refused_at_startup(fields: dict, flag: str) -> None:
    with pytest.raises(NanoserveError, match=flag):
        server_cli.validate(ServerConfig(**fields))


# --- the open-file limit ------------------------------------------------------------------------
def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, env=env
    )


def test_the_soft_open_file_limit_is_raised_toward_the_hard_one() -> None:
    proc = run_python(
        """
        import resource
        from nanoserve.server.cli import raise_fd_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, soft), hard))
        before, now, hard = raise_fd_limit(4096)
        wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        assert before == min(256, soft), before
        assert now == wanted == resource.getrlimit(resource.RLIMIT_NOFILE)[0], (now, wanted)
        assert raise_fd_limit(512)[1] == wanted, "never lowered"
        print("ok")
        """
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def test_an_open_file_limit_too_low_for_limit_concurrency_is_logged_with_a_warning() -> None:
    proc = run_python(
        """
        import logging, resource
        from nanoserve.server.cli import log_fd_limit
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))  # an unprivileged process cannot raise the hard limit
        log_fd_limit(1000)
        """
    )
    lines = proc.stderr.splitlines()
    assert "INFO open-file limit: raised from 100 to 200 (hard limit 200)" in lines, proc.stderr
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and "--limit-concurrency 1000" in warnings[0] and "200" in warnings[0], proc.stderr


# --- the accept() error log ------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_writes_the_first_error_then_one_summary_per_period(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RateLimitedLog(logging.getLogger("test.ratelimit"), period_s=10.0, clock=clock)
    with caplog.at_level(logging.ERROR, logger="test.ratelimit"):
        assert log("accept failed")
        assert not any(log("accept failed") for _ in range(999))  # the same instant: counted
        clock.now += 9.9
        assert not log("accept failed")
        assert [r.getMessage() for r in caplog.records] == ["accept failed"]
        clock.now += 0.1  # the period is over: the next one writes the summary
        assert log("accept failed")
        clock.now += 3.0
        log("accept failed")
        log.flush()  # what a timer does at the end of a period
        log.flush()  # nothing new: nothing written
        clock.now += 60.0  # quiet for longer than the period: the next error is logged as new
        assert log("accept failed")
    assert [r.getMessage() for r in caplog.records] == [
        "accept failed",
        "accept failed (1001 more times in 10 s)",
        "accept failed (1 more times in 3 s)",
        "accept failed",
    ]


def test_rate_limited_log_needs_a_positive_period() -> None:
    with pytest.raises(ValueError, match="period_s must be > 0"):
        RateLimitedLog(logging.getLogger("test.ratelimit"), period_s=0)


def test_accept_errors_are_rate_limited_and_other_loop_errors_are_not(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    handler = AcceptErrorHandler(RateLimitedLog(logging.getLogger("test.accept"), period_s=0.05))
    loop.set_exception_handler(handler)
    out_of_files = OSError(errno.EMFILE, "Too many open files")
    try:
        with caplog.at_level(logging.ERROR):
            for _ in range(2048):  # what one accept loop over a full backlog reports
                loop.call_exception_handler({"message": "socket.accept() out of system resource", "exception": out_of_files})
            loop.call_exception_handler({"message": "something else", "exception": ValueError("boom")})
            loop.run_until_complete(asyncio.sleep(0.2))  # past the scheduled summary
    finally:
        loop.close()
    accept_lines = [r.getMessage() for r in caplog.records if r.name == "test.accept"]
    assert len(accept_lines) == 2, accept_lines
    assert accept_lines[0].startswith("socket.accept() out of system resource: [Errno 24] Too many open files")
    assert "--limit-concurrency" in accept_lines[0]
    assert accept_lines[1].endswith("(2047 more times in 0 s)")
    others = [r for r in caplog.records if r.name == "asyncio"]
    assert len(others) == 1 and others[0].getMessage() == "something else", "other errors go to asyncio's handler"


SERVER_OUT_OF_FILES = """
import resource, socket, sys, types
import uvicorn
from fastapi import FastAPI
from nanoserve.server.runner import DrainingServer

sock = socket.create_server(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
config = uvicorn.Config(FastAPI(), log_level="warning", lifespan="off")
server = DrainingServer(config, types.SimpleNamespace(abort_all=lambda: None), drain_s=0.1)
open_fds = len(__import__("os").listdir("/proc/self/fd"))
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds + 12, hard))  # a dozen connections, then EMFILE
server.run(sockets=[sock])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc")
def test_a_server_out_of_file_descriptors_logs_one_line_not_one_per_accept() -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_OUT_OF_FILES], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    clients = []
    try:
        port = int(proc.stdout.readline())
        deadline = time.monotonic() + 60
        while not any("out of system resource" in line for line in stderr):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(stderr)
            if len(clients) < 200:  # waiting in the listen backlog: each accept() attempt fails
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(30)
        for client in clients:
            client.close()
    lines = [line for line in stderr if "out of system resource" in line]
    assert 1 <= len(lines) <= 2, "".join(stderr[:20])  # at most a summary besides the first
    assert not [line for line in stderr if "Traceback" in line], "".join(stderr[:40])


# --- what serve logs at startup -------------------------------------------------------------------------
def test_serve_logs_its_configuration_at_startup(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, num_blocks=24, block_size=16, max_model_len=256))
    served: list[DrainingServer] = []
    monkeypatch.setattr(DrainingServer, "run", lambda self, sockets=None: served.append(self))
    nanoserve_logger = logging.getLogger("nanoserve")
    saved = nanoserve_logger.handlers[:], nanoserve_logger.propagate, nanoserve_logger.level
    try:
        server = ServerConfig(port=8123, api_key="secret", limit_concurrency=50, timeout_keep_alive=2.0)
        assert server_cli.run(engine, server) == 0
    finally:
        nanoserve_logger.handlers[:], nanoserve_logger.propagate, nanoserve_logger.level = saved
    lines = [line.removeprefix("INFO:").strip() for line in capsys.readouterr().err.splitlines()]
    mib = engine.cache.nbytes / 2**20
    for expected in (
        f"model: {os.path.basename(tiny_model_dir)} ({tiny_model_dir})",
        "weights: gguf (float32)",  # the default keeps what the file stores: the tiny model's float32
        "backend: cpu",
        f"KV pool: 24 blocks of 16 tokens = 384 tokens, {mib:.1f} MiB (float32)",
        "max_model_len: 256",
        "listening on: http://127.0.0.1:8123",
        "API key: required",
    ):
        assert expected in lines, (expected, lines)
    assert [line for line in lines if line.startswith("threads: ") and "BLAS" in line], lines
    assert [line for line in lines if line.startswith("open-file limit: ")], lines
    (drainer,) = served
    assert (drainer.config.limit_concurrency, drainer.config.timeout_keep_alive) == (50, 2.0)


def test_describe_says_when_no_api_key_is_needed(tiny_model_dir: str) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, num_blocks=8))
    lines = server_cli.describe(engine, ServerConfig(host="::1", port=9000))
    assert "API key: not required (set --api-key or NANOSERVE_API_KEY)" in lines
    assert "listening on: http://[::1]:9000" in lines
