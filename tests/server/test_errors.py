"""Every refusal is OpenAI's error JSON with the right status, and none of them hurts the server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.exceptions import HTTPException

from tests.server.conftest import TEST_MAX_BODY_BYTES, RunningServer, assert_error_shape, chat, serve_tiny

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OK_CHAT = {"messages": chat("Hi"), "max_tokens": 2}
OK_COMPLETION = {"prompt": "Hi", "max_tokens": 2}


def post(server: RunningServer, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30, **kwargs)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, b"{not json", None),
        (CHAT, b"[1, 2]", None),
        (CHAT, {"max_tokens": 2}, "messages"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": "hello"}, "messages"),
        (CHAT, {"messages": [{"content": "hi"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        (CHAT, {**OK_CHAT, "temperature": "hot"}, "temperature"),
        (CHAT, {**OK_CHAT, "temperature": 5}, "temperature"),
        (CHAT, {**OK_CHAT, "temperature": -1}, "temperature"),
        (CHAT, {**OK_CHAT, "top_p": 0}, "top_p"),
        (CHAT, {**OK_CHAT, "max_tokens": 0}, "max_tokens"),
        (CHAT, {**OK_CHAT, "max_tokens": True}, "max_tokens"),
        (CHAT, {**OK_CHAT, "max_completion_tokens": 1.5}, "max_completion_tokens"),
        (CHAT, {**OK_CHAT, "n": 0}, "n"),
        (CHAT, {**OK_CHAT, "n": 1000}, "n"),
        (CHAT, {**OK_CHAT, "stop": [""]}, "stop"),
        (CHAT, {**OK_CHAT, "stop": 7}, "stop"),
        (CHAT, {**OK_CHAT, "stream": "yes"}, "stream"),
        (CHAT, {**OK_CHAT, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        (CHAT, {**OK_CHAT, "top_logprobs": 2}, "top_logprobs"),
        (CHAT, {**OK_CHAT, "presence_penalty": 2.5}, "presence_penalty"),  # in [-2, 2]
        (CHAT, {**OK_CHAT, "tools": [{"type": "function"}]}, "tools"),
        (CHAT, {**OK_CHAT, "seed": "42"}, "seed"),
        (COMPLETIONS, {"max_tokens": 2}, "prompt"),
        (COMPLETIONS, {"prompt": 12}, "prompt"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
        (COMPLETIONS, {"prompt": ""}, "prompt"),
        (COMPLETIONS, {"prompt": [10**9]}, "prompt"),
        (COMPLETIONS, {**OK_COMPLETION, "logprobs": 21}, "logprobs"),
        (COMPLETIONS, {**OK_COMPLETION, "echo": True, "logprobs": 1}, "echo"),
        (COMPLETIONS, {**OK_COMPLETION, "min_p": 2}, "min_p"),
        (COMPLETIONS, {**OK_COMPLETION, "top_k": -5}, "top_k"),
        (COMPLETIONS, {"prompt": ["a", "b", "c"], "n": 8}, "n"),
    ],
)
def test_invalid_requests_get_400_naming_the_field(
    tiny_server: RunningServer, path: str, body: Any, param: str | None
) -> None:
    error = assert_error_shape(post(tiny_server, path, body), 400, param)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert param.split("[")[0] in error["message"]


def test_nan_is_not_a_number(tiny_server: RunningServer) -> None:
    assert_error_shape(post(tiny_server, COMPLETIONS, b'{"prompt": "Hi", "temperature": NaN}'), 400)


def test_unknown_model_is_404(tiny_server: RunningServer) -> None:
    error = assert_error_shape(post(tiny_server, CHAT, {**OK_CHAT, "model": "gpt-17"}), 404, "model")
    assert error["code"] == "model_not_found" and tiny_server.model in error["message"]
    assert_error_shape(httpx.get(tiny_server.url + "/v1/models/gpt-17"), 404)


def test_max_tokens_past_the_context_is_400_naming_the_limit(tiny_server: RunningServer) -> None:
    limit = tiny_server.async_engine.max_model_len
    body = {"prompt": [10, 11, 12], "max_tokens": 100_000}
    error = assert_error_shape(post(tiny_server, COMPLETIONS, body), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    assert f"maximum context length is {limit} tokens; you requested 100003" in error["message"]
    tiny_server.check_invariants()


def test_prompt_longer_than_the_context_is_400_with_the_limits(tiny_server: RunningServer) -> None:
    prompt = [10 + i % 200 for i in range(600)]
    error = assert_error_shape(post(tiny_server, COMPLETIONS, {"prompt": prompt}), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert "600" in error["message"] and str(tiny_server.async_engine.max_model_len) in error["message"]


def test_body_over_the_limit_is_413(tiny_server: RunningServer) -> None:
    body = {"prompt": "x" * (TEST_MAX_BODY_BYTES + 1000), "max_tokens": 1}
    error = assert_error_shape(post(tiny_server, COMPLETIONS, body), 413)
    assert str(TEST_MAX_BODY_BYTES) in error["message"]


def test_unknown_route_and_wrong_method_keep_the_error_shape(tiny_server: RunningServer) -> None:
    assert_error_shape(httpx.get(tiny_server.url + "/v1/nothing-here"), 404)
    assert_error_shape(httpx.get(tiny_server.url + CHAT), 405)


def test_official_client_raises_its_typed_errors(tiny_server: RunningServer) -> None:
    import openai

    client = tiny_server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=tiny_server.model, messages=chat("Hi"), temperature=9)
    assert info.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=chat("Hi"))


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: str) -> Iterator[RunningServer]:
    with serve_tiny(tiny_model_dir, {"num_blocks": 32}, api_key="sekret") as server:
        yield server


def test_api_key_is_required_on_v1_when_set(keyed_server: RunningServer) -> None:
    import openai

    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
        error = assert_error_shape(post(keyed_server, CHAT, OK_CHAT, headers=headers), 401)
        assert error["type"] == "authentication_error"
    assert_error_shape(httpx.get(keyed_server.url + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="wrong").models.list()
    assert (
        keyed_server.client()
        .chat.completions.create(model=keyed_server.model, messages=chat("Hi"), max_tokens=2)
        .choices
    )
    assert httpx.get(keyed_server.url + "/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(keyed_server.url + "/metrics").status_code == 200


def test_a_full_waiting_queue_answers_503_with_retry_after(tiny_model_dir: str) -> None:
    long = {
        "messages": chat("Go on"),
        "max_tokens": 480,  # the whole context: still running when the third request comes
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with serve_tiny(tiny_model_dir, {"num_blocks": 64, "max_num_seqs": 1}, max_waiting=1) as server:

        def slow_steps(engine) -> None:  # 5 ms a step: the tiny model would finish 480 tokens in well under a second
            step = engine.step
            engine.step = lambda: (time.sleep(0.005), step())[1]

        server.async_engine.run_in_engine(slow_steps)
        with (
            httpx.Client(base_url=server.url, timeout=30) as a,
            httpx.Client(base_url=server.url, timeout=30) as b,
        ):
            with a.stream("POST", CHAT, json=long) as running:
                assert running.status_code == 200
                deadline = time.monotonic() + 5
                while server.async_engine.stats.num_running == 0:  # the first request holds the only seat
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                with b.stream("POST", CHAT, json=long) as waiting:
                    assert waiting.status_code == 200  # admitted: it waits for the seat
                    refused = post(server, CHAT, OK_CHAT)
                    error = assert_error_shape(refused, 503)
                    assert refused.headers["retry-after"] == "1" and "overloaded" in error["message"]
        server.wait_until_idle(timeout=10)
        assert post(server, CHAT, OK_CHAT).status_code == 200  # and it serves again


def test_every_other_503_carries_retry_after_too(tiny_model_dir: str) -> None:
    """Besides a full queue (above): a request aborted at the drain deadline, a request and
    ``/health`` once the engine has stopped, and an HTTPException(503) from a route."""

    async def unavailable() -> None:
        raise HTTPException(503, "down for maintenance")

    long = {"prompt": "Go on", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    with serve_tiny(tiny_model_dir, {"num_blocks": 64}, retry_after_s=7) as server:
        server.app.add_api_route("/unavailable", unavailable)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post, server, COMPLETIONS, long)
            deadline = time.monotonic() + 5
            while server.async_engine.stats.num_running == 0:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.01)
            server.async_engine.abort_all()  # what a drain that runs out of time does
            answers = {"aborted": pending.result()}
        answers["raised"] = httpx.get(server.url + "/unavailable")
        server.async_engine.stop()
        answers["refused"] = post(server, CHAT, OK_CHAT)
        answers["health"] = httpx.get(server.url + "/health")
    for source, response in answers.items():
        assert response.status_code == 503, (source, response.text)
        assert response.headers.get("retry-after") == "7", (source, response.headers)
    for source in ("aborted", "raised", "refused"):
        assert_error_shape(answers[source], 503)
    assert "shutting down" in answers["aborted"].json()["error"]["message"]
    assert "shutting down" in answers["refused"].json()["error"]["message"]


# --- fuzzing -----------------------------------------------------------------------------------
KEYS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n",
    "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "ignore_eos", "stop_token_ids",
    "presence_penalty", "logit_bias", "response_format", "tools", "best_of", "suffix", "user",
]  # fmt: skip
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
small_ints = st.integers(-3, 40) | st.sampled_from([0, 1, 2**31, 2**63, 2**64, -(2**63) - 1])
field_values = {
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "x"]),
                "content": st.text(max_size=20) | json_values,
            }
        ),
        max_size=3,
    ),
    "prompt": st.text(max_size=30)
    | st.lists(st.integers(-5, 500), max_size=6)
    | st.lists(st.text(max_size=5), max_size=3),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_values}),
}


def fuzzed_body(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly-valid bodies with a few fields set to anything, plus arbitrary dicts."""

    def value_for(key: str) -> st.SearchStrategy[Any]:
        return field_values.get(key, small_ints | json_values)

    mutated = st.dictionaries(st.sampled_from(KEYS), st.just(None), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: value_for(k) for k in keys}).map(
            lambda changes: {**base, **changes}
        )
    )
    return mutated | st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: str) -> Iterator[RunningServer]:
    """A short context (64) so that any accepted request is over quickly."""
    with serve_tiny(tiny_model_dir, {"num_blocks": 64, "max_model_len": 64}) as server:
        yield server


def check_answer(server: RunningServer, path: str, body: Any) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body)
    headers = {"content-type": "application/json"}
    with httpx.stream("POST", server.url + path, content=content, headers=headers, timeout=60) as r:
        raw = r.read()
    assert r.status_code < 500, (body, raw)
    if r.status_code >= 400:
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw, raw[-300:]
    else:
        assert json.loads(raw)["choices"]


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(body=fuzzed_body({"messages": chat("Hi"), "max_tokens": 3}))
def test_fuzzed_chat_bodies_never_get_a_500(fuzz_server: RunningServer, body: dict[str, Any]) -> None:
    check_answer(fuzz_server, CHAT, body)


@FUZZ
@given(body=fuzzed_body({"prompt": "Hi", "max_tokens": 3}))
def test_fuzzed_completion_bodies_never_get_a_500(fuzz_server: RunningServer, body: dict[str, Any]) -> None:
    check_answer(fuzz_server, COMPLETIONS, body)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_fuzzed_raw_bytes_never_get_a_500(fuzz_server: RunningServer, raw: bytes) -> None:
    check_answer(fuzz_server, CHAT, raw)


def test_the_server_still_serves_after_the_fuzzing(fuzz_server: RunningServer) -> None:
    assert httpx.get(fuzz_server.url + "/health").status_code == 200
    r = fuzz_server.client().chat.completions.create(
        model=fuzz_server.model, messages=chat("Hi"), max_tokens=3
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    fuzz_server.wait_until_idle()
    fuzz_server.check_invariants()
