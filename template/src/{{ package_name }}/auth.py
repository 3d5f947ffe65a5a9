"""Who is calling (authentication) and what they may do (authorization), denied by default.

AuthenticationMiddleware identifies the caller once per request, before the rate
limiter, so that limits count per principal. It never refuses a request itself: it
sets `scope["state"]["principal"]` (None without valid credentials) and, when
credentials were presented but are bad, logs why and keeps the failure.

Refusing is the `authorize` dependency, installed on the whole app by create_app:
every route needs a principal unless its endpoint is marked `@public`. A route
added without a thought about access is protected, never open. `require_scopes`
guards operations that need more than a known caller, typically writes.
RequirePrincipalMiddleware, after the rate limiter, gives the same 401 before a
request body is read.

401 and 403 are problem+json with a WWW-Authenticate challenge (RFC 6750 terms).
A client that keeps presenting bad credentials is counted against
AUTH_FAILURE_RATE_LIMIT, far stricter than the general limit, and then gets 429.

The backend that reads credentials (jwt_auth, api_keys or gateway_auth) is opened
in the lifespan and found in `scope["state"]["authenticator"]`.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol

import structlog
from fastapi import Depends, HTTPException, Security
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.security import SecurityScopes
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection, Request
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import http_exception_handler

if TYPE_CHECKING:  # annotations only: settings -> api_keys -> auth must not reach ratelimit
    from .ratelimit import RateLimiter

SUBJECT_MAX_LENGTH = 255  # a subject is stored as the owner of rows
PUBLIC_ATTRIBUTE = "__public__"
FAILURE_POLICY = "auth-failures"

log = structlog.get_logger(__name__)
Endpoint = Callable[..., Any]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: who it is (subject) and what it was granted (scopes)."""

    subject: str
    scopes: frozenset[str] = frozenset()
    # False when every caller shares one principal: rate limits then key by address.
    identifies_caller: ClassVar[bool] = True

    def holds(self, scopes: Iterable[str]) -> bool:
        return self.scopes.issuperset(scopes)


class AuthenticationError(Exception):
    """Credentials were presented and are not valid.

    `reason` is for the log and never contains the credentials; `description` is
    what the client is told; `error` is the RFC 6750 error code.
    """

    def __init__(
        self,
        reason: str,
        description: str = "The credentials are not valid.",
        error: str = "invalid_token",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.description = description
        self.error = error


class Authenticator(Protocol):
    """What each backend provides."""

    async def authenticate(self, headers: Headers) -> Principal | None:
        """The caller; None without credentials; AuthenticationError for bad ones."""
        ...

    def challenge(self, **params: str) -> str:
        """The WWW-Authenticate value, with parameters such as error or scope."""
        ...


def challenge(scheme: str, **params: str) -> str:
    """`Bearer realm="api", error="invalid_token"`: every value a quoted-string."""
    quoted = [f'{name}="{_escape(value)}"' for name, value in params.items() if value]
    return f"{scheme} {', '.join(quoted)}" if quoted else scheme


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class AuthenticationMiddleware:
    """Put the caller's Principal (or None) in the request state; refuse nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"}:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        authenticator: Authenticator | None = state.get("authenticator")
        principal = None
        if authenticator is not None:
            try:
                principal = await authenticator.authenticate(Headers(scope=scope))
                if principal is not None and await _locked_out(scope):
                    principal = None
                    raise AuthenticationError(
                        "client is locked out after repeated failures; credentials not accepted"
                    )
            except AuthenticationError as failure:
                state["authentication_failure"] = failure
                client = scope.get("client")
                log.warning(
                    "authentication failed",
                    reason=failure.reason,
                    client=client[0] if client else None,
                    path=scope["path"],
                )
        state["principal"] = principal
        if principal is not None:
            structlog.contextvars.bind_contextvars(principal=principal.subject)
        await self.app(scope, receive, send)


class RequirePrincipalMiddleware:
    """Refuse a request without a principal before its body is read, unless its route is
    @public. `authorize` decides the same; this answers sooner, because FastAPI reads and
    parses a body before it runs any dependency (so an anonymous malformed body would get
    422, not 401). A request no route matches goes on to the router's 404 or 405.
    """

    CACHE_SIZE = 1024

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Which endpoint a method and path reach: routing again for every anonymous probe
        # costs more than the probe. Bounded: emptied when full (many distinct ids).
        self._endpoints: dict[tuple[str, str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("state", {}).get("principal") is not None:
            await self.app(scope, receive, send)
            return
        key = (scope["method"], scope.get("root_path", ""), scope["path"])
        if key in self._endpoints:
            endpoint = self._endpoints[key]
        else:
            endpoint = _endpoint(scope)
            if len(self._endpoints) >= self.CACHE_SIZE:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        if endpoint is None or is_public(endpoint):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            await _principal_or_401(request)
        except HTTPException as refusal:
            response = await http_exception_handler(request, refusal)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _endpoint(scope: Scope) -> Any:
    """The endpoint of the FastAPI route this request is for: the routes `authorize` guards.

    None for no match (the router answers 404 or 405) and for a plain Starlette route
    (docs in development), which app dependencies do not reach either.
    """
    for route in iter_route_contexts(getattr(scope.get("app"), "routes", [])):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route.endpoint if isinstance(route.original_route, APIRoute) else None
    return None


def public(endpoint: Endpoint) -> Endpoint:
    """Let callers without credentials reach this endpoint. Keep such endpoints few."""
    setattr(endpoint, PUBLIC_ATTRIBUTE, True)
    return endpoint


def is_public(endpoint: object) -> bool:
    return getattr(endpoint, PUBLIC_ATTRIBUTE, False) is True


async def authorize(connection: HTTPConnection, required: SecurityScopes) -> Principal | None:
    """On every route of the app: 401 without a principal unless the endpoint is @public;
    403 without the scopes a route asks for with require_scopes."""
    route = connection.scope.get("route")
    if not required.scopes and is_public(getattr(route, "endpoint", None)):
        return connection.scope.get("state", {}).get("principal")
    principal = await _principal_or_401(connection)
    if not principal.holds(required.scopes):
        missing = sorted(set(required.scopes) - principal.scopes)
        log.info("permission denied", missing_scopes=missing, path=connection.url.path)
        raise HTTPException(
            403,
            "The credentials do not grant this operation.",
            headers=_challenge(
                connection,
                error="insufficient_scope",
                error_description=f"Requires scope: {' '.join(required.scopes)}",
                scope=" ".join(required.scopes),
            ),
        )
    return principal


def require_scopes(*scopes: str) -> Any:
    """For a route's `dependencies=[...]`: 403 unless the principal holds every scope."""
    return Security(authorize, scopes=list(scopes))


async def current_principal(connection: HTTPConnection) -> Principal:
    return await _principal_or_401(connection)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def _principal_or_401(connection: HTTPConnection) -> Principal:
    state = connection.scope.get("state", {})
    principal: Principal | None = state.get("principal")
    if principal is not None:
        return principal
    failure: AuthenticationError | None = state.get("authentication_failure")
    if failure is None:
        raise HTTPException(401, "Credentials are required.", headers=_challenge(connection))
    await _limit_repeated_failures(connection)
    raise HTTPException(
        401,
        failure.description,
        headers=_challenge(connection, error=failure.error, error_description=failure.description),
    )


async def _locked_out(scope: Scope) -> bool:
    """A client over AUTH_FAILURE_RATE_LIMIT gets nowhere, even with a right guess."""
    limiter: RateLimiter | None = scope.get("state", {}).get("rate_limiter")
    settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
    limit: str | None = getattr(settings, "auth_failure_rate_limit", None)
    if limiter is None or limit is None:
        return False
    client = scope.get("client")
    key = f"client:{client[0] if client else 'unknown'}"
    return await limiter.exhausted(limit, key, name=FAILURE_POLICY)


async def _limit_repeated_failures(connection: HTTPConnection) -> None:
    """429 once a client's failed authentications exceed AUTH_FAILURE_RATE_LIMIT."""
    limiter: RateLimiter | None = connection.scope.get("state", {}).get("rate_limiter")
    # No limiter while RATE_LIMIT_ENABLED=false; no AUTH_FAILURE_RATE_LIMIT with AUTH=none.
    limit: str | None = getattr(connection.app.state.settings, "auth_failure_rate_limit", None)
    if limiter is None or limit is None:
        return
    client = connection.client.host if connection.client else "unknown"
    decision = await limiter.hit(limit, f"client:{client}", name=FAILURE_POLICY)
    if decision.allowed or decision.storage_failed:  # a storage outage is logged by the limiter
        return
    log.warning("authentication failures rate limited", client=client)
    raise HTTPException(
        429, "Too many failed authentications; retry later.", headers=decision.headers
    )


def _challenge(connection: HTTPConnection, **params: str) -> dict[str, str] | None:
    authenticator: Authenticator | None = connection.scope.get("state", {}).get("authenticator")
    if authenticator is None:  # no lifespan ran: nothing can authenticate
        return None
    return {"WWW-Authenticate": authenticator.challenge(**params)}
