"""Pure ASGI middleware: request ids and access lines.

Pure ASGI rather than BaseHTTPMiddleware: it adds no task per request and does
not buffer or break streaming responses.
"""

import logging
import random
import re
import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import state
from .health import PROBE_PATHS
from .logs import enabled_for

REQUEST_ID_HEADER = "X-Request-ID"
# A client-supplied id is kept only if it is short and plain: it ends up in every log line.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_log = structlog.get_logger("access")


def new_request_id() -> str:
    """32 random hex digits. An id, not a secret: the process's PRNG (reseeded after a
    fork) instead of a getrandom() system call per request."""
    return f"{random.getrandbits(128):032x}"


class RequestIdMiddleware:
    """Accept or create X-Request-ID, echo it, and bind it to every log line of the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:  # lowercase names (ASGI); no Headers object
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else new_request_id()
        state.set_request_id(scope, request_id)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)

        echoed = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Exactly one X-Request-ID, this one. Raw pairs: a MutableHeaders would be
                # a third of this middleware's cost.
                headers = message.get("headers", ())
                message["headers"] = [h for h in headers if h[0].lower() != b"x-request-id"]
                message["headers"].append(echoed)
            await send(message)

        await self.app(scope, receive, send_with_id)


class AccessLogMiddleware:
    """One line per request: method, path, status, duration_ms."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it starts a response

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            quiet = scope["path"] in PROBE_PATHS and status < 400
            if not quiet or enabled_for(logging.DEBUG):
                self._log(scope, status, started, quiet)

    @staticmethod
    def _log(scope: Scope, status: int, started: float, quiet: bool) -> None:
        log = access_log.debug if quiet else access_log.info
        client = scope.get("client")
        log(
            "request",
            method=scope["method"],
            path=scope["path"],
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            client=client[0] if client else None,
        )
