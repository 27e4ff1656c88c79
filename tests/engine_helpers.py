"""Running an engine to the end in tests, with the logits of every step kept for comparison."""

from __future__ import annotations

import numpy as np

from nanoserve.engine import LLMEngine
from nanoserve.llm import LLM
from nanoserve.sampling import SamplingParams


def greedy_tokens_and_logits(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy token ids of each prompt (EOS ignored), and the logits [R, V] of every step in order."""
    logits_seen: list[np.ndarray] = []
    execute = engine.runner.execute

    def recording_execute(batch):
        logits = execute(batch)
        logits_seen.append(logits.copy())
        return logits

    engine.runner.execute = recording_execute
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = LLM(engine=engine).generate(prompts, params, use_tqdm=False)
    return [out.token_ids for out in outs], logits_seen
