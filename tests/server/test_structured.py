"""Structured output over HTTP: ``response_format`` and vLLM's ``guided_*`` fields on both endpoints.

Every answer matches its constraint (through the real ``openai`` client, streamed and not);
every constraint nanoserve cannot enforce is an OpenAI-shaped 400 naming the field the
client sent, never a 500 and never an unconstrained answer.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

pytest.importorskip("interegular")

from nanoserve.errors import InvalidSamplingParams  # noqa: E402
from nanoserve.server.protocol import (  # noqa: E402
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
    sampling_params,
)
from tests.server.conftest import RunningServer, assert_error_shape, chat  # noqa: E402

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "population": {"type": "integer"}, "capital": {"type": "boolean"}},
    "required": ["city", "population", "capital"],
}


def post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)


def test_response_format_and_guided_fields_map_into_sampling_params() -> None:
    def params(model, body):
        return sampling_params(parse_request(model, json.dumps(body).encode()), 64, 0)

    base = {"messages": chat("Hi")}
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    assert params(ChatCompletionRequest, {**base, "response_format": schema_format}).json_schema == SCHEMA
    assert params(ChatCompletionRequest, {**base, "response_format": {"type": "json_object"}}).json_schema == {"type": "object"}
    assert not params(ChatCompletionRequest, {**base, "response_format": {"type": "text"}}).constrained
    assert params(CompletionRequest, {"prompt": "Hi", "guided_regex": "[0-9]+"}).regex == "[0-9]+"
    assert params(CompletionRequest, {"prompt": "Hi", "guided_choice": ["a", "b"]}).choice == ["a", "b"]
    assert params(CompletionRequest, {"prompt": "Hi", "guided_json": SCHEMA}).json_schema == SCHEMA


def test_the_vocabulary_checks_run_when_the_tokenizer_is_given(tiny_loaded) -> None:
    req = parse_request(CompletionRequest, json.dumps({"prompt": "Hi", "guided_regex": "[0-9]{30}"}).encode())
    with pytest.raises(InvalidSamplingParams, match="invalid max_tokens=4: .* takes"):
        sampling_params(req, 4, 0, tokenizer=tiny_loaded.tokenizer)
    assert sampling_params(req, 64, 0, tokenizer=tiny_loaded.tokenizer).regex == "[0-9]{30}"
    lone = CompletionRequest.model_validate({"prompt": "Hi", "guided_regex": "\ud800"})  # no UTF-8 spells a surrogate
    with pytest.raises(APIError, match="unsatisfiable") as info:
        sampling_params(lone, 64, 0, tokenizer=tiny_loaded.tokenizer)
    assert info.value.param == "guided_regex" and info.value.status == 400


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_response_format_through_the_openai_client(idle_server: RunningServer, stream: bool, temperature: float) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    client = idle_server.client()
    kwargs = dict(model=idle_server.model, messages=chat("Describe Paris"), max_tokens=80, temperature=temperature, seed=3, response_format=fmt)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices)
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_response_format_gives_a_json_object(idle_server: RunningServer) -> None:
    r = idle_server.client().chat.completions.create(
        model=idle_server.model, messages=chat("Hi"), max_tokens=60, temperature=1.0, seed=1, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_guided_regex_and_choice_on_the_completions_endpoint(idle_server: RunningServer, stream: bool) -> None:
    client = idle_server.client()
    for extra, check in [
        ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        ({"guided_choice": ["sunny", "rainy", "café"]}, lambda t: t in ("sunny", "rainy", "café")),
    ]:
        kwargs = dict(model=idle_server.model, prompt="The weather is", max_tokens=20, temperature=1.0, seed=5, n=2, extra_body=extra)
        if stream:
            texts = {0: "", 1: ""}
            for c in client.completions.create(stream=True, **kwargs):
                for choice in c.choices:
                    texts[choice.index] += choice.text
            answers = list(texts.values())
        else:
            answers = [c.text for c in client.completions.create(**kwargs).choices]
        assert all(check(t) for t in answers), (extra, answers)


def test_guided_choice_on_the_chat_endpoint(idle_server: RunningServer) -> None:
    r = idle_server.client().chat.completions.create(
        model=idle_server.model, messages=chat("Yes or no?"), max_tokens=8, temperature=0, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        (COMPLETIONS, {"guided_regex": "a(b"}, "guided_regex", "cannot parse"),
        (CHAT, {"guided_regex": "(?<=a)b"}, "guided_regex", "lookaround"),
        (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 0}}}}, "response_format", "unsupported schema keyword 'minimum'"),
        (COMPLETIONS, {"guided_json": {"type": "object", "properties": {"a": {"type": "string", "format": "hostname"}}}}, "guided_json", "format"),
        (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": False}}}, "response_format", "unsatisfiable"),
        (COMPLETIONS, {"guided_choice": []}, "guided_choice", "non-empty"),
        (COMPLETIONS, {"guided_choice": "yes"}, "guided_choice", None),
        (CHAT, {"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        (CHAT, {"response_format": {"type": "json_schema"}}, "response_format", "json_schema must be an object"),
        (CHAT, {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
        (COMPLETIONS, {"guided_regex": "[0-9]+", "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ],
)
def test_constraints_that_cannot_be_enforced_are_400s_naming_the_field(
    idle_server: RunningServer, path: str, body: dict[str, Any], param: str, words: str | None
) -> None:
    base = {"messages": chat("Hi")} if path == CHAT else {"prompt": "Hi"}
    response = post(idle_server, path, {**base, "max_tokens": 16, **body})
    error = assert_error_shape(response, 400, param)
    if words is not None:
        assert words in error["message"], error
    assert "\n" not in error["message"]
