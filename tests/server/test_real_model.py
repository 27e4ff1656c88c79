"""The server over SmolLM2-135M-Instruct: real answers, the real chat template, real stop strings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.server.app import create_app
from nanoserve.server.async_engine import AsyncEngine
from nanoserve.server.runner import ServerThread
from tests.server.conftest import RunningServer, chat

pytestmark = pytest.mark.real_model
QUESTION = chat("What is the capital of France?")


@pytest.fixture(scope="module")
def smollm2_server(smollm2_loaded) -> Iterator[RunningServer]:
    async_engine = AsyncEngine(LLMEngine(EngineConfig(num_blocks=256), loaded=smollm2_loaded))
    app = create_app(async_engine, served_model_name="SmolLM2-135M-Instruct")
    try:
        with ServerThread(app) as server:
            yield RunningServer(server.url, "SmolLM2-135M-Instruct", async_engine)
    finally:
        async_engine.stop()


def test_chat_answers_the_question_with_exact_usage(smollm2_server: RunningServer) -> None:
    r = smollm2_server.client().chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=12, temperature=0
    )
    assert "Paris" in r.choices[0].message.content
    tok = smollm2_server.async_engine.tokenizer
    assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(QUESTION)))
    assert 0 < r.usage.completion_tokens <= 12


def test_streamed_answer_stops_before_the_stop_string(smollm2_server: RunningServer) -> None:
    client = smollm2_server.client()
    kwargs = {
        "model": "SmolLM2-135M-Instruct",
        "messages": QUESTION,
        "max_tokens": 12,
        "temperature": 0,
        "stop": ["Paris"],
    }
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    assert "Paris" not in streamed and streamed.strip()
    assert whole.choices[0].finish_reason == "stop"
    smollm2_server.wait_until_idle()
