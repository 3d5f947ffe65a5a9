"""Which endpoint a request is for, found once, before the router runs.

Two guards need it ahead of the router: the rate limiter, which counts a request against
its principal's own budget only on a route that needs a principal, and the early 401
(authentication.RequirePrincipalMiddleware). An unknown path (404, 405) or a public route
answers the same whatever the credentials, so it is counted per address: a principal's
counter in its RateLimit header would tell a guesser that its credentials are valid.
"""

from typing import Any

from fastapi.routing import APIRoute, APIWebSocketRoute, iter_route_contexts
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from . import state
from .auth import is_public


class EndpointMiddleware:
    """Record the endpoint of the FastAPI route the request is for (None: no such route)."""

    CACHE_SIZE = 1024

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Routing again for every request costs more than a probe. Bounded: emptied when
        # full (many distinct ids).
        self._endpoints: dict[tuple[str, str, str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"}:
            await self.app(scope, receive, send)
            return
        # The scope's type too: an HTTP method may be any token, "WEBSOCKET" included.
        key = (scope["type"], scope.get("method", ""), scope.get("root_path", ""), scope["path"])
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = _endpoint(scope)
            # Only found endpoints are kept: a route added later to a path that had none
            # is found on its first request, never taken for "no route" (and open).
            if endpoint is not None:
                if len(self._endpoints) >= self.CACHE_SIZE:
                    self._endpoints.clear()
                self._endpoints[key] = endpoint
        state.set_endpoint(scope, endpoint)
        await self.app(scope, receive, send)


def needs_principal(scope: Scope) -> bool:
    """Whether the request is for a route that refuses anonymous callers."""
    endpoint = state.endpoint(scope)
    return endpoint is not None and not is_public(endpoint)


def _endpoint(scope: Scope) -> Any:
    """The endpoint of the FastAPI route (or websocket route) this request is for.

    None for no match (the router answers 404 or 405) and for a plain Starlette route (the
    docs, in development only): tests/test_auth.py fails on such a route in a deployed app.
    """
    for route in iter_route_contexts(getattr(scope.get("app"), "routes", [])):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            fastapi_route = isinstance(route.original_route, (APIRoute, APIWebSocketRoute))
            return route.endpoint if fastapi_route else None
    return None
