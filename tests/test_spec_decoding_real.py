"""Speculative decoding on SmolLM2-135M-Instruct: greedy tokens identical to plain decoding."""

from __future__ import annotations

import pytest

from nanoserve.engine import LLMEngine
from nanoserve.llm import LLM
from nanoserve.sampling import SamplingParams

pytestmark = pytest.mark.real_model

CODE = "def area(w, h):\n    x = w * h\n    return x\n\n\ndef perimeter(w, h):\n    x = 2 * (w + h)\n    return x\n"
PROMPTS = [
    f"Rewrite this code, renaming the variable x to result. Output only the code.\n\n{CODE}",
    "What are three good habits for staying healthy?",
]


def chat(loaded, text: str) -> list[int]:
    tok = loaded.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def outputs(loaded, prompts, max_tokens: int, **kwargs) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(loaded=loaded, num_blocks=128, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = LLM(engine=engine).generate(prompts, params, use_tqdm=False)
    engine.check_invariants()
    assert engine.stats().num_used_blocks == 0
    return [o.token_ids for o in outs], engine


def test_real_model_ngram_speculation_is_lossless_and_accepts_on_a_copy(smollm2_loaded):
    prompts = [chat(smollm2_loaded, p) for p in PROMPTS]
    plain, _ = outputs(smollm2_loaded, prompts, 48)
    spec, engine = outputs(smollm2_loaded, prompts, 48, speculative="ngram", num_speculative_tokens=4)
    assert spec == plain
    stats = engine.stats().spec_decoding
    assert stats.num_accepted_tokens > 10, f"the copy should be drafted well: {stats}"


def test_real_model_quantized_self_speculation_is_lossless(smollm2_loaded):
    prompts = [chat(smollm2_loaded, PROMPTS[0])]
    plain, _ = outputs(smollm2_loaded, prompts, 10)
    spec, engine = outputs(smollm2_loaded, prompts, 10, speculative="draft", num_speculative_tokens=3, draft_weights="int8")
    assert spec == plain
    stats = engine.stats().spec_decoding
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
