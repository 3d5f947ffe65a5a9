"""The OpenAPI document tells the whole truth: every answer the platform can give, too.

FastAPI documents what a route returns itself (its response model, 422 for invalid input).
The platform around every route answers more: 401 and 403 from the deny-by-default
middleware and require_scopes, 429 and the RateLimit headers from the limiter, 400 and
413 from the body limit, 503 when a dependency is unavailable, 500 for a bug, and every
error as problem+json. `install` adds them to each operation, so a new route gets them without
boilerplate; a route declares only the answers of its own logic, e.g.
`responses={404: {"description": "No note with this id."}}`, and those get the
problem+json body here as well. Generated clients then know the error format.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from .auth import authorize, is_public
from .problems import PROBLEM_JSON

Answers = Mapping[int, str]

# Every operation, whatever it does.
PLATFORM_ANSWERS: Answers = {
    400: "The request is malformed (e.g. a Content-Length that is not a number).",
    413: "The request body is larger than MAX_BODY_SIZE.",
    429: "Too many requests from this client; retry after Retry-After seconds.",
    500: "An unexpected error; quote the request_id when reporting it.",
    503: "A dependency is unavailable or the service is busy; retry after Retry-After.",
}
AUTHENTICATION_ANSWERS: Answers = {401: "Credentials are missing or not valid."}
SCOPE_ANSWERS: Answers = {403: "The credentials do not grant this operation."}

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `errors` only on 422.",
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "string"},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
HEADERS = {
    "X-Request-ID": "The request's id, also on its log lines.",
    "RateLimit-Policy": 'Quota policies, e.g. `"default";q=120;w=60`.',
    "RateLimit": 'What is left, e.g. `"default";r=42;t=17`.',
    "Retry-After": "Seconds to wait before retrying.",
    "WWW-Authenticate": "The challenge: how to authenticate.",
}
# A 503 may come from the server itself (over its concurrency limit): no Retry-After then.
REQUIRED_HEADERS = {("Retry-After", 429), ("WWW-Authenticate", 401)}


def install(
    app: FastAPI,
    *,
    security_scheme: dict[str, Any] | None,
    dependency_answers: Mapping[Callable[..., Any], Answers],
) -> None:
    """Complete `app`'s document once, when it is first asked for.

    `security_scheme`: how callers authenticate (None: not by this service).
    `dependency_answers`: what a route using a platform dependency may also answer
    (a database session: 409 on a constraint; the outbound client: 502, 504).
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            complete(app, generate(), security_scheme, dependency_answers)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def complete(
    app: FastAPI,
    document: dict[str, Any],
    security_scheme: dict[str, Any] | None,
    dependency_answers: Mapping[Callable[..., Any], Answers],
) -> None:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for fastapi_default in ("HTTPValidationError", "ValidationError"):  # replaced by Problem
        schemas.pop(fastapi_default, None)
    schemas["Problem"] = PROBLEM_SCHEMA
    if security_scheme is not None:
        components["securitySchemes"] = {"credentials": security_scheme}
    for route in iter_route_contexts(app.routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        answers = dict(PLATFORM_ANSWERS)
        calls = list(_dependencies(route.dependant))
        protected = not is_public(route.endpoint)
        if protected and security_scheme is not None:
            answers |= AUTHENTICATION_ANSWERS
            if any(d.call is authorize and d.own_oauth_scopes for d in calls):
                answers |= SCOPE_ANSWERS
        for dependency in calls:
            answers |= dependency_answers.get(dependency.call, {})  # type: ignore[arg-type]
        for method in route.methods or ():
            operation = document["paths"][route.path_format][method.lower()]
            if protected and security_scheme is not None:
                operation["security"] = [{"credentials": []}]
            _complete_responses(operation.setdefault("responses", {}), answers)


def _complete_responses(responses: dict[str, Any], answers: Answers) -> None:
    for status, description in answers.items():
        responses.setdefault(str(status), {"description": description})
    for status, response in responses.items():
        code = int(status) if status.isdigit() else 0  # "default", "2XX": left as they are
        if code >= 400:
            problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
            response["content"] = {PROBLEM_JSON: problem}
        names = ["X-Request-ID", "RateLimit-Policy", "RateLimit"]
        names += ["Retry-After"] if code in (429, 503) else []
        names += ["WWW-Authenticate"] if code in (401, 403) else []
        response["headers"] = {
            name: {
                "description": HEADERS[name],
                "required": (name, code) in REQUIRED_HEADERS or name == "X-Request-ID",
                "schema": {"type": "string"},
            }
            for name in names
        }


def _dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for dependency in dependant.dependencies:
        yield dependency
        yield from _dependencies(dependency)
