"""Speculative decoding: guess several tokens cheaply, check them all in one forward pass.

One decode step reads every weight once whether it computes one token or k + 1, so a
step that verifies k guessed tokens costs little more than a step that makes one. When
the guesses are right, one step commits several tokens; when they are wrong, the step
still commits one, exactly the token plain decoding would have produced.

    step N      the request has sampled token t; a proposer guesses d1 .. dk after it
    step N + 1  the chunk [t, d1, .. dk] runs through the same paged attention as any
                other chunk, in a batch mixed with other decodes and prefills; its k + 1
                logits rows are the target model's distributions after t, d1, .. dk
                the rejection sampler accepts a prefix d1 .. da and adds one more token:
                the correction at the first rejected draft, or a bonus after the last
                the scheduler rolls back the K/V of the k - a rejected positions

The parts, one module each:

    ngram.py      proposer: tokens that followed the same n-gram earlier (prompt lookup)
    draft.py      proposer: a second, cheaper model with its own paged KV cache
    rejection.py  the rejection sampler: greedy and random, lossless in both
    policy.py     how many tokens to propose per request: off when it cannot pay
    speculator.py the engine's side: propose after each step, count what was accepted

The engine turns it on with ``EngineConfig.speculative = "ngram" | "draft"``.
"""

from __future__ import annotations

from typing import Any

from nanoserve.config import EngineConfig
from nanoserve.errors import ConfigError
from nanoserve.model.llama import LlamaModel
from nanoserve.model.loader import LoadedModel, load_checkpoint
from nanoserve.spec.draft import DraftModelProposer
from nanoserve.spec.ngram import NgramProposer
from nanoserve.spec.policy import SpeculationPolicy
from nanoserve.spec.rejection import RejectionSampler
from nanoserve.spec.speculator import Proposer, Speculator

__all__ = ["RejectionSampler", "Speculator", "build_speculator"]


def build_speculator(
    config: EngineConfig, target: LoadedModel, backend: Any, sampler: Any, num_blocks: int, max_model_len: int
) -> tuple[RejectionSampler, Speculator]:
    """The engine's sampler and speculator for ``config.speculative`` ("ngram" or "draft")."""
    proposer: Proposer
    if config.speculative == "ngram":
        proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    else:
        draft = load_checkpoint(config.draft_model or config.model, config.draft_weights)
        if draft.config.vocab_size != target.config.vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                f"({target.config.vocab_size}); give a --draft-model with the same tokenizer"
            )
        model = LlamaModel(draft.config, draft.weights, backend)
        proposer = DraftModelProposer(model, num_blocks, config.block_size, backend, config.kv_cache_dtype)
    policy = SpeculationPolicy(config.num_speculative_tokens)
    return RejectionSampler(sampler, backend.kernels), Speculator(proposer, policy, max_model_len)
