"""The engine loop in a background thread, and asyncio streams of its outputs.

    HTTP handlers (asyncio, event-loop thread)          engine thread (owns LLMEngine)
    ------------------------------------------          ------------------------------
    await add_requests(...)  --("add", ...)-->  commands  -->  engine.add_request(...)
          <-- admission future settled  <--  loop.call_soon_threadsafe
    async for out in stream  <-- OutputStream queue  <--  engine.step() outputs
    stream.abort()           --("abort", ids)-->  commands -->  engine.abort(id)

Invariant: the :class:`LLMEngine` object is touched only by the engine thread. Other
threads talk to it through one FIFO command queue (so an abort always comes after the add
it cancels) and hear back through ``loop.call_soon_threadsafe``, which is the only safe
way to wake an asyncio loop from another thread. The engine thread never blocks on the
event loop and the event loop never blocks on a step.

Read-only facts that never change after start-up (tokenizer, model name, context length,
pool size) are copied out at construction; :attr:`AsyncEngine.stats` is the engine's own
snapshot (:class:`nanoserve.stats.EngineStats`), which the engine thread replaces with
``engine.stats()`` after every step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from nanoserve.engine import LLMEngine
from nanoserve.errors import EngineOverloadedError, RequestError
from nanoserve.output import RequestOutput
from nanoserve.sampling import SamplingParams
from nanoserve.stats import EngineStats

logger = logging.getLogger("nanoserve.server")

Observer = Callable[[list[RequestOutput], float], None]  # (outputs of one step, monotonic time)
IDLE_POLL_S = 0.5  # how often an idle engine thread wakes up to publish stats


@dataclass
class SubRequest:
    """One engine request of an HTTP request (one prompt, one choice)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class OutputStream:
    """The outputs of one or more engine requests, in the order the engine made them.

    Iterate it on the event loop that created it; it ends when every request has
    finished. Items put by the engine thread arrive through ``call_soon_threadsafe``.
    """

    def __init__(self, request_ids: list[str], loop: asyncio.AbstractEventLoop, owner: AsyncEngine) -> None:
        self.request_ids = list(request_ids)
        self.unfinished = set(request_ids)
        self._loop = loop
        self._owner = owner
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put_many(self, items: list[RequestOutput | BaseException]) -> None:  # on the loop thread
        for item in items:
            self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while self.unfinished:
            # ``Queue.get`` returns without suspending while items wait, so a backlog would be
            # handed out (and written to a socket) without the loop ever running its callbacks,
            # a client's disconnect among them: let the loop run once per item.
            await asyncio.sleep(0)
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.unfinished.clear()
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item

    async def final_outputs(self) -> dict[str, RequestOutput]:
        """Wait for every request to finish; their last outputs by request id."""
        final: dict[str, RequestOutput] = {}
        async for out in self:
            if out.finished:
                final[out.request_id] = out
        return final

    def abort(self) -> None:
        """Abort whatever has not finished yet (no-op once all have). Safe to call twice."""
        if self.unfinished:
            self._owner.abort(sorted(self.unfinished))
            self.unfinished.clear()


class AsyncEngine:
    """Runs ``LLMEngine.step()`` in a loop on one thread; asyncio code submits, streams, aborts.

    ``max_waiting`` bounds the engine's waiting queue: a submission that would make it
    longer is refused with :class:`EngineOverloadedError` (the server answers 503).
    """

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 or None, got {max_waiting}")
        self._engine = engine
        self.max_waiting = max_waiting
        self.tokenizer = engine.tokenizer  # immutable: safe to use from any thread
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.stats: EngineStats = engine.stats()  # the latest snapshot; replaced, never mutated
        self.num_kv_slots = self.stats.num_kv_slots
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, OutputStream] = {}  # engine thread only
        self._observers: list[Observer] = []
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._lock = threading.Lock()

    # --- lifecycle (any thread) ---------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._accepting

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._accepting = True
            self._thread = threading.Thread(target=self._run, name="nanoserve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, abort live ones (their streams end with "abort"), join the thread."""
        with self._lock:
            was_accepting, self._accepting = self._accepting, False
            thread = self._thread
            if was_accepting:
                self._commands.put(("stop",))
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.error("the engine thread did not stop within %.1f s", timeout)

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(outputs, now)`` on the engine thread after every step (keep it fast)."""
        self._observers.append(observer)

    # --- requests (event loop) ----------------------------------------------------------
    async def add_requests(self, requests: list[SubRequest]) -> OutputStream:
        """Admit all of ``requests`` or none; raises RequestError / EngineOverloadedError."""
        loop = asyncio.get_running_loop()
        stream = OutputStream([r.request_id for r in requests], loop, self)
        admitted: asyncio.Future[None] = loop.create_future()
        with self._lock:  # ordered against stop(): an add is either queued before "stop" or refused
            if not self._accepting:
                raise EngineOverloadedError("the server is shutting down; retry later")
            self._commands.put(("add", requests, stream, admitted))
        try:
            await admitted
        except asyncio.CancelledError:  # the client left while we waited: undo the admission
            self.abort([r.request_id for r in requests])
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Ask the engine thread to abort these requests (non-blocking; unknown ids are ignored)."""
        self._commands.put(("abort", list(request_ids)))

    def abort_all(self) -> None:
        """Abort every live request (their streams end with "abort"); used when a drain times out."""
        self._commands.put(("abort_all",))

    def run_in_engine(self, fn: Callable[[LLMEngine], Any], timeout: float = 30.0) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result (blocking)."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._commands.put(("call", fn, done))
        return done.result(timeout)

    # --- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                stopping = self._run_commands(block=not self._engine.has_unfinished_requests())
                if self._engine.has_unfinished_requests():
                    self._step()
                self._publish_stats()
            except Exception:  # a bug here must not kill the thread that serves everyone
                logger.exception("engine loop error; failing the live requests")
                self._fail_all(RuntimeError("internal engine error; see the server log"))
        self._shut_down()

    def _run_commands(self, block: bool) -> bool:
        """Handle queued commands (waiting up to IDLE_POLL_S for one if ``block``); True on stop."""
        try:
            command = self._commands.get(timeout=IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            if command[0] == "stop":
                return True
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return False

    def _handle(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        try:
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                for request_id in command[1]:
                    self._engine.abort(request_id)
            elif kind == "abort_all":
                for request_id in list(self._streams):
                    self._engine.abort(request_id)
            elif kind == "call":
                fn, done = command[1:]
                try:
                    done.set_result(fn(self._engine))
                except Exception as exc:
                    done.set_exception(exc)
        except Exception:  # one bad command must not fail everyone else's requests
            logger.exception("engine command %r failed", kind)

    def _add(self, requests: list[SubRequest], stream: OutputStream, admitted: asyncio.Future[None]) -> None:
        waiting = self._engine.stats().num_waiting  # live, not the snapshot: earlier adds count
        if self.max_waiting is not None and waiting + len(requests) > self.max_waiting:
            error: BaseException | None = EngineOverloadedError(
                f"the server is overloaded: {waiting} requests are already waiting (limit {self.max_waiting}); retry later"
            )
        else:
            error = self._add_all(requests)
            if error is None:
                for r in requests:
                    self._streams[r.request_id] = stream
        _call_soon(stream._loop, _settle, admitted, error)

    def _add_all(self, requests: list[SubRequest]) -> BaseException | None:
        added: list[str] = []
        try:
            for r in requests:
                self._engine.add_request(r.prompt_token_ids, r.params, r.request_id)
                added.append(r.request_id)
        except Exception as exc:
            for request_id in added:  # all or none: take back the ones already queued
                self._engine.abort(request_id)
            return exc if isinstance(exc, RequestError) else RequestError(f"request rejected: {exc}")
        return None

    def _step(self) -> None:
        outputs = self._engine.step()
        now = time.monotonic()
        for observer in self._observers:
            try:
                observer(outputs, now)
            except Exception:
                logger.exception("step observer failed")
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per stream per step."""
        batches: dict[int, tuple[OutputStream, list[RequestOutput | BaseException]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # e.g. the abort of a request whose batch was refused
            if out.finished:
                del self._streams[out.request_id]
            batches.setdefault(id(stream), (stream, []))[1].append(out)
        for stream, items in batches.values():
            _call_soon(stream._loop, stream.put_many, items)

    def _fail_all(self, error: BaseException) -> None:
        streams = {id(s): s for s in self._streams.values()}
        for request_id in list(self._streams):
            try:
                self._engine.abort(request_id)
            except Exception:
                logger.exception("could not abort %s", request_id)
        self._streams.clear()
        for stream in streams.values():
            _call_soon(stream._loop, stream.put_many, [error])

    def _publish_stats(self) -> None:
        self.stats = self._engine.stats()

    def _shut_down(self) -> None:
        """Abort every live request, deliver those final outputs, refuse queued commands."""
        try:
            for request_id in list(self._streams):
                self._engine.abort(request_id)
            if self._engine.has_unfinished_requests():
                self._deliver(self._engine.step())
        except Exception:
            logger.exception("error while aborting requests at shutdown")
        self._fail_all(EngineOverloadedError("the server is shutting down"))
        self._publish_stats()
        refused = EngineOverloadedError("the server is shutting down; retry later")
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _call_soon(command[2]._loop, _settle, command[3], refused)
            elif command[0] == "call":
                command[2].set_exception(refused)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Schedule ``fn(*args)`` on ``loop`` from the engine thread; a closed loop has no listener left."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve an admission future on its loop (it may have been cancelled meanwhile)."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
