"""The OpenAI API's shapes: request models that validate, error bodies, response objects.

Requests are parsed strictly (``"0.5"`` is not a number, ``true`` is not an integer) and
every rejection becomes an :class:`APIError` whose ``param`` names the offending field, so
a client always learns *which* field was wrong and why:

    {"error": {"message": "temperature: Input should be less than or equal to 2 (got 5)",
               "type": "invalid_request_error", "param": "temperature", "code": null}}

Unknown fields are ignored (clients send many optional ones); known but unsupported
features with a non-default value (``tools``, ``logit_bias``) are refused.

Structured output (:mod:`nanoserve.structured`), on both endpoints: OpenAI's
``response_format`` (``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
{"name": ..., "schema": {...}}}``) and vLLM's ``guided_regex``, ``guided_choice`` and
``guided_json``, at most one of them. A constraint nanoserve cannot enforce is a 400 whose
``param`` is the field the client sent (an invalid regex, an unsupported schema keyword,
a constraint nothing satisfies, one that cannot finish within ``max_tokens``); a request
is never answered unconstrained instead. The penalties
are OpenAI's ``presence_penalty`` and ``frequency_penalty`` (each in [-2, 2]) and vLLM's
``repetition_penalty`` extension ([0.01, 100], 1 = off), with vLLM's semantics
(:mod:`nanoserve.sampling`).
This module knows nothing of HTTP routing or of the engine thread: it maps JSON to
:class:`SamplingParams` and engine outputs back to JSON-ready dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nanoserve.errors import InvalidSamplingParams, NanoserveError
from nanoserve.output import RequestOutput
from nanoserve.sampling import (
    GREEDY_BELOW,
    MAX_PENALTY,
    REPETITION_PENALTY_RANGE,
    SampleResult,
    SamplingParams,
)
from nanoserve.tokenizer import Tokenizer, token_bytes

MAX_CHOICES = 16  # n (times the number of prompts) per request
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20
UNION_TAGS = (
    "str",
    "int",
    "float",
    "bool",
    "list",
    "dict",
    "none",
)  # type names pydantic puts in error locations


class APIError(NanoserveError):
    """An error answered to the client in OpenAI's shape, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# --- requests ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # a string, or a list of {"type": "text", "text": ...} parts
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: Any) -> str:
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for i, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        f'part [{i}] must be {{"type": "text", "text": "..."}}; only text content is supported'
                    )
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")

    def as_template_dict(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content}


class _SamplingFields(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # extension (vLLM): 0 or -1 = off
    min_p: float | None = Field(None, ge=0, le=1)  # extension (vLLM)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Any = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool | None = None  # extension (vLLM)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(  # extension (vLLM): 1 = off
        None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None  # OpenAI's: text, json_object or json_schema
    guided_regex: str | None = None  # extension (vLLM): the output fully matches this regex
    guided_choice: list[str] | None = None  # extension (vLLM): the output is one of these strings
    guided_json: Any = None  # extension (vLLM): a JSON schema (an object, or its JSON text)

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        if fmt is None:
            return None
        kind = fmt.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError('type must be "text", "json_object" or "json_schema"')
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise ValueError('json_schema must be an object {"name": ..., "schema": {...}}')
        return fmt

    @model_validator(mode="after")
    def _one_constraint(self) -> _SamplingFields:
        given = [name for name, value in self.constraint_fields().items() if value is not None]
        if len(given) > 1:
            raise APIError(400, f"{given[1]}: give at most one of {', '.join(given)}", param=given[1])
        return self

    def constraint_fields(self) -> dict[str, Any]:
        """Each structured-output field the client sent, None where absent (``text`` is absent)."""
        fmt = self.response_format
        return {
            "response_format": None if fmt is None or fmt.get("type", "text") == "text" else fmt,
            "guided_regex": self.guided_regex,
            "guided_choice": self.guided_choice,
            "guided_json": self.guided_json,
        }

    def constraint(self) -> tuple[str, dict[str, Any]] | None:
        """``(client field, SamplingParams keyword arguments)`` of the request's constraint, or None."""
        for name, value in self.constraint_fields().items():
            if value is None:
                continue
            if name == "guided_regex":
                return name, {"regex": value}
            if name == "guided_choice":
                return name, {"choice": value}
            if name == "guided_json":
                return name, {"json_schema": value}
            if value["type"] == "json_object":
                return name, {"json_schema": {"type": "object"}}
            return name, {"json_schema": value["json_schema"].get("schema", {})}
        return None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: Any) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            raise ValueError("is not supported by nanoserve; leave it out")
        return value

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """None: no logprobs; k >= 0: the chosen token's logprob and the top k."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("tool calling is not supported by nanoserve; leave it out")
        return tools

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs=true", param="top_logprobs")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: Any  # a string, a list of strings, a list of token ids, or a list of those lists
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: Any) -> list[str | list[int]]:
        def token_ids(x: Any) -> bool:
            return (
                isinstance(x, list)
                and bool(x)
                and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
            )

        if isinstance(prompt, str) or token_ids(prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) or token_ids(p) for p in prompt):
            return list(prompt)
        raise ValueError(
            "must be a string, a list of strings, a non-empty list of token ids, or a list of such lists"
        )

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("is not supported by nanoserve; leave it out")
        return suffix

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.num_choices:
            raise APIError(400, "best_of: only best_of == n is supported", param="best_of")
        if self.echo and self.logprobs is not None:
            raise APIError(
                400,
                "echo: echo together with logprobs is not supported (prompt logprobs are not computed)",
                param="echo",
            )
        if len(self.prompt) * self.num_choices > MAX_CHOICES:
            raise APIError(
                400,
                f"n: prompts x n must be <= {MAX_CHOICES}, got {len(self.prompt) * self.num_choices}",
                param="n",
            )
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


def parse_request(model: type[_Strict], body: bytes) -> Any:
    """Validate a JSON body into ``model``; any problem becomes a 400 naming the field.

    Checks that span fields (model validators) raise :class:`APIError` themselves: pydantic
    lets exceptions other than ValueError pass through unchanged.
    """
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] in ("model_type", "model_attributes_type") and not first["loc"]:
        return bad_request("the request body must be a JSON object", code="invalid_json")
    path = _param_path(first["loc"])
    same_field = [e for e in errors if _param_path(e["loc"]) == path]  # the members of a union
    if first["type"] == "missing":
        return bad_request(f"{path}: this field is required", param=path, code="missing_field")
    reasons = "; or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same_field))
    got = json.dumps(first.get("input"), default=str)
    got = got if len(got) <= 80 else got[:77] + "..."
    return bad_request(f"{path}: {reasons} (got {got})", param=path)


def _param_path(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"`` (union tags dropped)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in UNION_TAGS:
            path += f".{part}" if path else part
    return path or "body"


# --- request -> engine ---------------------------------------------------------------------
def sampling_params(
    req: _SamplingFields, max_tokens: int, choice: int, tokenizer: Tokenizer | None = None
) -> SamplingParams:
    """Engine parameters for choice ``choice`` (each choice of a seeded request gets its own seed).

    A constraint that cannot be enforced raises an :class:`APIError` (400) naming the client's
    field. With ``tokenizer``, the constraint is also compiled for it here
    (:func:`nanoserve.structured.prepare`), which adds the checks that need the vocabulary:
    no token sequence satisfies it, or it cannot finish within ``max_tokens``.
    """
    temperature = 1.0 if req.temperature is None else req.temperature
    seed = None if req.seed is None else (req.seed + choice) % 2**64
    constraint = req.constraint()
    field, extra = constraint if constraint is not None else (None, {})
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=seed,
            stop=list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=bool(req.ignore_eos),
            logprobs=req.num_logprobs,
            **extra,
        )
        if tokenizer is not None and field is not None:
            from nanoserve import structured

            structured.prepare(params, tokenizer)
    except InvalidSamplingParams as exc:
        name = str(exc).removeprefix("invalid ").split("=", 1)[0]
        if field is not None and name in ("regex", "choice", "json_schema"):
            raise APIError(400, f"{field}: {exc}", param=field, code="invalid_constraint") from None
        raise
    return params


# --- engine -> response ----------------------------------------------------------------------
def finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finish_reason in ("stop", "length") else None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's ``usage``; ``cached_tokens`` are the prompt tokens whose K/V came from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class TokenText:
    """How a single token is shown in logprobs: its text and its raw bytes."""

    tokenizer: Tokenizer

    def __post_init__(self) -> None:
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """``(text, raw bytes)`` of one token; a partial character's text is U+FFFD."""
        if token_id not in self._cache:
            raw = token_bytes(self.tokenizer.backend.id_to_token(token_id) or "")
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token_id]


def chat_logprobs(results: list[SampleResult], token_text: TokenText) -> dict[str, Any]:
    """``choice.logprobs`` of a chat completion: one entry per generated token."""
    content = []
    for r in results:
        text, raw = token_text(r.token_id)
        top = []
        for token_id, lp in r.top_logprobs or []:
            t_text, t_raw = token_text(token_id)
            top.append({"token": t_text, "logprob": lp, "bytes": t_raw})
        content.append({"token": text, "logprob": r.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(
    results: list[SampleResult], token_text: TokenText, text_offset: int = 0
) -> dict[str, Any]:
    """``choice.logprobs`` of a legacy completion: parallel lists, one entry per token."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for r in results:
        text, _ = token_text(r.token_id)
        tokens.append(text)
        token_logprobs.append(r.logprob)
        top_logprobs.append({token_text(t)[0]: lp for t, lp in r.top_logprobs or []})
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }
