"""``python -m nanoserve serve``: the command line of the HTTP server.

    python -m nanoserve serve                                  # SmolLM2-135M-Instruct on 127.0.0.1:8000
    python -m nanoserve serve --model DIR --port 8080 --api-key KEY --max-num-seqs 16

Binds to loopback unless ``--host`` says otherwise. SIGINT/SIGTERM stop it gracefully:
uvicorn stops accepting connections and lets in-flight requests finish for up to
``--shutdown-timeout`` seconds; whatever is still running then is aborted, and the engine
thread stops last. Heavy imports (FastAPI, uvicorn) wait until ``run`` so that the other
subcommands start fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options: the engine's, then the server's."""
    from nanoserve.cli import add_engine_arguments

    add_engine_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for all)",
    )
    g.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("NANOSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSERVE_API_KEY, else no key)",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients use (default: SmolLM2-135M-Instruct, or the name of --model)",
    )
    g.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="most queued requests; more are refused with 503 + Retry-After (default: 256)",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="largest request body; larger gets 413 (default: 1 MiB)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests may take to finish on SIGINT/SIGTERM (default: 10)",
    )
    g.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level",
    )
    g.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")


def run(args: argparse.Namespace) -> int:
    """Load the model, build the app, serve until SIGINT/SIGTERM; returns the exit status."""
    import uvicorn

    from nanoserve.cli import build_engine
    from nanoserve.model.registry import DEFAULT_MODEL
    from nanoserve.server.app import DEFAULT_MAX_BODY_BYTES, create_app
    from nanoserve.server.runner import DrainingServer

    if args.host not in LOOPBACK and not args.api_key:
        print(
            f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use it",
            file=sys.stderr,
        )
    engine = build_engine(args)
    app = create_app(
        engine,
        api_key=args.api_key,
        served_model_name=args.served_model_name or (DEFAULT_MODEL if args.model is None else None),
        max_waiting=args.max_waiting,
        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.server.engine, args.shutdown_timeout)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown, then re-raises the signal to the
    # handler that was there before it: make that one a no-op, so a clean drain exits with 0.
    previous = {sig: signal.signal(sig, _already_handled) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _already_handled(signum: int, frame: Any) -> None:
    """The signal has been handled by the graceful shutdown that just ended."""
