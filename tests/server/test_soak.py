"""A soak test: 64 concurrent clients against one small server, seeded so that every run sends
the same requests.

Each client draws (from its own ``random.Random``, seeded from ``SEED``) an endpoint,
streaming or JSON, a length and a number of choices; 30% of them (a seeded sample) leave at
a random moment (mid-body, while the JSON answer is computed, or after a few streamed
events), and a few send bad bodies.
Afterwards:

* every engine request the server admitted ended, finished or aborted (none errored), and
  the engine holds none;
* no response was a 500, and every client that stayed got a whole answer, a 4xx for its bad
  body, or a 503 with ``Retry-After`` (the waiting queue was full);
* the idle engine's invariants hold and every KV block is free;
* the process's RSS (server and clients share it) grew by less than ``RSS_GROWTH_BOUND_MIB``
  over the run, measured after the same load has run once to warm up.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import pytest

from nanoserve.output import RequestOutput
from tests.server.conftest import RunningServer, chat, serve_tiny

SEED = 17
NUM_CLIENTS = 64
LEAVING_FRACTION = 0.3
NUM_BAD_BODIES = 4
RSS_GROWTH_BOUND_MIB = 32  # measured growth over a run: about 2 MiB; the rest is room for allocator noise
CLIENT_TIMEOUT_S = 60.0  # a safety net: a client never waits longer than this

BAD_BODIES: list[tuple[bytes, str, int]] = [  # (body, content type, the status it must get)
    (b'{"prompt": "Hi", "max_tokens": ', "application/json", 400),  # cut off: not JSON
    (b'{"prompt": "Hi"}', "text/plain", 415),
    (b'{"prompt": "Hi", "temperature": 7}', "application/json", 400),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "n": 17}', "application/json", 400),
]


@dataclass
class Plan:
    """What one client does, drawn from its own seeded generator."""

    client: int
    path: str
    body: dict[str, Any]
    stream: bool
    leave: str | None  # None, "mid-body", "json" (gives up while waiting) or "stream" (stops reading)
    leave_after: float  # "json": seconds before giving up; "stream": events read before closing
    bad: tuple[bytes, str, int] | None = None


LEAVING = frozenset(random.Random(SEED).sample(range(NUM_BAD_BODIES, NUM_CLIENTS), round(LEAVING_FRACTION * NUM_CLIENTS)))


def plan(client: int) -> Plan:
    """Client ``client``'s requests; the same every run."""
    rng = random.Random(SEED * 1000 + client)
    if client < NUM_BAD_BODIES:
        return Plan(client, "/v1/completions", {}, False, None, 0.0, bad=BAD_BODIES[client])
    chat_endpoint = rng.random() < 0.5
    stream = rng.random() < 0.5
    body: dict[str, Any] = {
        "max_tokens": rng.randint(1, 40),
        "n": rng.choice([1, 1, 1, 2, 3]),
        "temperature": rng.choice([0.0, 0.8]),
        "seed": rng.randint(0, 1000),
        "stream": stream,
    }
    prompt = " ".join(rng.choice(["The quick brown fox", "Hello world", "Paris is", "1 2 3"]) for _ in range(rng.randint(1, 8)))
    if chat_endpoint:
        body["messages"] = chat(prompt)
    else:
        body["prompt"] = prompt
    leave = None
    if client in LEAVING:
        leave = rng.choice(["mid-body", "stream", "stream"] if stream else ["mid-body", "json", "json"])
    leave_after = rng.uniform(0.0, 0.3) if leave == "json" else float(rng.randint(1, 4))
    path = "/v1/chat/completions" if chat_endpoint else "/v1/completions"
    return Plan(client, path, body, stream, leave, leave_after)


@dataclass
class Outcome:
    client: int
    status: int | None  # None: the client left before a status arrived
    complete: bool  # a whole answer: every choice finished (JSON), or [DONE] after them (stream)
    retry_after: bool = False


async def run_client(client: httpx.AsyncClient, p: Plan) -> Outcome:
    """One client's requests over the shared ``client``; a client that leaves closes its connection."""
    if p.leave == "mid-body":
        return await leave_mid_body(str(client.base_url), p)
    if p.bad is not None:
        body, content_type, _ = p.bad
        r = await client.post(p.path, content=body, headers={"content-type": content_type})
        return Outcome(p.client, r.status_code, False)
    if not p.stream:
        timeout = httpx.Timeout(CLIENT_TIMEOUT_S, read=p.leave_after) if p.leave == "json" else CLIENT_TIMEOUT_S
        try:
            r = await client.post(p.path, json=p.body, timeout=timeout)
        except httpx.ReadTimeout:  # httpx closes the connection
            return Outcome(p.client, None, False)
        complete = r.status_code == 200 and all(c["finish_reason"] for c in r.json()["choices"])
        return Outcome(p.client, r.status_code, complete, "retry-after" in r.headers)
    async with client.stream("POST", p.path, json=p.body) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(p.client, r.status_code, False, "retry-after" in r.headers)
        events, finished = 0, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if p.leave == "stream" and events >= p.leave_after:
                return Outcome(p.client, 200, False)  # leaving unread closes the connection
            if line == "data: [DONE]":
                return Outcome(p.client, 200, finished == p.body["n"])
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            finished += sum(1 for c in chunk["choices"] if c["finish_reason"])
        return Outcome(p.client, 200, False)


async def run_all(url: str, plans: list[Plan]) -> list[Outcome]:
    """Every plan's client at once, over one connection each."""
    limits = httpx.Limits(max_connections=len(plans), max_keepalive_connections=len(plans))
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        return list(await asyncio.gather(*(run_client(client, p) for p in plans)))


async def leave_mid_body(url: str, p: Plan) -> Outcome:
    """Send the headers and half the body, then close the connection."""
    body = json.dumps(p.body).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST {p.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body[: len(body) // 2])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await writer.wait_closed()
    return Outcome(p.client, None, False)


@pytest.fixture(scope="module")
def soak_server(tiny_model_dir: str) -> Iterator[RunningServer]:
    """8 running at once, 64 waiting at most: some clients get a 503, most are admitted."""
    with serve_tiny(tiny_model_dir, {"num_blocks": 256, "max_num_seqs": 8}, max_waiting=64) as server:
        yield server


def test_soak_64_clients_with_disconnects_and_bad_bodies_leaves_a_clean_idle_engine(
    soak_server: RunningServer,
) -> None:
    server = soak_server
    plans = [plan(i) for i in range(NUM_CLIENTS)]

    admitted: set[str] = set()  # engine request ids, recorded on the engine thread
    ended: dict[str, str] = {}  # request id -> finish reason, from the step observer

    def count_admissions(engine: Any) -> None:
        add_request = engine.add_request

        def counted(prompt: Any, params: Any = None, request_id: str | None = None) -> str:
            request_id = add_request(prompt, params, request_id)
            admitted.add(request_id)
            return request_id

        engine.add_request = counted

    def record_ends(outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            if out.finished:
                ended[out.request_id] = out.finish_reason or "unknown"

    asyncio.run(run_all(server.url, plans))  # warm-up: the same load once, so that first allocations are made
    server.wait_until_idle()
    errors_before = server.metrics().get('nanoserve_http_errors_total{status="500"}', 0.0)
    rss_before = psutil.Process().memory_info().rss
    server.async_engine.run_in_engine(count_admissions)
    server.async_engine.add_observer(record_ends)

    outcomes = asyncio.run(run_all(server.url, plans))

    server.wait_until_idle(timeout=30)
    rss_growth_mib = (psutil.Process().memory_info().rss - rss_before) / 2**20
    assert admitted, "no request was admitted"
    assert set(ended) >= admitted, f"admitted but never ended: {sorted(admitted - set(ended))[:5]}"
    reasons = {ended[request_id] for request_id in admitted}
    assert reasons <= {"stop", "length", "abort"}, reasons

    assert not [o for o in outcomes if o.status == 500]
    assert server.metrics().get('nanoserve_http_errors_total{status="500"}', 0.0) == errors_before
    for p, o in zip(plans, outcomes):
        if p.bad is not None:
            assert o.status == p.bad[2], (p, o)
        elif p.leave is None:
            assert o.complete or (o.status == 503 and o.retry_after), (p, o)
    assert any(o.complete for o in outcomes), "no client got an answer"

    assert server.async_engine.run_in_engine(lambda engine: len(engine.requests)) == 0
    server.check_invariants()
    stats = server.async_engine.run_in_engine(lambda engine: engine.stats())
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0, stats
    assert rss_growth_mib < RSS_GROWTH_BOUND_MIB, f"RSS grew by {rss_growth_mib:.1f} MiB"
