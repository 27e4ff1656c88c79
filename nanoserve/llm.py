"""The offline API: ``LLM.generate`` and ``LLM.chat``, in the shape of vLLM's ``LLM``.

A thin loop over :class:`~nanoserve.engine.LLMEngine`: add every prompt, step until all
have finished, return the final outputs in prompt order.
"""

from __future__ import annotations

from typing import Any

from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.errors import RequestError
from nanoserve.output import RequestOutput
from nanoserve.sampling import SamplingParams


class LLM:
    """Offline batched generation, in the shape of vLLM's ``LLM``.

    >>> llm = LLM()                                   # SmolLM2-135M-Instruct on the cpu backend
    >>> outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
    >>> outs[0].text, outs[0].finish_reason, outs[0].time_to_first_token
    """

    def __init__(self, model: str | None = None, engine: LLMEngine | None = None, **engine_kwargs: Any) -> None:
        self.engine = engine or LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run all prompts as one continuously batched workload; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while len(final) < len(ids) and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [final[i] for i in ids]

    def chat(
        self, conversations: list[dict[str, Any]] | list[list[dict[str, Any]]], sampling_params: SamplingParams | None = None, use_tqdm: bool = False
    ) -> list[RequestOutput]:
        """Apply the chat template to each conversation and generate."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.tokenizer.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
