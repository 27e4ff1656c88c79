"""The offline API: ``LLM.generate`` and ``LLM.chat``, in the shape of vLLM's ``LLM``.

A thin loop over :class:`~nanoserve.engine.LLMEngine`: add every prompt, step until all
have finished, return the final outputs in prompt order.

Threads: ``LLMEngine`` is not thread-safe (one engine, one thread: the server runs it on a
thread of its own). ``LLM`` serialises its calls with a lock, so ``generate`` from several
threads on one ``LLM`` runs them one after another and each gets its own correct outputs.
A call that fails, or is interrupted, aborts the requests it added: nothing is left queued.

BLAS threads: building an ``LLM`` applies the thread policy to the process
(:func:`nanoserve.threads.apply` with ``EngineConfig.threads``; None = the policy's default),
as every CLI command does.
"""

from __future__ import annotations

import threading
from typing import Any

from nanoserve import threads
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
        """Build the engine from ``model`` and ``engine_kwargs`` (EngineConfig's fields), or use ``engine``.

        Applies the engine config's ``threads`` first, so a bad value (ConfigError) fails
        before the model loads.
        """
        config = engine.config if engine is not None else EngineConfig(model=model, **engine_kwargs)
        self.threads = threads.apply(config.threads)  # the line describing the setting
        self.engine = engine or LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._lock = threading.Lock()  # one generate() at a time on this engine

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run all prompts as one continuously batched workload; outputs in prompt order.

        ``prompts``: a string, a list of token ids, or a list of either. Raises RequestError
        (naming the bad prompt or parameter) before anything runs; if a later prompt is bad,
        the ones already added are aborted.
        """
        prompts = _as_prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        with self._lock:
            ids: list[str] = []
            try:
                for p, sp in zip(prompts, params):
                    ids.append(self.engine.add_request(p, sp))
                return self._run(ids, use_tqdm)
            except BaseException:  # a bad prompt, a failure or Ctrl-C: take back what this call added
                for request_id in ids:
                    self.engine.abort(request_id)
                raise

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request in ``ids`` has finished; other requests' outputs are ignored."""
        mine, final = set(ids), {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while len(final) < len(ids) and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id in mine:
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


def _as_prompt_list(prompts: Any) -> list[str | list[int]]:
    """One prompt or a list of them -> a list; a clear error for anything else."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        return list(prompts)
    raise RequestError(
        f"prompts must be a string, a list of token ids, or a list of strings or token-id lists; "
        f"got {type(prompts).__name__}"
    )
