"""The draft-model proposer: a second, cheaper model guesses, the target model checks.

The draft model is any Llama-family model with the target's vocabulary; the case built
for is the target's own file with quantized weights ("quantized self-speculation", e.g.
``--speculative draft --draft-weights int8``). It runs inside the same engine, on the
same kernels, with a paged KV cache of its own:

    propose(requests, k)        for each request, the draft has K/V for some prefix of its
                                known tokens (``_DraftSeq.num_computed_tokens``)
      step 0                    one ragged chunk per request: the known tokens it lacks
                                (a whole prompt the first time, 1 or 2 tokens afterwards)
                                -> logits of the last position -> draft token 1
      steps 1 .. k-1            one token per request still drafting -> draft tokens 2 .. k

Rollback is a comparison, not a hook: before drafting, the draft keeps the K/V of the
longest common prefix of what it computed and the request's known tokens, and drops the
rest. Rejected drafts are therefore forgotten here too, and so is anything a preemption
or a prefix-cache hit did to the target. The draft's pool is as large as the target's;
when it is full, a request simply gets no drafts.

Drafts follow the request's sampling: argmax for greedy requests (q one-hot), otherwise a
draw from the draft's distribution after the request's temperature, top-k, top-p and
min-p, whose rows are returned as q for the rejection sampler. Logits processors and
penalties are not applied to the draft: any q keeps the output exact, a closer one only
raises acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoserve.cache.block_pool import BlockPool
from nanoserve.cache.kv_cache_manager import KVCacheManager
from nanoserve.cache.paged import PagedKVCache
from nanoserve.interfaces import ScheduledBatch
from nanoserve.model.llama import LlamaModel
from nanoserve.model_runner import ModelRunner
from nanoserve.request import Request
from nanoserve.sampling import draw, probabilities
from nanoserve.spec.ngram import Draft


@dataclass
class _DraftSeq:
    """The draft model's view of one request: the tokens it has fed, and how many have K/V."""

    request_id: str
    generator: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]

    def sync(self, known: list[int]) -> None:
        """Take the request's known tokens; keep K/V only for the prefix both agree on."""
        n = min(self.num_computed_tokens, len(known))
        same = 0
        while same < n and self.tokens[same] == known[same]:
            same += 1
        self.num_computed_tokens = same
        self.tokens = list(known)


class DraftModelProposer:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, backend: Any, kv_cache_dtype: str) -> None:
        self.model = model
        self.cache = PagedKVCache(model.config, num_blocks, block_size, backend, kv_cache_dtype)
        self.kv = KVCacheManager(BlockPool(num_blocks), block_size)
        self.runner = ModelRunner(model, self.cache, self.kv)
        self.kernels = backend.kernels
        self.seqs: dict[str, _DraftSeq] = {}

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[Draft]:
        """Up to ``num_tokens[i]`` drafts for ``requests[i]``, from at most max(num_tokens) draft steps."""
        tokens: list[list[int]] = [[] for _ in requests]
        probs: list[list[np.ndarray]] = [[] for _ in requests]
        active: list[int] = []
        for i, request in enumerate(requests):
            seq = self.seqs.get(request.request_id)
            if seq is None:  # the draft's own random stream, derived from the request's seed
                seq = self.seqs[request.request_id] = _DraftSeq(request.request_id, request.generator.spawn(1)[0])
            seq.sync(request.token_ids(0, request.num_tokens))
            if num_tokens[i] > 0:
                active.append(i)
        while active:
            batch = ScheduledBatch()
            for i in list(active):
                seq = self.seqs[requests[i].request_id]
                if seq.num_computed_tokens == len(seq.tokens):  # all known: recompute the last for its logits
                    seq.num_computed_tokens -= 1
                n = len(seq.tokens) - seq.num_computed_tokens
                if not self.kv.allocate_slots(seq, n):  # type: ignore[arg-type]  (the draft pool is full)
                    active.remove(i)
                    continue
                batch.requests.append(seq)  # type: ignore[arg-type]
                batch.num_new_tokens.append(n)
                batch.num_logits.append(1)
            if not batch.requests:
                break
            logits = self.runner.execute(batch)  # [len(active), V]
            for row, i in enumerate(active):
                seq, params = self.seqs[requests[i].request_id], requests[i].params
                seq.num_computed_tokens = len(seq.tokens)
                if params.greedy:
                    token = int(np.argmax(logits[row]))
                else:
                    q = probabilities(logits[row : row + 1], [params], self.kernels)[0]  # [V]
                    token = draw(q, seq.generator)
                    probs[i].append(q)
                seq.tokens.append(token)
                tokens[i].append(token)
            active = [i for i in active if len(tokens[i]) < num_tokens[i]]
        return [Draft(t, np.stack(p) if p else None) for t, p in zip(tokens, probs)]

    def finish(self, request: Request) -> None:
        """Free the draft's blocks for ``request``."""
        seq = self.seqs.pop(request.request_id, None)
        if seq is not None:
            self.kv.free(seq)  # type: ignore[arg-type]
