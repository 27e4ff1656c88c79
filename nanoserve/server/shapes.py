"""One HTTP request's engine requests (a ``Job``), and how its outputs look in OpenAI's bodies.

    Job              choice i of prompt p is engine request p * n + i; usage is counted per prompt
    ChatShape        chat choices: a ``message`` each; streamed, a role chunk, then ``delta`` chunks
    CompletionShape  completion choices: a ``text`` each (after the prompt's, with ``echo``)
    response()       the non-streamed body of either endpoint

The streamed body is built by ``app._events`` from the same shapes, so the two endpoints share
one path for JSON and one for Server-Sent Events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from nanoserve.output import RequestOutput
from nanoserve.sampling import SampleResult
from nanoserve.server import protocol as proto
from nanoserve.server.async_engine import OutputStream
from nanoserve.server.protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class Job:
    """One HTTP request's engine requests: choice ``i`` of prompt ``p`` is request ``ids[p * n + i]``."""

    id: str
    created: int
    model: str
    stream: OutputStream
    choice_of: dict[str, int]  # engine request id -> choice index
    prompts: list[list[int]]  # token ids of each prompt
    prompt_texts: list[str]  # text of each prompt (for echo)
    n: int

    @property
    def num_choices(self) -> int:
        return len(self.choice_of)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    def num_cached_tokens(self, cached: dict[int, int]) -> int:
        """Prompt tokens served from the prefix cache, counted once per prompt like ``num_prompt_tokens``.

        ``cached`` maps a choice index to its ``RequestOutput.num_cached_tokens``. A prompt's
        count is the least over its choices: the tokens that none of them computed.
        """
        return sum(
            min(cached.get(p * self.n + i, 0) for i in range(self.n)) for p in range(len(self.prompts))
        )

    def prompt_text(self, choice: int) -> str:
        """The text of the prompt that choice ``choice`` continues."""
        return self.prompt_texts[choice // self.n]


Choice = dict[str, Any]


def _choice(
    index: int, content: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None
) -> Choice:
    """One entry of ``choices``; ``content`` is the endpoint's part (``message``, ``delta`` or ``text``)."""
    return {"index": index, **content, "logprobs": logprobs, "finish_reason": finish_reason}


@dataclass
class Shape:
    """How one request's choices look: whole in a JSON response (``choice``), or streamed as
    ``opening`` chunks and then one ``chunk_choice`` per output. One subclass per endpoint."""

    req: Any  # the endpoint's request model
    job: Job
    token_text: proto.TokenText
    object_name: ClassVar[str]  # of the JSON response
    chunk_object_name: ClassVar[str]  # of each streamed chunk


class ChatShape(Shape):
    """Chat choices: a ``message`` each; streamed, a role chunk each, then ``delta`` chunks."""

    req: ChatCompletionRequest
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def choice(self, index: int, out: RequestOutput) -> Choice:
        logprobs = proto.chat_logprobs(out.logprobs, self.token_text) if self.req.logprobs else None
        message = {"role": "assistant", "content": out.text}
        return _choice(index, {"message": message}, logprobs, proto.finish_reason(out))

    def opening(self) -> list[Choice]:
        """The chunks' choices sent before any output: each choice's role."""
        return [
            _choice(i, {"delta": {"role": "assistant", "content": ""}}) for i in range(self.job.num_choices)
        ]

    def chunk_choice(self, index: int, out: RequestOutput, new_logprobs: list[SampleResult]) -> Choice:
        logprobs = proto.chat_logprobs(new_logprobs, self.token_text) if new_logprobs else None
        delta = {"content": out.delta} if out.delta or not out.finished else {}
        return _choice(index, {"delta": delta}, logprobs, proto.finish_reason(out))


class CompletionShape(Shape):
    """Completion choices: a ``text`` each (after the prompt's, with ``echo``); streamed, ``text`` chunks."""

    req: CompletionRequest
    object_name = chunk_object_name = "text_completion"

    def __init__(self, req: CompletionRequest, job: Job, token_text: proto.TokenText) -> None:
        super().__init__(req, job, token_text)
        self.text_offset = [0] * job.num_choices  # characters of token text streamed, per choice

    def choice(self, index: int, out: RequestOutput) -> Choice:
        prefix = self.job.prompt_text(index) if self.req.echo else ""
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = proto.completion_logprobs(out.logprobs, self.token_text)
        return _choice(index, {"text": prefix + out.text}, logprobs, proto.finish_reason(out))

    def opening(self) -> list[Choice]:
        """The chunks' choices sent before any output: with ``echo``, each choice's prompt."""
        if not self.req.echo:
            return []
        return [_choice(i, {"text": self.job.prompt_text(i)}) for i in range(self.job.num_choices)]

    def chunk_choice(self, index: int, out: RequestOutput, new_logprobs: list[SampleResult]) -> Choice:
        logprobs = None
        if new_logprobs:
            logprobs = proto.completion_logprobs(new_logprobs, self.token_text, self.text_offset[index])
            self.text_offset[index] += sum(len(t) for t in logprobs["tokens"])
        return _choice(index, {"text": out.delta}, logprobs, proto.finish_reason(out))


def response(shape: ChatShape | CompletionShape, finals: dict[str, RequestOutput]) -> dict[str, Any]:
    """The non-streamed body: every choice, in index order, and exact usage."""
    job = shape.job
    choices = [shape.choice(job.choice_of[request_id], out) for request_id, out in finals.items()]
    choices.sort(key=lambda c: c["index"])
    completion_tokens = sum(len(out.token_ids) for out in finals.values())
    cached = {job.choice_of[request_id]: out.num_cached_tokens for request_id, out in finals.items()}
    return {
        "id": job.id,
        "object": shape.object_name,
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": proto.usage(job.num_prompt_tokens, completion_tokens, job.num_cached_tokens(cached)),
    }
