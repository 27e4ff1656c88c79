"""The OpenAI-compatible HTTP server: a thin shell over the engine.

    app.py           FastAPI routes, SSE streaming, errors in OpenAI's shape
    protocol.py      request validation (400 naming the field) and response objects
    async_engine.py  the engine loop on one background thread; asyncio streams of outputs
    metrics.py       Prometheus metrics (GET /metrics)
    runner.py        uvicorn with a bounded graceful shutdown; a server on a background thread
    cli.py           ``python -m nanoserve serve``

    from nanoserve.server import create_app
    app = create_app(LLMEngine(EngineConfig()), api_key="secret")   # then: uvicorn.run(app)

Imports are lazy so that ``python -m nanoserve generate`` does not load FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncEngine", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from nanoserve.server.app import create_app

        return create_app
    if name == "AsyncEngine":
        from nanoserve.server.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'nanoserve.server' has no attribute {name!r}")
