"""Prefix caching on SmolLM2-135M-Instruct: greedy tokens identical with the cache radix, hash or none."""

from __future__ import annotations

import pytest

from nanoserve.engine import LLMEngine
from nanoserve.sampling import SamplingParams
from tests.test_engine import run_to_completion

pytestmark = pytest.mark.real_model
CACHES = ("none", "radix", "hash")
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SYSTEM = "You are a concise assistant. Answer in one short sentence, and never use lists or headings."


def conversation(loaded, prefix_cache: str) -> tuple[list[list[int]], list[int]]:
    """Three turns of one chat: each prompt holds the earlier turns and their answers."""
    engine = LLMEngine(loaded=loaded, prefix_cache=prefix_cache, num_blocks=64)
    messages = [{"role": "system", "content": SYSTEM}]
    answers, cached = [], []
    for question in ("What is the capital of France?", "And of Italy?", "Which of the two is larger?"):
        messages.append({"role": "user", "content": question})
        rid = engine.add_request(loaded.tokenizer.apply_chat_template(messages), GREEDY)
        out = run_to_completion(engine)[rid]
        answers.append(out.token_ids)
        cached.append(out.num_cached_tokens)
        messages.append({"role": "assistant", "content": out.text})
    assert engine.stats().num_used_blocks == 0
    return answers, cached


def test_real_model_multi_turn_chat_is_unchanged_by_the_prefix_cache(smollm2_loaded):
    runs = {cache: conversation(smollm2_loaded, cache) for cache in CACHES}
    assert runs["radix"][0] == runs["none"][0] == runs["hash"][0]
    for cache in ("radix", "hash"):
        assert runs[cache][1][0] == 0 and all(c > 16 for c in runs[cache][1][1:]), runs[cache][1]


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 1, 0, 2)])
def test_real_model_shared_prefix_batch_with_chunks_and_preemption_is_unchanged(smollm2_loaded, order):
    """A shared system prompt; a 16-token budget chunks every prefill; 6 blocks force preemption."""
    questions = ["Name a red fruit.", "Name a planet.", "Name a metal.", "What is 2 + 2?"]
    prompts = [
        smollm2_loaded.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        for q in questions
    ]
    results = {}
    for cache in CACHES:
        engine = LLMEngine(loaded=smollm2_loaded, prefix_cache=cache, num_blocks=6, max_num_batched_tokens=16, max_num_seqs=4)
        ids = {i: engine.add_request(prompts[i], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)) for i in order}
        final = run_to_completion(engine)
        stats = engine.stats()
        assert stats.num_preemptions > 0 and stats.num_used_blocks == 0
        results[cache] = ([final[ids[i]].token_ids for i in range(4)], stats.prefix_cache.num_hit_tokens)
    assert results["radix"][0] == results["none"][0] == results["hash"][0]
    assert results["radix"][1] > 0 and results["hash"][1] > 0
