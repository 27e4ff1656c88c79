"""The HTTP API: FastAPI routes in OpenAI's shapes over an :class:`AsyncEngine`.

    POST /v1/chat/completions   messages -> chat template -> tokens -> engine -> JSON or SSE
    POST /v1/completions        prompt(s) (text or token ids) -> engine -> JSON or SSE
    GET  /v1/models             the served model
    GET  /health                200 while the engine thread runs
    GET  /metrics               Prometheus text
    GET  /openapi.json          the API's schema (needs the API key when one is set)

A handler validates, tokenizes and submits (one engine request per choice), then either
collects the final outputs or streams Server-Sent Events (``data: {chunk}`` lines, then
``data: [DONE]``). Whichever way a response ends -- finished, failed, or the client gone --
its unfinished engine requests are aborted, which frees their KV blocks at once. Templating
and tokenizing run in a worker thread, so a long prompt never holds the event loop (and
``/health``) while it is tokenized. A request whose client left before its answer gets no
response, so uvicorn writes no access line for it; :func:`log_abandoned` writes one (499).

Every error is answered as ``{"error": {"message", "type", "param", "code"}}`` with its
status: 400 invalid request, 401 bad API key, 403 a Host header this server does not answer
to, 404 unknown model or route, 413 body too large, 415 a POST body not declared
``application/json``, 503 overloaded or shutting down. Every 503 -- these, and ``/health`` while the
engine is not running -- carries ``Retry-After``. Errors never reach the engine thread: a
bad request is refused before it is queued.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from nanoserve.engine import LLMEngine
from nanoserve.errors import (
    CapacityError,
    ContextLengthExceededError,
    EngineOverloadedError,
    InvalidSamplingParams,
    NanoserveError,
    PromptTooLongError,
    RequestError,
)
from nanoserve.output import RequestOutput
from nanoserve.sampling import SampleResult
from nanoserve.server import protocol as proto
from nanoserve.server.async_engine import AsyncEngine, OutputStream, SubRequest
from nanoserve.server.metrics import ServerMetrics
from nanoserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from nanoserve.server.security import add_cross_site_middleware, host_names
from nanoserve.server.shapes import ChatShape, CompletionShape, Job, response

logger = logging.getLogger("nanoserve.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
DRAIN_LIMIT_BYTES = 16 << 20  # read (and drop) at most this much of a too-large body: the client sees the 413
SHUTTING_DOWN = "the request was aborted: the server is shutting down"
CLIENT_CLOSED = 499  # the status of a request whose client went away before its answer (nginx's)
access_logger = logging.getLogger("uvicorn.access")  # uvicorn's access log (off with --no-access-log)


@dataclass
class ServerState:
    """Everything a handler needs; lives on ``app.state.server``."""

    engine: AsyncEngine
    owns_engine: bool
    metrics: ServerMetrics
    model_id: str  # the name /v1/models shows
    model_names: set[str]  # names a request may use
    api_key: str | None
    max_body_bytes: int
    retry_after_s: int
    allowed_hosts: frozenset[str] | None  # Host header names answered; None: any
    token_text: proto.TokenText
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(
    engine: LLMEngine | AsyncEngine,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_waiting: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after_s: int = 1,
    allowed_hosts: Iterable[str] = (),
    allowed_origins: Iterable[str] = (),
) -> FastAPI:
    """The OpenAI-compatible app. Given an LLMEngine, the app owns its engine thread
    (started and stopped with the app); given an AsyncEngine, the caller owns it.
    ``max_waiting`` applies only when the app builds the AsyncEngine itself.

    ``allowed_hosts``: Host header names answered besides the loopback names (``"*"``: any);
    ``allowed_origins``: the browser origins CORS allows (none: no CORS headers at all)."""
    owns = isinstance(engine, LLMEngine)
    async_engine = AsyncEngine(engine, max_waiting=max_waiting) if isinstance(engine, LLMEngine) else engine
    model_id = served_model_name or async_engine.model_name
    state = ServerState(
        engine=async_engine,
        owns_engine=owns,
        metrics=ServerMetrics(async_engine),
        model_id=model_id,
        model_names={model_id, async_engine.model_name},
        api_key=api_key or None,
        max_body_bytes=max_body_bytes,
        retry_after_s=retry_after_s,
        allowed_hosts=host_names(allowed_hosts),
        token_text=proto.TokenText(async_engine.tokenizer),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            if owns:
                await asyncio.to_thread(async_engine.stop)

    # no /docs or /redoc; /openapi.json is a route of its own, behind the key (see _add_routes)
    app = FastAPI(
        title="nanoserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = state
    add_cross_site_middleware(app, state, list(allowed_origins), lambda error: _error_response(state, error))
    _add_error_handlers(app, state)
    _add_routes(app, state)
    return app


# --- errors -------------------------------------------------------------------------------
def _error_response(state: ServerState, error: APIError) -> JSONResponse:
    """The one place an error becomes a response: counted, and a 503 always has Retry-After."""
    state.metrics.http_errors.labels(str(error.status)).inc()
    headers = dict(error.headers)
    if error.status == 503:
        headers.setdefault("Retry-After", str(state.retry_after_s))
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(state, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(state, APIError(exc.status_code, message, code=code, headers=exc.headers))

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        state.metrics.http_errors.labels(str(CLIENT_CLOSED)).inc()
        return _abandoned(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(state, bad_request(str(exc)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(
            state,
            APIError(
                500, f"internal server error ({type(exc).__name__}); see the server log", "server_error"
            ),
        )


def _engine_error(state: ServerState, exc: Exception, prompt_param: str) -> APIError:
    """Translate an engine refusal into the HTTP error the client gets."""
    if isinstance(exc, EngineOverloadedError):
        return _unavailable(str(exc))
    if isinstance(exc, PromptTooLongError):
        return bad_request(str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, (CapacityError, ContextLengthExceededError)):
        return bad_request(str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, InvalidSamplingParams):
        name = str(exc).removeprefix("invalid ").split("=", 1)[0]
        return bad_request(str(exc), param=name or None)
    if isinstance(exc, RequestError):
        return bad_request(str(exc), param=prompt_param)
    return APIError(500, f"internal server error ({type(exc).__name__}: {exc})", "server_error")


def _unavailable(message: str) -> APIError:
    """503: overloaded or shutting down, the client may try again (the response adds Retry-After)."""
    return APIError(503, message, "server_overloaded", code="server_overloaded")


def _check_finals(finals: dict[str, RequestOutput]) -> None:
    for out in finals.values():
        if out.finish_reason == "error":
            raise APIError(500, f"generation failed: {out.error}", "server_error")
        if out.finish_reason == "abort":
            raise _unavailable(SHUTTING_DOWN)


# --- request plumbing ------------------------------------------------------------------------
def _authorize(request: Request, state: ServerState) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        what = "missing" if not header else "incorrect"
        raise APIError(
            401,
            f"{what} API key: send the header 'Authorization: Bearer <key>' with the key the server was started with",
            "authentication_error",
            code="invalid_api_key",
        )


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 if it is larger than ``limit`` bytes.

    A too-large body is still read (and dropped, up to a bound) so that the client, which
    sends its whole body before reading, gets to see the 413 instead of a broken pipe.
    """
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_large = True
        if size > limit + DRAIN_LIMIT_BYTES:
            break
        if not too_large:
            chunks.append(chunk)
    if too_large:
        raise APIError(
            413, f"the request body is larger than the limit of {limit} bytes", code="request_too_large"
        )
    return b"".join(chunks)


async def _json_body(request: Request, state: ServerState) -> bytes:
    """A POST's body (413 past the limit), which must be declared ``application/json`` (415).

    A page on another site can make a browser send a text/plain or form body without asking
    the server first (no CORS preflight), never an ``application/json`` one.
    """
    body = await _read_body(request, state.max_body_bytes)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = repr(media_type) if media_type else "none"
        raise APIError(
            415,
            f"unsupported Content-Type {shown}: send the body as 'Content-Type: application/json'",
            code="unsupported_media_type",
        )
    return body


def _check_model(state: ServerState, model: str | None) -> str:
    if model is not None and model not in state.model_names:
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {state.model_id!r} (see GET /v1/models)",
            code="model_not_found",
            param="model",
        )
    return state.model_id


def log_abandoned(request: Request) -> None:
    """The access line uvicorn would write for this request, with status 499 (client gone).

    uvicorn writes its line when the response starts, and drops the response of a client
    that has disconnected, so without this an abandoned request would leave no line at all.
    """
    scope = request.scope
    client = scope.get("client")
    query = scope.get("query_string", b"").decode("latin-1")
    path = scope.get("root_path", "") + scope["path"] + (f"?{query}" if query else "")
    access_logger.info(
        '%s - "%s %s HTTP/%s" %d',
        f"{client[0]}:{client[1]}" if client else "-",
        scope["method"],
        path,
        scope.get("http_version", "1.1"),
        CLIENT_CLOSED,
    )


def _abandoned(request: Request) -> Response:
    """The response of a request whose client left: logged (:func:`log_abandoned`), read by nobody."""
    log_abandoned(request)
    return Response(status_code=CLIENT_CLOSED)


def _chat_prompt(state: ServerState, req: ChatCompletionRequest) -> tuple[str, list[int]]:
    """The templated prompt and its token ids (slow for a long prompt: run it off the event loop)."""
    prompt = _render_chat(state, req)
    return prompt, state.engine.tokenizer.encode(prompt)


def _completion_prompts(state: ServerState, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids and text (slow for a long prompt: run it off the event loop)."""
    tok = state.engine.tokenizer
    prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in req.prompt]
    texts = [p if isinstance(p, str) else _decode(tok, p) for p in req.prompt]
    return prompts, texts


def _render_chat(state: ServerState, req: ChatCompletionRequest) -> str:
    try:
        return state.engine.tokenizer.apply_chat_template([m.as_template_dict() for m in req.messages])
    except NanoserveError as exc:
        raise bad_request(str(exc), param="messages") from None
    except Exception as exc:  # the template itself refused these messages (raise_exception, bad roles)
        raise bad_request(
            f"the chat template cannot render these messages: {exc}", param="messages"
        ) from None


async def _submit(
    state: ServerState, req: Any, prompts: list[list[int]], texts: list[str], model: str, kind: str
) -> Job:
    """Queue one engine request per (prompt, choice); all are admitted or none."""
    prompt_param = "messages" if kind == "chatcmpl" else "prompt"
    job_id = f"{kind}-{uuid.uuid4().hex}"
    n = req.num_choices
    _check_admissible(state, len(prompts) * n)
    subs, choice_of = [], {}
    for p, ids in enumerate(prompts):
        if not ids:
            raise bad_request("the prompt is empty: give at least one token", param=prompt_param)
        room = min(state.engine.max_model_len, state.engine.num_kv_slots) - len(ids)
        max_tokens = req.requested_max_tokens or max(1, room)
        for i in range(n):
            request_id = f"{job_id}-{p * n + i}"
            try:  # a constraint is compiled here, off the event loop (cached: one compile per schema)
                params = await asyncio.to_thread(proto.sampling_params, req, max_tokens, i, state.engine.tokenizer)
            except InvalidSamplingParams as exc:
                raise _engine_error(state, exc, prompt_param) from None
            subs.append(SubRequest(request_id, ids, params))
            choice_of[request_id] = p * n + i
    try:
        stream = await state.engine.add_requests(subs)
    except (RequestError, EngineOverloadedError) as exc:
        raise _engine_error(state, exc, prompt_param) from None
    return Job(job_id, int(time.time()), model, stream, choice_of, prompts, texts, n)


def _check_admissible(state: ServerState, num_requests: int) -> None:
    """400 for a request with more engine requests than the waiting queue can ever hold."""
    limit = state.engine.max_waiting
    if limit is not None and num_requests > limit:
        raise bad_request(
            f"n: this request makes {num_requests} engine requests (prompts x n), more than the "
            f"{limit} this server can queue (--max-waiting {limit}); lower n or send fewer prompts",
            param="n",
        )


async def _collect(request: Request, job: Job) -> dict[str, RequestOutput] | None:
    """Final outputs of every choice, or None if the client went away first (then all are aborted)."""
    results = asyncio.ensure_future(job.stream.final_outputs())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
        if results.done():
            try:
                return results.result()
            except EngineOverloadedError as exc:
                raise _unavailable(str(exc)) from None
        return None
    finally:
        gone.cancel()
        results.cancel()
        job.stream.abort()


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict[str, Any] | str) -> str:
    """One Server-Sent Event: ``data: <json>`` and a blank line."""
    if not isinstance(payload, str):
        payload = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


class EventStream(StreamingResponse):
    """A Server-Sent Events response that aborts its engine requests however it ends."""

    def __init__(self, events: AsyncIterator[str], stream: OutputStream) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.output_stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # finished: no-op; client gone (task cancelled) or error: abort and free blocks
            self.output_stream.abort()


async def _stream_outputs(job: Job) -> AsyncIterator[tuple[int, RequestOutput | APIError]]:
    """``(choice index, output)`` as the engine makes them; an engine failure comes as an APIError."""
    try:
        async for out in job.stream:
            index = job.choice_of[out.request_id]
            if out.finish_reason == "error":
                yield index, APIError(500, f"generation failed: {out.error}", "server_error")
                return
            if out.finish_reason == "abort":
                yield index, _unavailable(SHUTTING_DOWN)
                return
            yield index, out
    except EngineOverloadedError as exc:
        yield 0, _unavailable(str(exc))
    except Exception as exc:  # the engine thread failed this request
        yield 0, APIError(500, f"generation failed: {exc}", "server_error")


# --- routes ---------------------------------------------------------------------------------
def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine.is_running:
            return JSONResponse({"status": "ok"})
        headers = {"Retry-After": str(state.retry_after_s)}
        return JSONResponse({"status": "unavailable"}, status_code=503, headers=headers)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        _authorize(request, state)
        return JSONResponse(app.openapi())

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        _authorize(request, state)
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str) -> JSONResponse:
        _authorize(request, state)
        _check_model(state, model)
        return JSONResponse(_model_card(state))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _authorize(request, state)
        req = proto.parse_request(ChatCompletionRequest, await _json_body(request, state))
        model = _check_model(state, req.model)
        prompt, ids = await asyncio.to_thread(_chat_prompt, state, req)
        job = await _submit(state, req, [ids], [prompt], model, "chatcmpl")
        return await _answer(request, ChatShape(req, job, state.token_text))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _authorize(request, state)
        req = proto.parse_request(CompletionRequest, await _json_body(request, state))
        model = _check_model(state, req.model)
        prompts, texts = await asyncio.to_thread(_completion_prompts, state, req)
        job = await _submit(state, req, prompts, texts, model, "cmpl")
        return await _answer(request, CompletionShape(req, job, state.token_text))


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except Exception:  # ids out of the vocabulary: the engine refuses them with a clear message
        return ""


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "nanoserve",
        "max_model_len": state.engine.max_model_len,
    }


# --- responses ------------------------------------------------------------------------------------
async def _answer(request: Request, shape: ChatShape | CompletionShape) -> Response:
    """Stream the job's outputs as Server-Sent Events, or wait for them all and answer JSON."""
    if shape.req.stream:
        return EventStream(_events(shape), shape.job.stream)
    finals = await _collect(request, shape.job)
    if finals is None:
        return _abandoned(request)
    _check_finals(finals)
    return JSONResponse(response(shape, finals))


async def _events(shape: ChatShape | CompletionShape) -> AsyncIterator[str]:
    """The streamed body: the opening chunks, a chunk per output with new text, logprobs or a
    finish, then (``include_usage``) a usage chunk with no choices, then ``[DONE]``.

    Every chunk holds one choice. An engine failure ends the stream with an error event and
    ``[DONE]``.
    """
    job, req = shape.job, shape.req
    base = {"id": job.id, "object": shape.chunk_object_name, "created": job.created, "model": job.model}
    usage: dict[str, Any] = {"usage": None} if req.include_usage else {}
    for choice in shape.opening():
        yield _sse({**base, "choices": [choice], **usage})
    logprobs_sent = [0] * job.num_choices
    completion_tokens = 0
    cached: dict[int, int] = {}  # choice index -> prompt tokens served from the prefix cache
    async for index, out in _stream_outputs(job):
        if isinstance(out, APIError):
            yield _sse(out.body())
            yield _sse("[DONE]")
            return
        new_logprobs: list[SampleResult] = []
        if req.num_logprobs is not None:
            new_logprobs = out.logprobs[logprobs_sent[index] :]
            logprobs_sent[index] = len(out.logprobs)
        if out.finished:
            completion_tokens += len(out.token_ids)
            cached[index] = out.num_cached_tokens
        if out.finished or out.delta or new_logprobs:
            yield _sse({**base, "choices": [shape.chunk_choice(index, out, new_logprobs)], **usage})
    if req.include_usage:
        totals = proto.usage(job.num_prompt_tokens, completion_tokens, job.num_cached_tokens(cached))
        yield _sse({**base, "choices": [], "usage": totals})
    yield _sse("[DONE]")
