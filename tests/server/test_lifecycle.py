"""Starting and stopping: the CLI serves, SIGTERM drains in-flight streams, the engine thread stops cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.sampling import SamplingParams
from nanoserve.server.async_engine import AsyncEngine, SubRequest
from nanoserve.stats import EngineStats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited early with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")


@pytest.mark.parametrize(
    ("sig", "shutdown_timeout", "n", "finishes"),
    [
        (signal.SIGTERM, 30, 1, True),
        (signal.SIGINT, 0.1, 16, False),
    ],  # 16 x 480 tokens take far longer than 0.1 s
)
def test_cli_server_drains_or_aborts_in_flight_streams_on_signal(
    tiny_model_dir: str, sig: int, shutdown_timeout: float, n: int, finishes: bool
) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "nanoserve", "serve", "--model", tiny_model_dir, "--port", str(port), "--num-blocks", "600",
           "--shutdown-timeout", str(shutdown_timeout), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        body = {
            "prompt": "Once upon a time",
            "max_tokens": 480,
            "n": n,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: ")))
            proc.send_signal(sig)  # mid-stream
            events += [line for line in lines if line.startswith("data: ")]
        assert proc.wait(timeout=60) == 0
        assert events[-1] == "data: [DONE]"
        if finishes:
            finished = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
            assert finished.count("length") == n
        else:  # aborted at the drain deadline: told so, not cut off
            assert "shutting down" in json.loads(events[-2][6:])["error"]["message"]
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_async_engine_streams_match_the_engine_and_stop_aborts_live_requests(tiny_model_dir: str) -> None:
    prompt = [5, 6, 7, 8]
    reference = LLMEngine(EngineConfig(model=tiny_model_dir, num_blocks=64))
    reference.add_request(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), "ref")
    expected = []
    while reference.has_unfinished_requests():
        expected += [o for o in reference.step() if o.finished]

    async_engine = AsyncEngine(LLMEngine(EngineConfig(model=tiny_model_dir, num_blocks=64)))
    async_engine.start()

    async def scenario() -> tuple[list[int], str | None]:
        short = await async_engine.add_requests(
            [SubRequest("a", prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))]
        )
        tokens = [t async for out in short for t in out.new_token_ids]
        long = await async_engine.add_requests(
            [SubRequest("b", prompt, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))]
        )
        reasons = []
        async for out in long:
            if not reasons:
                await asyncio.to_thread(async_engine.stop)  # shut down mid-generation
            reasons.append(out.finish_reason)
        return tokens, reasons[-1]

    try:
        tokens, last_reason = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        async_engine.stop()
    assert tokens == expected[0].token_ids
    assert last_reason == "abort"
    assert async_engine.stats.num_used_blocks == 0 and not async_engine.is_running
    assert isinstance(async_engine.stats, EngineStats)  # the engine's own snapshot
    assert async_engine.stats.num_steps > 0 and async_engine.stats.aborted == 1
