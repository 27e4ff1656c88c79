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

The engine turns it on with ``EngineConfig.speculative = "ngram" | "draft"``. Two settings
swap the parts (lab 07 plugs in through them, and nanoserve builds its own the same way):

    proposer   = "student.py:NgramProposer"   the ``proposer`` seam (nanoserve.components):
                                              built with the method's arguments; default:
                                              the registered class --speculative names
    acceptance = "student.py"                 a file or module whose accept_greedy and
                                              accept_random the RejectionSampler calls;
                                              default: rejection.py's
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from nanoserve import components
from nanoserve.config import SPECULATIVE_METHODS, EngineConfig
from nanoserve.errors import ComponentError, ConfigError
from nanoserve.model.llama import LlamaModel
from nanoserve.model.loader import LoadedModel, load_checkpoint
from nanoserve.pyfile import load_file
from nanoserve.spec import rejection
from nanoserve.spec.policy import SpeculationPolicy
from nanoserve.spec.rejection import RejectionSampler
from nanoserve.spec.speculator import Speculator

__all__ = ["RejectionSampler", "Speculator", "acceptance_rules", "build_speculator"]


def build_speculator(
    config: EngineConfig, target: LoadedModel, backend: Any, sampler: Any, num_blocks: int, max_model_len: int
) -> tuple[RejectionSampler, Speculator]:
    """The engine's sampler and speculator for ``config.speculative`` ("ngram" or "draft"),
    with ``config.proposer`` (default: the method's own class) and ``config.acceptance``."""
    name = config.proposer or config.speculative
    if name in SPECULATIVE_METHODS and name != config.speculative:
        raise ConfigError(f"proposer {name!r} is another --speculative method; give FILE.py:NAME or leave it unset")
    args: tuple[Any, ...]
    if config.speculative == "ngram":
        args = (config.prompt_lookup_min, config.prompt_lookup_max)
    else:
        draft = load_checkpoint(config.draft_model or config.model, config.draft_weights)
        if draft.config.vocab_size != target.config.vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                f"({target.config.vocab_size}); give a --draft-model with the same tokenizer"
            )
        model = LlamaModel(draft.config, draft.weights, backend)
        args = (model, num_blocks, config.block_size, backend, config.kv_cache_dtype)
    proposer = components.build("proposer", name, *args)
    policy = SpeculationPolicy(config.num_speculative_tokens, draft_cost=config.spec_draft_cost)
    accept_greedy, accept_random = acceptance_rules(config.acceptance)
    return RejectionSampler(sampler, backend.kernels, accept_greedy, accept_random), Speculator(proposer, policy, max_model_len)


def acceptance_rules(name: str) -> tuple[Callable[..., list[int]], Callable[..., list[int]]]:
    """``accept_greedy`` and ``accept_random`` of ``name``: "default" (:mod:`~nanoserve.spec.rejection`),
    a ``FILE.py`` or an importable module defining both."""
    if name == "default":
        module: Any = rejection
    elif name.endswith(".py"):
        try:
            module = load_file(name, "nanoserve_acceptance")
        except FileNotFoundError:
            module = None
        if module is None:
            raise ComponentError(f"acceptance {name!r}: no such Python file")
    else:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ComponentError(f"acceptance {name!r}: cannot import it ({exc}); give default, FILE.py or a module") from exc
    rules = tuple(getattr(module, fn, None) for fn in ("accept_greedy", "accept_random"))
    missing = [fn for fn, rule in zip(("accept_greedy", "accept_random"), rules) if not callable(rule)]
    if missing:
        raise ComponentError(f"acceptance {name!r} defines no function {', '.join(missing)}")
    return rules  # type: ignore[return-value]
