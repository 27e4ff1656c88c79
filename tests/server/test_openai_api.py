"""The OpenAI API over a real socket with the official client: shapes, usage, stops, seeds, logprobs."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import RunningServer, chat, token_counts

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def prompt_tokens(server: RunningServer, messages: list[dict[str, str]]) -> int:
    tok = server.async_engine.tokenizer
    return len(tok.encode(tok.apply_chat_template(messages)))


def test_models_lists_the_served_model_and_health_is_ok(tiny_server: RunningServer) -> None:
    models = tiny_server.client().models.list().data
    assert [m.id for m in models] == [tiny_server.model]
    assert tiny_server.client().models.retrieve(tiny_server.model).id == tiny_server.model
    assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}


def test_chat_completion_reports_exact_usage(tiny_server: RunningServer) -> None:
    messages = chat("Hello world")
    r = tiny_server.client().chat.completions.create(
        model=tiny_server.model, messages=messages, max_tokens=7, **GREEDY
    )
    assert r.object == "chat.completion" and r.model == tiny_server.model and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert (
        choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    )
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert r.usage.prompt_tokens == prompt_tokens(tiny_server, messages)
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_streamed_chat_equals_the_non_streamed_answer_and_ends_with_usage(tiny_server: RunningServer) -> None:
    client, messages = tiny_server.client(), chat("The quick brown fox")
    whole = client.chat.completions.create(
        model=tiny_server.model, messages=messages, max_tokens=12, **GREEDY
    )
    chunks = list(
        client.chat.completions.create(
            model=tiny_server.model,
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and token_counts(chunks[-1].usage) == token_counts(whole.usage)
    cached_first, cached_second = (
        u.prompt_tokens_details.cached_tokens for u in (whole.usage, chunks[-1].usage)
    )
    assert cached_second >= cached_first, "the second run can only reuse more of the first's blocks"


def test_stream_is_server_sent_events_ending_with_done(tiny_server: RunningServer) -> None:
    body = {"model": tiny_server.model, "prompt": "Hello", "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)


def test_completion_accepts_text_or_token_ids_and_echoes(tiny_server: RunningServer) -> None:
    client, tok = tiny_server.client(), tiny_server.async_engine.tokenizer
    ids = tok.encode("Paris is the capital")
    by_text = client.completions.create(
        model=tiny_server.model, prompt="Paris is the capital", max_tokens=6, **GREEDY
    )
    by_ids = client.completions.create(model=tiny_server.model, prompt=ids, max_tokens=6, **GREEDY)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 6
    echoed = client.completions.create(
        model=tiny_server.model, prompt="Paris is the capital", max_tokens=6, echo=True, **GREEDY
    )
    assert echoed.choices[0].text == "Paris is the capital" + by_text.choices[0].text


def test_streamed_completion_equals_the_non_streamed_one(tiny_server: RunningServer) -> None:
    client = tiny_server.client()
    whole = client.completions.create(
        model=tiny_server.model, prompt="Numbers: 1 2 3", max_tokens=10, **GREEDY
    )
    stream = client.completions.create(
        model=tiny_server.model,
        prompt="Numbers: 1 2 3",
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert token_counts(chunks[-1].usage) == token_counts(whole.usage)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_answer_and_are_never_shown(tiny_server: RunningServer, stream: bool) -> None:
    client, messages = tiny_server.client(), chat("Hello world")
    full = (
        client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=40, **GREEDY)
        .choices[0]
        .message.content
    )
    visible = full.replace("\ufffd", "")
    assert len(visible) >= 8, f"need some text to cut: {full!r}"
    stop = visible[len(visible) // 2 : len(visible) // 2 + 2]
    expected = full[: full.index(stop)]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=tiny_server.model, messages=messages, max_tokens=40, stop=[stop], stream=True, **GREEDY
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][0]
    else:
        r = client.chat.completions.create(
            model=tiny_server.model, messages=messages, max_tokens=40, stop=stop, **GREEDY
        )
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == expected and stop not in text
    assert reason == "stop"


def test_seeded_sampling_is_reproducible(tiny_server: RunningServer) -> None:
    client = tiny_server.client()

    def sample(seed: int) -> str:
        r = client.completions.create(
            model=tiny_server.model,
            prompt="Hello",
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_n_choices_are_indexed_and_counted(tiny_server: RunningServer) -> None:
    r = tiny_server.client().chat.completions.create(
        model=tiny_server.model,
        messages=chat("Hi"),
        n=3,
        max_tokens=5,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    assert r.usage.prompt_tokens == prompt_tokens(tiny_server, chat("Hi"))


def test_chat_logprobs_have_one_entry_per_token_with_sorted_alternatives(tiny_server: RunningServer) -> None:
    r = tiny_server.client().chat.completions.create(
        model=tiny_server.model, messages=chat("Hi"), max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list)
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0])  # greedy: the chosen token is the most likely


def test_streamed_chat_logprobs_match_the_non_streamed_ones(tiny_server: RunningServer) -> None:
    client = tiny_server.client()
    kwargs = {
        "model": tiny_server.model,
        "messages": chat("Hi"),
        "max_tokens": 6,
        "logprobs": True,
        "top_logprobs": 2,
        **GREEDY,
    }
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [
        e
        for c in client.chat.completions.create(stream=True, **kwargs)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]


def test_completion_logprobs_are_parallel_lists(tiny_server: RunningServer) -> None:
    r = tiny_server.client().completions.create(
        model=tiny_server.model, prompt="Hello", max_tokens=5, logprobs=2, **GREEDY
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) <= 2 for top in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)


def test_text_parts_and_max_completion_tokens_are_understood(tiny_server: RunningServer) -> None:
    client = tiny_server.client()
    plain = client.chat.completions.create(
        model=tiny_server.model, messages=chat("Hello world"), max_tokens=5, **GREEDY
    )
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}
    ]
    by_parts = client.chat.completions.create(
        model=tiny_server.model, messages=parts, max_completion_tokens=5, **GREEDY
    )
    assert by_parts.choices[0].message.content == plain.choices[0].message.content
    assert token_counts(by_parts.usage) == token_counts(plain.usage)


def test_a_batch_of_prompts_gives_n_choices_per_prompt(tiny_server: RunningServer) -> None:
    client = tiny_server.client()
    prompts = ["Hello", "Paris is"]
    r = client.completions.create(model=tiny_server.model, prompt=prompts, n=2, max_tokens=4, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = [
        client.completions.create(model=tiny_server.model, prompt=p, max_tokens=4, **GREEDY) for p in prompts
    ]
    assert [c.text for c in r.choices] == [
        s.choices[0].text for s in singles for _ in range(2)
    ]  # greedy: n copies
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert r.usage.completion_tokens == 16
    streamed = list(
        client.completions.create(
            model=tiny_server.model, prompt=prompts, n=2, max_tokens=4, stream=True, **GREEDY
        )
    )
    texts = ["".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(4)]
    assert texts == [c.text for c in r.choices]
