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
import socket
import sys
from typing import TYPE_CHECKING, Any

from nanoserve.config import ServerConfig
from nanoserve.errors import NanoserveError

if TYPE_CHECKING:
    from nanoserve.engine import LLMEngine

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_server_config(server: ServerConfig) -> None:
    """Refuse (NanoserveError) limits under which some valid request could never be served,
    then warn about an exposed server. Needs only the config: call it before loading the model."""
    validate(server)
    check_port_free(server)
    warn_if_exposed(server)


def check_port_free(server: ServerConfig) -> None:
    """NanoserveError if ``host:port`` cannot be bound now (in use, or not an address here)."""
    try:
        with socket.create_server((server.host, server.port)):
            pass
    except OSError as exc:
        raise NanoserveError(f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}") from None


def validate(server: ServerConfig) -> None:
    """NanoserveError for a limit that makes a valid request impossible.

    ``--max-waiting`` must hold the largest request the API accepts (prompts x n up to
    ``MAX_CHOICES``), or that request would be told to retry forever.
    """
    from nanoserve.server.protocol import MAX_CHOICES

    if server.max_waiting < MAX_CHOICES:
        raise NanoserveError(
            f"--max-waiting {server.max_waiting} is too small: one request may queue up to {MAX_CHOICES} "
            f"engine requests (prompts x n), so it must be at least {MAX_CHOICES}"
        )
    if not 1 <= server.port <= 65535:
        raise NanoserveError(f"--port must be in [1, 65535], got {server.port}")
    if server.max_body_bytes is not None and server.max_body_bytes < 1:
        raise NanoserveError(f"--max-body-bytes must be at least 1, got {server.max_body_bytes}")


def split_list(value: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None -> ``[]``."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def warn_if_exposed(server: ServerConfig) -> None:
    """Say so on stderr when the server listens beyond loopback without an API key, and when it
    listens on every address but answers only the loopback names."""
    if server.host not in LOOPBACK and not server.api_key:
        print(
            f"warning: serving on {server.host} without --api-key: anyone who can reach this port can use it",
            file=sys.stderr,
        )
    if server.host in ("0.0.0.0", "::") and not server.allowed_hosts:
        print(
            f"note: only requests addressed to {server.host} or a loopback name are answered; "
            "pass --allowed-hosts with the names clients use (or '*')",
            file=sys.stderr,
        )


def run(engine: LLMEngine, server: ServerConfig, default_model_name: bool = False) -> int:
    """Build the app around ``engine``, serve until SIGINT/SIGTERM; returns the exit status.

    ``default_model_name``: the engine runs the default model, so clients call it by its
    well-known name unless ``served_model_name`` says otherwise. Raises NanoserveError for an
    impossible limit (see :func:`validate`; :func:`check_server_config` checks before the model loads).
    """
    validate(server)
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
        allowed_hosts=[server.host, *split_list(server.allowed_hosts)],
        allowed_origins=split_list(server.allowed_origins),
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
