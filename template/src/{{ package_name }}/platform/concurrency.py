"""At most MAX_CONCURRENCY requests in flight per worker; past it, a 503 at once.

Queueing without bound turns overload into timeouts for everyone; a prompt 503
with Retry-After lets the client or load balancer go elsewhere while this worker
finishes what it holds. The probes are exempt, so an orchestrator never restarts
or unroutes an instance for being busy. uvicorn's own `limit_concurrency` is not
used: it answers in plain text, without a request id, and counts idle connections
as if they were requests.
"""

import time

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from .problems import refuse

RETRY_AFTER_SECONDS = 1
WARN_EVERY_SECONDS = 10.0  # one line per worker at most, however many requests are refused

log = structlog.get_logger(__name__)


class ConcurrencyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_concurrency: int, exempt_paths: frozenset[str]) -> None:
        self.app = app
        self.max_concurrency = max_concurrency
        self.exempt_paths = exempt_paths
        self.in_flight = 0  # this worker's: one app, one event loop
        self.warned_at = float("-inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            if (now := time.monotonic()) - self.warned_at >= WARN_EVERY_SECONDS:
                self.warned_at = now
                log.warning("concurrency limit reached", max_concurrency=self.max_concurrency)
            detail = f"This instance is serving {self.max_concurrency} requests; retry shortly."
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
            await refuse(scope, receive, send, 503, detail, headers=headers)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
