"""nanoserve on SmolLM2-135M-Instruct against HF transformers loading the same GGUF file.

transformers dequantizes the GGUF to float32 and runs its own Llama; its logits are the
reference. Tolerance: max |logit difference| <= 2e-3 at the last position, and 32-token
greedy continuations identical token for token.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

LONG_TEXT = " ".join(
    [
        "The history of computing is a story of abstraction layered on abstraction.",
        "Early machines were programmed by rewiring panels; later, stored programs let",
        "software change without touching hardware. Compilers turned readable languages",
        "into machine code, operating systems shared one machine among many users, and",
        "networks joined machines into systems larger than any one of them.",
    ]
    * 5
)

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    LONG_TEXT,  # a few hundred tokens
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three primary colors. \u00e9t\u00e9 \U0001f600"}],
]


@pytest.fixture(scope="module")
def hf_model(smollm2_path: str):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
    )
    model.eval()
    return model


@pytest.fixture(scope="module")
def prompts(smollm2_loaded) -> list[list[int]]:
    tok = smollm2_loaded.tokenizer
    ids = [tok.encode(p) for p in RAW_PROMPTS]
    ids += [tok.encode(tok.apply_chat_template(m)) for m in CHAT_PROMPTS]
    assert max(len(i) for i in ids) > 200, "the set must include a prompt of a few hundred tokens"
    return ids


def hf_last_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def test_last_position_logits_match_transformers(hf_model, smollm2_loaded, prompts):
    from nanoserve.cache.contiguous import ContiguousKVCache
    from nanoserve.kernels import get_backend
    from nanoserve.model import LlamaModel

    backend = get_backend("ref")
    model = LlamaModel(smollm2_loaded.config, smollm2_loaded.weights, backend)
    for ids in prompts:
        cache = ContiguousKVCache(smollm2_loaded.config, len(ids), backend)
        positions = np.arange(len(ids))
        cache.set_positions(positions)
        hidden = model.forward(np.asarray(ids), positions, cache)
        ours = model.compute_logits(hidden[-1:])[0]
        ref = hf_last_logits(hf_model, ids)
        diff = float(np.abs(ours - ref).max())
        assert diff <= 2e-3, f"prompt of {len(ids)} tokens: max |logit diff| = {diff}"


def test_greedy_continuations_match_transformers_token_for_token(hf_model, smollm2_loaded, prompts):
    from nanoserve.engine import LLMEngine
    from tests.engine_helpers import greedy_tokens_and_logits

    engine = LLMEngine(loaded=smollm2_loaded, num_blocks=256, block_size=16, max_num_batched_tokens=256)
    tokens, _ = greedy_tokens_and_logits(engine, prompts, max_tokens=32)
    for got, prompt in zip(tokens, prompts):
        assert got == hf_greedy(hf_model, prompt, 32)


def hf_greedy(model, ids: list[int], num_tokens: int) -> list[int]:
    """Plain argmax decoding with transformers' KV cache, no logits processors (EOS not special)."""
    out: list[int] = []
    with torch.no_grad():
        step = model(torch.tensor([ids]), use_cache=True)
        for _ in range(num_tokens):
            token = int(step.logits[0, -1].argmax())
            out.append(token)
            step = model(torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True)
    return out
