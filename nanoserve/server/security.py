"""Cross-site protection: the Host check, and CORS only for origins allowed by name.

A key-less server on 127.0.0.1 is still reachable from any web page the user opens. Two
defences, outermost first (docs/serving.md, "Security model"):

* **Host check** (:class:`HostCheck`): a page that points its own domain at this address
  (DNS rebinding) makes the browser send that domain as the Host; anything but the bound
  address, a loopback name or a name given with ``--allowed-hosts`` gets a 403.
* **CORS** is off unless ``--allowed-origins`` names origins: without it a browser may send
  a simple request but never read the answer (and a non-JSON body is refused with 415
  before that, in ``app.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from nanoserve.server.protocol import APIError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def host_name(value: str) -> str:
    """The name in a Host header or address, without port: ``[::1]:8000`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def host_names(allowed: Iterable[str]) -> frozenset[str] | None:
    """The Host names a server answers: loopback and ``allowed``; None if ``allowed`` has ``"*"``."""
    names = {host_name(name) for name in allowed if name.strip()}
    return None if "*" in names else frozenset(names.union(LOOPBACK_HOSTS))


class HostCheck:
    """ASGI middleware: 403 for a Host header the server does not answer to.

    ``state.allowed_hosts`` is read on every request (None: any name); ``respond`` turns the
    refusal into the server's error response. A request without a Host header (HTTP/1.0)
    cannot come from a browser and passes.
    """

    def __init__(self, app: ASGIApp, state: Any, respond: Callable[[APIError], Response]) -> None:
        self.app = app
        self.state = state
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = self.state.allowed_hosts
        host = Headers(scope=scope).get("host", "") if scope["type"] in ("http", "websocket") else ""
        if host and allowed is not None and host_name(host) not in allowed:
            await self.respond(host_refused(host, allowed))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def host_refused(host: str, allowed: frozenset[str]) -> APIError:
    names = ", ".join(sorted(allowed))
    return APIError(
        403,
        f"Host header {host!r} is not allowed: this server answers to {names}; "
        "start it with --allowed-hosts to add names",
        "permission_error",
        code="host_not_allowed",
    )


def add_cross_site_middleware(
    app: FastAPI, state: Any, origins: list[str], respond: Callable[[APIError], Response]
) -> None:
    """CORS only for explicitly allowed origins; the Host check outermost, before anything answers."""
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HostCheck, state=state, respond=respond)
