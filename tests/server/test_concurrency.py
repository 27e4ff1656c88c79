"""Many clients at once, and clients that leave: outputs are unchanged, blocks all come back."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.server.conftest import RunningServer, chat

NUM_CLIENTS = 16


def test_16_concurrent_streams_equal_the_same_requests_one_at_a_time(idle_server: RunningServer) -> None:
    server = idle_server
    prompts = [f"Client {i}: the quick brown fox number {i * 7}" for i in range(NUM_CLIENTS)]
    max_tokens = [
        8 + 2 * i for i in range(NUM_CLIENTS)
    ]  # different lengths: requests leave the batch at different steps
    client = server.client()
    one_at_a_time = [
        client.chat.completions.create(
            model=server.model, messages=chat(p), max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .message.content
        for p, n in zip(prompts, max_tokens, strict=True)
    ]

    async def stream_one(aclient, prompt: str, n: int) -> tuple[str, str | None]:
        stream = await aclient.chat.completions.create(
            model=server.model,
            messages=chat(prompt),
            max_tokens=n,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_at_once() -> list[tuple[str, str | None]]:
        aclient = server.async_client()
        try:
            return await asyncio.gather(
                *(stream_one(aclient, p, n) for p, n in zip(prompts, max_tokens, strict=True))
            )
        finally:
            await aclient.close()

    before_steps = server.metrics()["nanoserve_engine_steps_total"]
    concurrent = asyncio.run(asyncio.wait_for(all_at_once(), 120))
    assert [text for text, _ in concurrent] == one_at_a_time
    assert all(reason == "length" for _, reason in concurrent)
    metrics = server.wait_until_idle()
    assert metrics["nanoserve_kv_blocks_free"] == metrics["nanoserve_kv_blocks_total"]
    assert metrics["nanoserve_engine_steps_total"] - before_steps < sum(max_tokens), (
        "the streams were not batched together"
    )
    server.check_invariants()


def test_client_closing_its_stream_aborts_the_request_and_frees_its_blocks(
    idle_server: RunningServer,
) -> None:
    server = idle_server
    aborted_before = server.metrics().get('nanoserve_requests_finished_total{finish_reason="abort"}', 0.0)
    body = {
        "model": server.model,
        "messages": chat("Tell me everything"),
        "max_tokens": 480,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: dropping an httpx line iterator closes the connection
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        deadline = time.monotonic() + 60  # the first step may compile kernels
        while server.metrics()["nanoserve_kv_blocks_used"] == 0:  # until the request is being computed
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
        lines.close()
    # leaving the block closed the connection, with most of the 480 tokens still to come
    metrics = server.wait_until_idle(timeout=10)
    assert metrics['nanoserve_requests_finished_total{finish_reason="abort"}'] == aborted_before + 1
    server.check_invariants()


def test_client_giving_up_on_a_non_streamed_request_aborts_it(idle_server: RunningServer) -> None:
    server = idle_server
    aborted_before = server.metrics().get('nanoserve_requests_finished_total{finish_reason="abort"}', 0.0)
    body = {
        "model": server.model,
        "prompt": "Tell me everything",
        "max_tokens": 490,
        "temperature": 0,
        "ignore_eos": True,
        "n": 8,
    }
    try:
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("8 x 490 tokens should take longer than 0.3 s")
    metrics = server.wait_until_idle(timeout=10)
    assert metrics['nanoserve_requests_finished_total{finish_reason="abort"}'] == aborted_before + 8
    server.check_invariants()
