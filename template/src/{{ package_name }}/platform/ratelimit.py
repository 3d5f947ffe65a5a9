"""Rate limits for every route, counted before the request reaches the app.

Built on `limits` with the moving-window strategy: a fixed window lets twice
the limit through across a window edge, and a sliding-window counter rounds
the previous window's weight, letting one more through there. The middleware
counts every request against the default limit of its client; a route adds a
stricter limit of its own with `dependencies=[rate_limit("10/minute", name=...)]`;
health probes are exempt. Answers carry the IETF RateLimit-Policy / RateLimit
headers (draft-ietf-httpapi-ratelimit-headers), a 429 also Retry-After.

The client is the authenticated principal on a route that needs one, else the
client address, which uvicorn has already taken from X-Forwarded-For when, and
only when, the connection came from a proxy listed in FORWARDED_ALLOW_IPS. An
unknown path or a public route is counted per address whatever the credentials:
the RateLimit header (or a 429) must not tell valid credentials from invalid ones.
"""

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import Depends, HTTPException, Request
from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import state
from .endpoints import needs_principal
from .problems import refuse
from .setting_types import parse_limit

DEFAULT_POLICY = "default"

log = structlog.get_logger(__name__)


def rate_limit(limit: str, *, name: str) -> Any:
    """A route dependency: a limit of this route's own, per client, on top of the default.

    `limit` uses the `limits` notation ("10/minute", "100 per hour"); a typo
    fails when the module is imported, not at the first request.
    """
    item = parse_limit(limit)

    async def check_route_limit(request: Request) -> None:
        resources = state.get_resources(request)
        if resources.rate_limiter is None:
            return
        key = client_key(request.scope)
        decision = await resources.rate_limiter.hit_all([(name, item)], key)
        state.set_route_rate_limit(request.scope, decision)
        if not decision.allowed:
            count_refusal(request.scope, decision, policy=name)
            # The headers of every policy are added on the way out by the middleware.
            status, detail, headers = refusal(decision, key, policy=name)
            raise HTTPException(status, detail, headers={"Retry-After": headers["Retry-After"]})

    return Depends(check_route_limit)


@dataclass(frozen=True)
class Decision:
    """The outcome of counting one request against one or more policies."""

    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    retry_after: int = 0
    storage_failed: bool = False


class RateLimiter:
    """Counts hits in the shared storage; what happens when the storage is down is a setting."""

    def __init__(self, storage: Storage, *, fail_open: bool) -> None:
        self.strategy = MovingWindowRateLimiter(storage)
        self.fail_open = fail_open

    async def hit(
        self, limit: str | RateLimitItem, key: str, name: str = DEFAULT_POLICY
    ) -> Decision:
        """Count one request by `key` against `limit`."""
        return await self.hit_all([(name, _item(limit))], key)

    async def exhausted(self, limit: str | RateLimitItem, key: str, name: str) -> bool:
        """Whether `key` is over `limit` now, without counting a hit (False if unknown)."""
        try:
            return not await self.strategy.test(_item(limit), name, key)
        except StorageError:
            return False

    async def hit_all(self, policies: list[tuple[str, RateLimitItem]], key: str) -> Decision:
        """Count against each policy in turn, stopping at the first one that refuses."""
        policy_headers: list[str] = []
        state_headers: list[str] = []
        retry_after = 0
        allowed = True
        try:
            for name, item in policies:
                allowed = await self.strategy.hit(item, name, key)
                stats = await self.strategy.get_window_stats(item, name, key)
                reset = max(0, math.ceil(stats.reset_time - time.time()))
                policy_headers.append(f'"{name}";q={item.amount};w={item.get_expiry()}')
                state_headers.append(f'"{name}";r={stats.remaining};t={reset}')
                if not allowed:
                    retry_after = max(1, reset)
                    break
        except StorageError as error:
            log.warning(
                "rate limit storage unavailable",
                fail_open=self.fail_open,
                error=type(error.storage_error).__name__,
            )
            return Decision(allowed=self.fail_open, storage_failed=True, retry_after=1)
        headers = {
            "RateLimit-Policy": ", ".join(policy_headers),
            "RateLimit": ", ".join(state_headers),
        }
        if not allowed:
            headers["Retry-After"] = str(retry_after)
        return Decision(allowed=allowed, headers=headers, retry_after=retry_after)


def refusal(decision: Decision, key: str, *, policy: str) -> tuple[int, str, dict[str, str]]:
    """Status, detail and headers refusing a request `decision` did not allow."""
    if decision.storage_failed:
        return 503, "The rate limiter is unavailable; try again shortly.", {"Retry-After": "1"}
    log.info("rate limited", key=key, policy=policy)
    return (
        429,
        f"Too many requests; retry after {decision.retry_after} s.",
        {**decision.headers, "Retry-After": str(decision.retry_after)},
    )


def count_refusal(scope: Scope, decision: Decision, *, policy: str) -> None:
    """To metrics when they are on: a 429 by `policy` (not a 503 for a storage failure)."""
    resources = state.resources(scope)
    if resources is not None and resources.metrics is not None and not decision.storage_failed:
        resources.metrics.add(resources.metrics.rate_limit_refusals, policy)


def _item(limit: str | RateLimitItem) -> RateLimitItem:
    return parse_limit(limit) if isinstance(limit, str) else limit


def memory_storage() -> "SweptMemoryStorage":
    """Counts in this process only: right for one worker, wrong for several (settings refuse it)."""
    return SweptMemoryStorage()


class SweptMemoryStorage(MemoryStorage):
    """limits' in-process storage, its expired hits swept once a second in the event loop.

    limits' own starts a sweep after every hit, which hands each client's list of hits to
    a thread (asyncio.to_thread) and copies it: a thread hop and a lock handover per
    request, costlier than the rest of the rate limiter, and with thousands of clients a
    core's worth of work. Sweeping in the loop needs no lock: nothing in the storage
    awaits while it changes a list. The hook overridden is private to limits, whose
    version is pinned; test_rate_limits.py fails if it stops being called.
    """

    SWEEP_EVERY_SECONDS = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.swept_at = time.monotonic()

    async def _MemoryStorage__schedule_expiry(self) -> None:
        if time.monotonic() - self.swept_at >= self.SWEEP_EVERY_SECONDS:
            self.sweep()

    def sweep(self) -> None:
        """Drop the hits that left their window, and the clients left with none."""
        self.swept_at = time.monotonic()
        now = time.time()
        for key, hits in list(self.events.items()):
            live = bisect.bisect_left(hits, -now, key=lambda hit: -hit.expiry)  # newest first
            if live:
                del hits[live:]
            else:
                del self.events[key]
                self.locks.pop(key, None)
        for key, expires in list(self.expirations.items()):
            if expires <= now:
                self.storage.pop(key, None)
                del self.expirations[key]
                self.locks.pop(key, None)


def client_key(scope: Scope) -> str:
    principal = state.principal(scope)
    if principal is not None and principal.identifies_caller and needs_principal(scope):
        return f"principal:{principal.subject}"
    client = scope.get("client")
    return f"client:{client[0] if client else 'unknown'}"


class RateLimitMiddleware:
    """429 with Retry-After once a client is over a limit; the headers on every answer."""

    def __init__(self, app: ASGIApp, default_limit: str, exempt_paths: frozenset[str]) -> None:
        self.app = app
        self.default = (DEFAULT_POLICY, parse_limit(default_limit))
        self.exempt_paths = exempt_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        resources = state.resources(scope)
        limiter = resources.rate_limiter if resources is not None else None
        if scope["type"] != "http" or limiter is None or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        key = client_key(scope)
        decision = await limiter.hit_all([self.default], key)
        if not decision.allowed:
            count_refusal(scope, decision, policy=DEFAULT_POLICY)
            status, detail, headers = refusal(decision, key, policy=DEFAULT_POLICY)
            await refuse(scope, receive, send, status, detail, headers=headers)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and decision.headers:
                headers = MutableHeaders(scope=message)
                route = state.route_rate_limit(scope)
                for name in ("RateLimit-Policy", "RateLimit"):
                    values = [route.headers[name]] if route and route.headers else []
                    headers[name] = ", ".join([*values, decision.headers[name]])
            await send(message)

        await self.app(scope, receive, send_with_headers)
