"""What a request gives back: its text as it grows, without ever showing a stop string.

    RequestOutput   the state of one request after a step (``delta``: this step's part)
    TextStream      one request's detokenizer and stop-string holdback

Stop strings never reach the user: text is released only once no stop string could still
start inside it (the last ``len(longest stop) - 1`` characters are held back), and the final
text is cut where the stop string begins. The incremental detokenizer itself holds back a
broken UTF-8 tail (:class:`nanoserve.tokenizer.IncrementalDetokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoserve.request import Request
from nanoserve.sampling import SampleResult
from nanoserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class RequestOutput:
    """The state of one request after a step. ``delta``/``new_token_ids`` are this step's part."""

    request_id: str
    prompt_token_ids: list[int]
    text: str  # all output text released so far
    delta: str
    token_ids: list[int]
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[SampleResult] = field(default_factory=list)  # all, if requested
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    num_draft_tokens: int = 0  # speculative drafts verified for this request
    num_accepted_tokens: int = 0  # of those, accepted
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        n = len(self.token_ids)
        if self.finish_time is None or self.first_token_time is None or n < 2:
            return None
        return (self.finish_time - self.first_token_time) / (n - 1)


class TextStream:
    """One request's text: the incremental detokenizer, stop strings, and what is released.

    ``add`` takes each new token (the scheduler calls it through ``request.text``);
    ``release`` gives out the text no stop string can still start in.
    """

    def __init__(self, tokenizer: Tokenizer, request: Request) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        self.stops = request.params.stop
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.released = 0  # characters of detok.text already given out
        self.cut: int | None = None  # where a stop string starts, once found

    def add(self, token_id: int) -> bool:
        """Feed a token; True if a stop string has now appeared."""
        self.detok.add(token_id)
        text = self.detok.text
        window = max(0, self.released - self.holdback)
        hits = [i for i in (text.find(s, window) for s in self.stops) if i >= 0]
        if hits:
            self.cut = min(hits)
        return self.cut is not None

    def release(self, finished: bool) -> tuple[str, str]:
        """``(all released text, newly released delta)``."""
        if finished and self.cut is None:
            self.detok.flush()
        text = self.detok.text
        end = self.cut if self.cut is not None else len(text) if finished else max(self.released, len(text) - self.holdback)
        delta = text[self.released : end]
        self.released = max(self.released, end)
        return text[: self.released], delta


def make_output(request: Request, text: str, delta: str, new_token_ids: list[int]) -> RequestOutput:
    """The output of ``request`` now (finished once the request is)."""
    return RequestOutput(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        text=text,
        delta=delta,
        token_ids=list(request.output_token_ids),
        new_token_ids=new_token_ids,
        finished=request.is_finished,
        finish_reason=request.finish_reason,
        error=request.error,
        logprobs=list(request.output_logprobs),
        num_preemptions=request.num_preemptions,
        num_cached_tokens=request.num_cached_tokens,
        num_draft_tokens=request.num_draft_tokens,
        num_accepted_tokens=request.num_accepted_tokens,
        arrival_time=request.arrival_time,
        first_token_time=request.first_token_time,
        finish_time=request.finish_time,
    )
