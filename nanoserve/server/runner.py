"""Running the app with uvicorn: a bounded graceful shutdown, and a server on a background thread.

:class:`DrainingServer` is what ``python -m nanoserve serve`` runs: on SIGINT/SIGTERM it
stops accepting connections, gives in-flight requests ``drain_s`` seconds to finish, then
aborts the rest in the engine so that each ends with an error event (streams) or a 503
rather than a cut connection. Its event loop reports a failing ``accept()`` (no file
descriptors left) through :class:`RateLimitedLog`: one line, then at most one summary line
per ``ACCEPT_ERROR_LOG_PERIOD_S``, instead of a traceback per attempt. :class:`ServerThread`
runs the same server inside a notebook, a benchmark or a test, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from nanoserve.server.async_engine import AsyncEngine

logger = logging.getLogger("nanoserve.server")

ABORT_GRACE_S = 5.0  # after aborting, how long responses get to send their error before uvicorn cancels them
ACCEPT_ERROR_LOG_PERIOD_S = 10.0  # at most one line per this many seconds about failing accept() calls
# accept() fails with these when the process or the system is out of descriptors or buffers;
# asyncio then calls the loop's exception handler once per attempt, thousands of times a second
ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class RateLimitedLog:
    """One kind of repeated error, logged as its first occurrence and then counted.

        t=0    error  -> "<message>"                                    (logged)
        t=0..P errors -> counted
        t>=P   error, or flush() -> "<message> (N more times in 10 s)"  (one summary line)
        quiet for P, then an error -> "<message>"                       (logged again)

    So it writes at most one line per ``period_s`` however fast errors come, and ``flush``
    reports what was counted since the last line (call it when the period is over, as
    :class:`AcceptErrorHandler` does). ``clock`` is injectable for tests (seconds, monotonic).
    """

    def __init__(
        self,
        log: logging.Logger,
        period_s: float = ACCEPT_ERROR_LOG_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.log = log
        self.period_s = period_s
        self.clock = clock
        self.last_line_at: float | None = None  # when the last line was written
        self.suppressed = 0  # occurrences counted since then
        self._message = ""

    def __call__(self, message: str) -> bool:
        """Log ``message`` or count it; True when this call wrote a line."""
        now = self.clock()
        self._message = message
        if self.last_line_at is None or (self.suppressed == 0 and now - self.last_line_at >= self.period_s):
            self.log.error("%s", message)
            self.last_line_at = now
            return True
        self.suppressed += 1
        if now - self.last_line_at >= self.period_s:
            self.flush()
            return True
        return False

    def seconds_until_due(self) -> float:
        """How long until a summary may be written (0: now)."""
        if self.last_line_at is None:
            return 0.0
        return max(0.0, self.last_line_at + self.period_s - self.clock())

    def flush(self) -> None:
        """Write the summary line of what was counted since the last line (nothing if nothing was)."""
        if not self.suppressed:
            return
        now = self.clock()
        since = now - self.last_line_at if self.last_line_at is not None else 0.0
        self.log.error("%s (%d more times in %.0f s)", self._message, self.suppressed, since)
        self.suppressed = 0
        self.last_line_at = now


class AcceptErrorHandler:
    """An asyncio exception handler: accept() out of descriptors goes to a :class:`RateLimitedLog`
    (a summary is scheduled when counting starts); every other error to asyncio's default handler.

    asyncio keeps the listening socket and retries a failed accept() after a second, so the
    server recovers by itself once descriptors are free; the log only needs to say so, once.
    """

    def __init__(self, log: RateLimitedLog) -> None:
        self.log = log
        self._flush_scheduled = False

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS):
            loop.default_exception_handler(context)
            return
        message = (
            f"{context.get('message', 'socket.accept() failed')}: {exc}; new connections wait until "
            "descriptors are free (raise the open-file limit, or lower --limit-concurrency or --timeout-keep-alive)"
        )
        if not self.log(message) and not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_later(self.log.seconds_until_due(), self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """The summary, once its period is over (a line written meanwhile moves the period on)."""
        delay = self.log.seconds_until_due()
        if self.log.suppressed and delay > 0:
            loop.call_later(delay, self._flush, loop)
            return
        self._flush_scheduled = False
        self.log.flush()


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose shutdown aborts what is still running after ``drain_s`` seconds."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, drain_s: float) -> None:
        config.timeout_graceful_shutdown = drain_s + ABORT_GRACE_S  # uvicorn's own last resort: cancel
        super().__init__(config)
        self.async_engine = async_engine
        self.drain_s = drain_s

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptErrorHandler(RateLimitedLog(logger)))
        await super().serve(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain_s, self.async_engine.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


class ServerThread:
    """An app served by uvicorn on a background thread (for notebooks and tests).

    >>> with ServerThread(create_app(engine)) as server:
    ...     OpenAI(base_url=server.url + "/v1", api_key="none")

    ``limit_concurrency`` and ``timeout_keep_alive`` are uvicorn's (see
    :class:`nanoserve.config.ServerConfig`); None: no connection limit.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        shutdown_timeout: float = 5.0,
        limit_concurrency: int | None = None,
        timeout_keep_alive: float = 5.0,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # port 0: the OS picks a free one
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(
            app,
            log_level=log_level,
            lifespan="on",
            limit_concurrency=limit_concurrency,
            timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]  # uvicorn takes any number of seconds
        )
        self.server = DrainingServer(config, app.state.server.engine, shutdown_timeout)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="nanoserve-http", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop, as on SIGTERM: stop accepting, let requests finish, shut the app down."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
