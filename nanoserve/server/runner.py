"""Running the app with uvicorn: a bounded graceful shutdown, and a server on a background thread.

:class:`DrainingServer` is what ``python -m nanoserve serve`` runs: on SIGINT/SIGTERM it
stops accepting connections, gives in-flight requests ``drain_s`` seconds to finish, then
aborts the rest in the engine so that each ends with an error event (streams) or a 503
rather than a cut connection. :class:`ServerThread` runs the same server inside a notebook,
a benchmark or a test, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from nanoserve.server.async_engine import AsyncEngine

ABORT_GRACE_S = 5.0  # after aborting, how long responses get to send their error before uvicorn cancels them


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose shutdown aborts what is still running after ``drain_s`` seconds."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, drain_s: float) -> None:
        config.timeout_graceful_shutdown = drain_s + ABORT_GRACE_S  # uvicorn's own last resort: cancel
        super().__init__(config)
        self.async_engine = async_engine
        self.drain_s = drain_s

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
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        shutdown_timeout: float = 5.0,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # port 0: the OS picks a free one
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on")
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
