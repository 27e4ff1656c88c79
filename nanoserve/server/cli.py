"""``python -m nanoserve serve``: running the HTTP server around an engine.

    python -m nanoserve serve                                  # SmolLM2-135M-Instruct on 127.0.0.1:8000
    python -m nanoserve serve --model DIR --port 8080 --api-key KEY --max-num-seqs 16

Binds to loopback unless ``--host`` says otherwise. SIGINT/SIGTERM stop it gracefully:
uvicorn stops accepting connections and lets in-flight requests finish for up to
``--shutdown-timeout`` seconds; whatever is still running then is aborted, and the engine
thread stops last. Heavy imports (FastAPI, uvicorn) wait until ``run`` so that the other
subcommands start fast. The flags are generated from :class:`nanoserve.config.ServerConfig`
and :class:`nanoserve.config.EngineConfig` by ``nanoserve.cli``.

At startup ``run`` logs what it serves (:func:`describe`: model, weights, backend, KV pool,
context, threads, address, key), raises the soft open-file limit toward the hard one (each
open connection holds a descriptor; see :func:`raise_fd_limit`) and hands uvicorn its
connection limits (``--limit-concurrency``, ``--timeout-keep-alive``).
"""

from __future__ import annotations

import copy
import logging
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from nanoserve.config import ServerConfig
from nanoserve.errors import NanoserveError

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from nanoserve.engine import LLMEngine

LOOPBACK = ("127.0.0.1", "localhost", "::1")
FD_TARGET = 65536  # the soft open-file limit serve asks for (vLLM asks for 65535), at most the hard limit
FD_RESERVE = 64  # descriptors besides one per connection: the listening socket, model files, logs, threads

logger = logging.getLogger("nanoserve.server")


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
    if server.limit_concurrency < 2:  # uvicorn counts the connection a request arrives on
        raise NanoserveError(
            f"--limit-concurrency must be at least 2 (the connection a request arrives on counts), "
            f"got {server.limit_concurrency}"
        )
    if not server.timeout_keep_alive > 0:
        raise NanoserveError(f"--timeout-keep-alive must be a number of seconds > 0, got {server.timeout_keep_alive}")


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


def raise_fd_limit(target: int = FD_TARGET) -> tuple[int, int, int] | None:
    """Raise the soft RLIMIT_NOFILE to ``target``, or to the hard limit if that is lower.

    Returns ``(soft before, soft now, hard)``; None where the platform has no such limit.
    Never lowers the soft limit. Each open connection holds a descriptor, and when they run
    out every new connection fails in ``accept()`` (see ``runner.AcceptErrorHandler``).
    """
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard


def log_fd_limit(limit_concurrency: int) -> None:
    """Raise the open-file limit (:func:`raise_fd_limit`), log it, and warn when it is still
    below what ``limit_concurrency`` connections need."""
    needed = limit_concurrency + FD_RESERVE
    limits = raise_fd_limit(max(FD_TARGET, needed))
    if limits is None:
        return
    before, soft, hard = limits
    shown_hard = "unlimited" if hard < 0 else str(hard)
    if soft != before:
        logger.info("open-file limit: raised from %d to %d (hard limit %s)", before, soft, shown_hard)
    else:
        logger.info("open-file limit: %d (hard limit %s)", soft, shown_hard)
    if 0 <= soft < needed:
        logger.warning(
            "the open-file limit %d is below the %d that --limit-concurrency %d needs: raise the hard "
            "limit (ulimit -Hn) or lower --limit-concurrency, or connections past it will fail",
            soft,
            needed,
            limit_concurrency,
        )


def describe(engine: LLMEngine, server: ServerConfig) -> list[str]:
    """What ``serve`` runs, one ``name: value`` line each, logged at startup."""
    from nanoserve import threads
    from nanoserve.model.registry import resolve_model

    config, stats = engine.config, engine.stats()
    host = f"[{server.host}]" if ":" in server.host else server.host
    pool_mib = engine.cache.nbytes / 2**20
    return [
        f"model: {engine.model_name} ({resolve_model(config.model)})",
        f"weights: {config.weights} ({', '.join(engine.model.weights.formats())})",
        f"backend: {engine.backend.name}"
        + (f" (reference kernels for {', '.join(engine.backend.fallbacks)})" if engine.backend.fallbacks else ""),
        f"KV pool: {stats.num_blocks} blocks of {stats.block_size} tokens = {stats.num_kv_slots} tokens, "
        f"{pool_mib:.1f} MiB ({config.kv_cache_dtype})",
        f"max_model_len: {engine.max_model_len}",
        threads.describe(),  # "threads: N BLAS threads (...), kernels on N threads, on C CPUs, from ..."
        f"listening on: http://{host}:{server.port}",
        "API key: required" if server.api_key else "API key: not required (set --api-key or NANOSERVE_API_KEY)",
    ]


def uvicorn_config(app: FastAPI, server: ServerConfig) -> uvicorn.Config:
    """uvicorn's settings for ``app`` from ``server``; logs uvicorn's and nanoserve's lines alike."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["nanoserve"] = {"handlers": ["default"], "level": server.log_level.upper(), "propagate": False}
    return uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        log_config=log_config,
        access_log=not server.no_access_log,
        lifespan="on",
        limit_concurrency=server.limit_concurrency,
        timeout_keep_alive=server.timeout_keep_alive,  # type: ignore[arg-type]  # any number of seconds
    )


def run(engine: LLMEngine, server: ServerConfig, default_model_name: bool = False) -> int:
    """Build the app around ``engine``, serve until SIGINT/SIGTERM; returns the exit status.

    ``default_model_name``: the engine runs the default model, so clients call it by its
    well-known name unless ``served_model_name`` says otherwise. Raises NanoserveError for an
    impossible limit (see :func:`validate`; :func:`check_server_config` checks before the model loads).
    Logs the configuration (:func:`describe`) and the open-file limit (:func:`log_fd_limit`) first.
    """
    validate(server)
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
    config = uvicorn_config(app, server)  # configures logging: log only after this
    for line in describe(engine, server):
        logger.info("%s", line)
    log_fd_limit(server.limit_concurrency)
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
