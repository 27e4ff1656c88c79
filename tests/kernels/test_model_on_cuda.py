"""End to end on the ``cuda`` backend: the tiny model's engine gives the ``ref`` backend's answer.

Without a GPU this runs every kernel of a forward pass (paged attention, store_kv,
rms_norm, rope, linear, silu_mul) under Numba's CUDA simulator: slow, so the model is
tiny and the run is a short prefill and a few decode steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanoserve.engine import LLMEngine
from nanoserve.model import load_checkpoint
from tests.engine_helpers import greedy_tokens_and_logits
from tests.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def smallest_loaded(tmp_path_factory):
    """One layer, hidden 32, GQA 2:1: enough to run every kernel of a forward pass."""
    path = make_tiny_model(
        str(tmp_path_factory.mktemp("smallest")), num_hidden_layers=1, hidden_size=32, intermediate_size=64,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    return load_checkpoint(path)


def greedy_run(loaded, backend: str) -> tuple[list[list[int]], list[np.ndarray]]:
    engine = LLMEngine(loaded=loaded, backend=backend, num_blocks=16, block_size=4)
    return greedy_tokens_and_logits(engine, [[5, 9, 13], [11, 4]], max_tokens=2)


def test_tiny_model_decodes_the_same_on_cuda_as_on_ref(smallest_loaded):
    ref_tokens, ref_logits = greedy_run(smallest_loaded, "ref")
    cuda_tokens, cuda_logits = greedy_run(smallest_loaded, "cuda")
    assert cuda_tokens == ref_tokens
    assert len(cuda_logits) == len(ref_logits)
    for got, want in zip(cuda_logits, ref_logits):
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
