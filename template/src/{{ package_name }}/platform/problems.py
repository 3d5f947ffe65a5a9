"""Every error leaves the service as one problem+json shape (RFC 9457).

Bodies never echo request input and never carry a traceback; the traceback goes
to the log under the same request id that the response carries.
"""

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import structlog
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import state

PROBLEM_JSON = "application/problem+json"
MAX_VALIDATION_ERRORS = 10

log = structlog.get_logger(__name__)


def problem(
    status: int,
    *,
    detail: str | None = None,
    request_id: str | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    if request_id:
        body["request_id"] = request_id
    body.update(extensions)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def problem_for(
    request: Request,
    status: int,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """The problem answer to `request`: its request id, its path as the instance."""
    return problem(
        status,
        detail=detail,
        request_id=state.request_id(request.scope),
        instance=request.url.path,
        headers=headers,
        **extensions,
    )


async def refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer from a middleware, before the app sees the request."""
    response = problem(status, detail=detail, request_id=state.request_id(scope), headers=headers)
    await response(scope, receive, send)


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else None
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
    return problem_for(request, exc.status_code, detail, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. The router's 405 names only the first
    route's, though GET, PATCH and DELETE on /notes/{id} are three routes."""
    methods: set[str] = set()
    for route in iter_route_contexts(getattr(request.scope.get("app"), "routes", [])):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


async def validation_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    found = exc.errors()
    errors = validation_errors(found)
    detail = "The request is not valid; see errors."
    if len(errors) < len(found):
        detail = f"The request is not valid; the first {len(errors)} errors are listed."
    return problem_for(request, 422, detail, errors=errors)


def validation_errors(found: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """At most MAX_VALIDATION_ERRORS entries, naming only what the model declares.

    An unknown key is the client's own text: it is reported once, at its parent, never by
    name. A body of 100 000 unknown keys gets one short entry, not 100 000 echoed ones.
    """
    errors: list[dict[str, str]] = []
    unknown_reported = False
    for error in found:
        location = list(error["loc"])
        message, kind = error["msg"], error["type"]
        if kind == "extra_forbidden":
            if unknown_reported:
                continue
            unknown_reported = True
            location, message = location[:-1], "Unknown fields are not accepted"
        where = ".".join(str(part) for part in location)
        errors.append({"loc": where, "msg": message, "type": kind})
        if len(errors) == MAX_VALIDATION_ERRORS:
            break
    return errors


EXCEPTION_HANDLERS = {
    HTTPException: http_exception_handler,
    RequestValidationError: validation_exception_handler,
}


class UnhandledErrorMiddleware:
    """Turn an exception no handler took into a logged traceback and a 500 problem.

    Sits inside the request-id and access-log middleware, so the 500 carries the
    request id and is counted like any other response.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_track(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_track)
        except Exception as error:
            log.exception("unhandled error", path=scope["path"], method=scope["method"])
            report_error(scope, error)
            if started:
                raise  # too late for a clean answer: let the server close the connection
            await refuse(
                scope,
                receive,
                send,
                500,
                "An unexpected error occurred; quote the request_id when reporting it.",
            )


def report_error(scope: Scope, error: Exception) -> None:
    """To error tracking when it is on, named by route template, never by raw path."""
    resources = state.resources(scope)
    if resources is None or resources.error_reporter is None:
        return
    route = getattr(scope.get("route"), "path", None) or "<unmatched>"
    resources.error_reporter.report(
        error, request_id=state.request_id(scope), method=scope["method"], route=route
    )
