"""The server with speculative decoding: several tokens per streamed chunk, exact usage, and
vLLM's speculative-decoding counters on /metrics."""

from __future__ import annotations

import pytest

from tests.server.conftest import serve_tiny

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]
BODY = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir: str):
    """A perfect draft (the target model itself): every step commits up to k + 1 = 5 tokens."""
    engine = {"speculative": "draft", "draft_model": tiny_model_dir, "draft_weights": "fp32", "num_speculative_tokens": 4}
    with serve_tiny(tiny_model_dir, engine_kwargs=engine) as server:
        yield server


def test_streamed_chunks_carry_several_tokens_and_usage_is_exact(spec_server, idle_server):
    plain = idle_server.client().completions.create(model=idle_server.model, **BODY)
    client = spec_server.client()
    chunks = list(client.completions.create(model=spec_server.model, stream=True, stream_options={"include_usage": True}, **BODY))
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    usage = chunks[-1].usage
    assert "".join(c.choices[0].text for c in text_chunks) == plain.choices[0].text
    assert (usage.prompt_tokens, usage.completion_tokens) == (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (len(PROMPT), 30)
    assert len(text_chunks) < 30 / 2, f"{len(text_chunks)} chunks for 30 tokens: speculation did not batch tokens"
    full = client.completions.create(model=spec_server.model, **BODY)
    assert full.choices[0].text == plain.choices[0].text and full.usage.completion_tokens == 30
    spec_server.wait_until_idle()
    spec_server.check_invariants()


def test_speculative_counters_are_on_metrics(spec_server):
    spec_server.client().completions.create(model=spec_server.model, **BODY)
    m = spec_server.wait_until_idle()
    drafts, accepted = m["nanoserve_spec_decode_num_draft_tokens_total"], m["nanoserve_spec_decode_num_accepted_tokens_total"]
    assert m["nanoserve_spec_decode_num_drafts_total"] > 0
    assert accepted == drafts > 0  # a perfect draft
    per_pos = [v for k, v in m.items() if k.startswith("nanoserve_spec_decode_num_accepted_tokens_per_pos_total{")]
    assert len(per_pos) == 4 and sum(per_pos) == accepted
