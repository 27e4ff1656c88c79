"""A request's life: its tokens, how many are computed, its outputs and timing.

    WAITING --scheduled--> RUNNING --finished--> FINISHED (stop | length | abort | error)
       ^                      |
       +---- preempted -------+   (blocks freed, num_computed_tokens reset to 0; the
                                   generated tokens are kept and recomputed on resume)

There is no "prefill" or "decode" state: a request has ``num_tokens`` known tokens (prompt
plus outputs) of which ``num_computed_tokens`` already have K/V in the cache. Whenever a
step computes up to ``num_tokens``, the last position's logits give the next token.

Only the scheduler changes a request's progress (``Scheduler.update_from_output``); the
stop conditions it checks after each new token are :func:`stop_reason`'s, in its order.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nanoserve.sampling import SampleResult, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class StopStringMatcher(Protocol):
    """Follows a request's text token by token (``nanoserve.output.TextStream``)."""

    def add(self, token_id: int) -> bool:
        """Take the next token; True if one of the request's stop strings has now appeared."""
        ...


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens (prompt + max_tokens fit the context: checked on add)
    generator: np.random.Generator
    eos_token_ids: frozenset[int] = frozenset()  # end the request unless params.ignore_eos
    text: StopStringMatcher | None = None  # its text, fed each new token by stop_reason
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[SampleResult] = field(default_factory=list)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts proposed for the next step, unverified
    spec_probs: np.ndarray | None = None  # [len(spec_token_ids), V] the drafts' distributions; None: one-hot
    num_draft_tokens: int = 0  # drafts verified so far (speculative decoding)
    num_accepted_tokens: int = 0  # of those, accepted
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
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
        """Tokens ``start .. end-1`` of prompt, then outputs, then drafts awaiting verification."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids + self.spec_token_ids)[start:end]


def stop_reason(request: Request, token_id: int) -> str | None:
    """Why ``request`` ends now that ``token_id`` was appended, or None. Checked in this order:

    1. an EOS token (unless ``ignore_eos``) or one of ``stop_token_ids``  -> "stop"
    2. a stop string has appeared in the text                              -> "stop"
    3. ``max_tokens`` outputs (prompt + max_tokens fit the context)       -> "length"
    """
    params = request.params
    if (token_id in request.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
        return "stop"
    if request.text is not None and request.text.add(token_id):
        return "stop"
    if len(request.output_token_ids) >= request.max_tokens:
        return "length"
    return None
