"""A ceiling on request bodies, enforced while the body streams in, never after.

A declared Content-Length over the limit is refused before a byte is read; a
body without one (chunked) is counted as it arrives and refused the moment it
passes the limit. Both answers are the same 413 problem. An HTTP/1 request with
neither Content-Length nor Transfer-Encoding has no body (RFC 9112, 6.3): it passes as it
is (HTTP/2 frames a body without either, so there it is counted).
"""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import refuse


class BodyTooLarge(HTTPException):
    """Raised from `receive`; FastAPI lets HTTPException through to the problem handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=too_large_detail(limit))


def too_large_detail(limit: int) -> str:
    return f"The request body is larger than the {limit} bytes this service accepts."


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = framed = None  # the first Content-Length, the first Transfer-Encoding
        for name, value in scope["headers"]:  # lowercase names (ASGI); no Headers object
            if name == b"content-length" and declared is None:
                declared = value
            elif name == b"transfer-encoding" and framed is None:
                framed = value
        if declared is None and framed is None and _http1(scope):
            await self.app(scope, receive, send)  # no body: nothing to count
            return
        if declared is not None:
            if not declared.isdigit():
                await refuse(scope, receive, send, 400, "Content-Length is not a number.")
                return
            if int(declared) > self.max_bytes:
                await refuse(scope, receive, send, 413, too_large_detail(self.max_bytes))
                return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as error:
            if started:
                raise
            await refuse(scope, receive, send, 413, error.detail)


def _http1(scope: Scope) -> bool:
    return scope.get("http_version") in {"1.0", "1.1"}
