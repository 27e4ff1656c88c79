"""A request's life: its tokens, how many are computed, its outputs and timing.

    WAITING --scheduled--> RUNNING --finished--> FINISHED (stop | length | abort | error)
       ^                      |
       +---- preempted -------+   (blocks freed, num_computed_tokens reset to 0; the
                                   generated tokens are kept and recomputed on resume)

There is no "prefill" or "decode" state: a request has ``num_tokens`` known tokens (prompt
plus outputs) of which ``num_computed_tokens`` already have K/V in the cache. Whenever a
step computes up to ``num_tokens``, the last position's logits give the next token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from nanoserve.sampling import SampleResult, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, clipped to the context that is left
    generator: np.random.Generator
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[SampleResult] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Known tokens ``start .. end-1`` (prompt then outputs)."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]
