"""The server takes OpenAI's presence/frequency penalties and vLLM's repetition_penalty.

Values in range reach the engine's SamplingParams and change a greedy answer; "off"
values leave it as it was; values out of range are OpenAI-shaped 400s naming the field
and its bound.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from nanoserve.server.protocol import ChatCompletionRequest, CompletionRequest, parse_request, sampling_params
from tests.server.conftest import RunningServer, assert_error_shape, chat

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT = [5, 6, 7, 8]  # token ids of the tiny model


def post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=30)


def greedy_tokens(server: RunningServer, **penalties: Any) -> list[int]:
    """The text of each token of the greedy completion (from its logprobs)."""
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 0, **penalties}
    response = post(server, COMPLETIONS, body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["tokens"]


def test_penalties_map_into_sampling_params() -> None:
    body = {"messages": chat("Hi"), "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.3}
    params = sampling_params(parse_request(ChatCompletionRequest, json.dumps(body).encode()), 8, 0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -1.0, 1.3)
    default = sampling_params(parse_request(CompletionRequest, b'{"prompt": "Hi"}'), 8, 0)
    assert (default.presence_penalty, default.frequency_penalty, default.repetition_penalty) == (0.0, 0.0, 1.0)
    assert not default.uses_penalties


def test_penalties_change_a_greedy_answer_and_off_values_do_not(tiny_server: RunningServer) -> None:
    off = greedy_tokens(tiny_server)
    assert greedy_tokens(tiny_server, presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1) == off
    assert greedy_tokens(tiny_server, repetition_penalty=1.5) != off
    assert greedy_tokens(tiny_server, frequency_penalty=2) != off


def test_the_openai_client_sends_penalties_and_the_extension(tiny_server: RunningServer) -> None:
    r = tiny_server.client().chat.completions.create(
        model=tiny_server.model,
        messages=chat("Hello there"),
        max_tokens=8,
        temperature=0,
        presence_penalty=0.6,
        frequency_penalty=0.4,
        extra_body={"repetition_penalty": 1.2},
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("path", "field", "value", "bound"),
    [
        (CHAT, "presence_penalty", 2.5, "less than or equal to 2"),
        (CHAT, "presence_penalty", -3, "greater than or equal to -2"),
        (CHAT, "frequency_penalty", 2.01, "less than or equal to 2"),
        (COMPLETIONS, "frequency_penalty", -2.5, "greater than or equal to -2"),
        (CHAT, "repetition_penalty", 0, "greater than or equal to 0.01"),
        (COMPLETIONS, "repetition_penalty", 101, "less than or equal to 100"),
        (CHAT, "repetition_penalty", "1.2", "valid number"),
    ],
)
def test_penalties_out_of_range_are_400s_naming_the_field(
    tiny_server: RunningServer, path: str, field: str, value: Any, bound: str
) -> None:
    base = {"messages": chat("Hi")} if path == CHAT else {"prompt": "Hi"}
    error = assert_error_shape(post(tiny_server, path, {**base, "max_tokens": 2, field: value}), 400, field)
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{field}: ") and bound in error["message"], error["message"]
