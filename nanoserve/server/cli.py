"""``python -m nanoserve serve``: running the HTTP server around an engine.

    python -m nanoserve serve                                  # SmolLM2-135M-Instruct on 127.0.0.1:8000
    python -m nanoserve serve --model DIR --port 8080 --api-key KEY --max-num-seqs 16

Binds to loopback unless ``--host`` says otherwise. SIGINT/SIGTERM stop it gracefully:
uvicorn stops accepting connections and lets in-flight requests finish for up to
``--shutdown-timeout`` seconds; whatever is still running then is aborted, and the engine
thread stops last. Heavy imports (FastAPI, uvicorn) wait until ``run`` so that the other
subcommands start fast. The flags are generated from :class:`nanoserve.config.ServerConfig`
and :class:`nanoserve.config.EngineConfig` by ``nanoserve.cli``.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any

from nanoserve.config import ServerConfig

if TYPE_CHECKING:
    from nanoserve.engine import LLMEngine

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def warn_if_exposed(server: ServerConfig) -> None:
    """Say so on stderr when the server listens beyond loopback without an API key."""
    if server.host not in LOOPBACK and not server.api_key:
        print(
            f"warning: serving on {server.host} without --api-key: anyone who can reach this port can use it",
            file=sys.stderr,
        )


def run(engine: LLMEngine, server: ServerConfig, default_model_name: bool = False) -> int:
    """Build the app around ``engine``, serve until SIGINT/SIGTERM; returns the exit status.

    ``default_model_name``: the engine runs the default model, so clients call it by its
    well-known name unless ``served_model_name`` says otherwise.
    """
    import uvicorn

    from nanoserve.model.registry import DEFAULT_MODEL
    from nanoserve.server.app import DEFAULT_MAX_BODY_BYTES, create_app
    from nanoserve.server.runner import DrainingServer

    app = create_app(
        engine,
        api_key=server.api_key,
        served_model_name=server.served_model_name or (DEFAULT_MODEL if default_model_name else None),
        max_waiting=server.max_waiting,
        max_body_bytes=server.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
    )
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        access_log=not server.no_access_log,
        lifespan="on",
    )
    drainer = DrainingServer(config, app.state.server.engine, server.shutdown_timeout)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown, then re-raises the signal to the
    # handler that was there before it: make that one a no-op, so a clean drain exits with 0.
    previous = {sig: signal.signal(sig, _already_handled) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        drainer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _already_handled(signum: int, frame: Any) -> None:
    """The signal has been handled by the graceful shutdown that just ended."""
