"""Outbound HTTP: one shared client per process, and no call without a deadline.

httpx timeouts bound each network operation, not the call: an upstream that
drips a byte every half second never trips a 1 s read timeout. So every call
also runs under an overall deadline. Only idempotent methods are retried, with
exponential backoff and jitter, and only on errors a retry can fix. Failures
become UpstreamError (502) or UpstreamTimeout (504), answered as problem+json.
"""

import asyncio
import functools
import random
import ssl
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import structlog
from fastapi import Depends
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import state
from .metrics import Metrics
from .problems import problem_for
from .settings import PlatformSettings

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUSES = frozenset({502, 503, 504})
BACKOFF_BASE = 0.1  # seconds before the first retry; doubles each time

log = structlog.get_logger(__name__)


class UpstreamError(Exception):
    """An upstream service failed or could not be reached: answered as 502.

    The message names the upstream for the log; the response body does not.
    """

    status = 502


class UpstreamTimeout(UpstreamError):
    """An upstream service did not answer within the deadline: answered as 504."""

    status = 504


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default verification (its CA bundle, SSL_CERT_FILE honoured), loaded once per
    process: loading the bundle costs about 50 ms of CPU, paid again by every client built
    without it (each app the tests build opens its clients anew)."""
    return httpx.create_ssl_context()


def create_http_client(settings: PlatformSettings) -> httpx.AsyncClient:
    """The shared client: pooled connections, every timeout set, redirects off."""
    return httpx.AsyncClient(
        verify=tls_context(),
        timeout=httpx.Timeout(settings.outbound_timeout, connect=settings.outbound_connect_timeout),
        limits=httpx.Limits(max_connections=settings.outbound_max_connections),
        follow_redirects=False,
    )


class Outbound:
    """Calls through the shared client under a deadline, retrying what is safe to retry.

    The CA bundle is loaded at start-up, so a wrong SSL_CERT_FILE stops the start instead
    of failing every call. The client itself is built by the first call: about 35 ms of
    each worker's start and 1.3 MB of its memory, which a service that never calls out
    should not pay for, and the first call pays once, on the event loop.
    """

    def __init__(
        self,
        settings: PlatformSettings,
        *,
        instrument: Callable[[httpx.AsyncClient], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings  # OUTBOUND_*: the client's timeouts, each call's deadline, retries
        self.metrics = metrics
        self._instrument = instrument
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        tls_context()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._closed:
            raise RuntimeError("the outbound client is closed: the service is shutting down")
        if self._client is None:
            client = create_http_client(self.settings)
            if self._instrument is not None:
                self._instrument(client)
            self._client = client
        return self._client

    @property
    def opened(self) -> bool:
        """Whether a call has built the client yet."""
        return self._client is not None

    async def aclose(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.aclose()

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        method = method.upper()
        attempts = 1 + (self.settings.outbound_retries if method in IDEMPOTENT_METHODS else 0)
        host = httpx.URL(url).host
        deadline = self.settings.outbound_deadline
        try:
            async with asyncio.timeout(deadline):
                response = await self._attempt(method, url, attempts, host, **kwargs)
        except TimeoutError:
            self._count(host, "timeout")
            log.warning("upstream deadline exceeded", host=host, method=method)
            raise UpstreamTimeout(f"{host} did not answer within {deadline} s") from None
        except UpstreamError as error:
            self._count(host, "timeout" if isinstance(error, UpstreamTimeout) else "error")
            raise
        self._count(host, f"{response.status_code // 100}xx")
        return response

    def _count(self, host: str, outcome: str) -> None:
        """To metrics when they are on, by host: bounded by the upstreams your code calls."""
        if self.metrics is not None:
            self.metrics.add(self.metrics.outbound_calls, host, outcome)

    async def _attempt(
        self, method: str, url: str, attempts: int, host: str, **kwargs: Any
    ) -> httpx.Response:
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                response = await self.client.request(method, url, **kwargs)
            except httpx.TimeoutException as error:
                if last:
                    log.warning("upstream timed out", host=host, attempts=attempt)
                    raise UpstreamTimeout(f"{host} timed out") from error
                reason = type(error).__name__
            except httpx.TransportError as error:
                if last:
                    log.warning(
                        "upstream unreachable",
                        host=host,
                        attempts=attempt,
                        error=type(error).__name__,
                    )
                    raise UpstreamError(f"{host} could not be reached") from error
                reason = type(error).__name__
            else:
                if response.status_code not in RETRYABLE_STATUSES:
                    return response
                if last:
                    log.warning(
                        "upstream failed", host=host, attempts=attempt, status=response.status_code
                    )
                    raise UpstreamError(f"{host} answered {response.status_code}")
                reason = str(response.status_code)
            delay = BACKOFF_BASE * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)  # noqa: S311
            log.info(
                "retrying upstream call",
                host=host,
                attempt=attempt,
                reason=reason,
                delay_s=round(delay, 3),
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _outbound(request: Request) -> Outbound:
    return state.get_resources(request).outbound


# A handler parameter: `outbound: OutboundClient`, then `await outbound.request("GET", url)`.
OutboundClient = Annotated[Outbound, Depends(_outbound)]


async def upstream_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UpstreamError)
    detail = (
        "An upstream service did not answer in time."
        if isinstance(exc, UpstreamTimeout)
        else "An upstream service failed."
    )
    return problem_for(request, exc.status, detail)


EXCEPTION_HANDLERS = {UpstreamError: upstream_error_handler}
# What a route that calls out may also answer, for the OpenAPI document (openapi.py).
ANSWERS = {
    _outbound: {
        UpstreamError.status: "An upstream service failed.",
        UpstreamTimeout.status: "An upstream service did not answer in time.",
    }
}
