"""Liveness and readiness, in the health+json format (draft-inadarei-api-health-check).

/healthz touches nothing: it fails only when the process cannot answer at all,
so an orchestrator restarts it. /readyz checks each dependency concurrently,
each under its own timeout, so a hung database makes the probe fail in about a
second rather than hang; the orchestrator then stops routing traffic here.
Once the server has been told to stop, /readyz answers 503 "draining" at once,
without checking anything, while the server goes on serving for DRAIN_DELAY
(server.py), so the load balancer takes this instance out before it stops
accepting; /healthz still passes, so nobody restarts it meanwhile.
"""

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry import context as otel_context

from . import state
from .auth import public

HEALTH_JSON = "application/health+json"
NO_STORE = {"Cache-Control": "no-store"}
# Probes are never rate limited: a throttled probe gets a healthy instance restarted.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})

log = structlog.get_logger(__name__)


def install(app: FastAPI) -> None:
    """Declare the probes on the app itself. FastAPI matches the routes of an included
    router one level down, which cost /healthz about a fifth of its time; probes come
    every few seconds from every orchestrator and load balancer."""
    for path, endpoint in (("/healthz", healthz), ("/readyz", readyz)):
        app.add_api_route(path, endpoint, methods=["GET"], tags=["health"], include_in_schema=False)


@public
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "pass"}, media_type=HEALTH_JSON, headers=NO_STORE)


@public
async def readyz(request: Request) -> JSONResponse:
    draining_since = state.draining_since(request.scope)
    if draining_since is not None:
        return draining(draining_since)
    resources = state.get_resources(request)
    results = await resources.readiness.results()
    if resources.metrics is not None:
        resources.metrics.readiness_checked(results)
    failed = any(result["status"] != "pass" for result in results.values())
    body = {
        "status": "fail" if failed else "pass",
        "checks": {name: [result] for name, result in results.items()},
    }
    return JSONResponse(
        body, status_code=503 if failed else 200, media_type=HEALTH_JSON, headers=NO_STORE
    )


class Readiness:
    """The dependency checks behind /readyz, run at most once per READINESS_CACHE seconds.

    Concurrent probes share one run (single flight) and later ones reuse its results until
    they are older than that, so a flood of probes is one check per dependency per interval:
    it cannot load the database, and a healthy dependency is never reported failing because
    too many probes queued for it.
    """

    def __init__(
        self, checks: Mapping[str, state.Check], *, timeout: float, max_age: float
    ) -> None:
        self.checks = dict(checks)
        self.timeout = timeout
        self.max_age = max_age
        self._latest: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._running: asyncio.Task[dict[str, dict[str, Any]]] | None = None

    async def results(self) -> dict[str, dict[str, Any]]:
        if self._latest is not None and time.monotonic() - self._latest[0] < self.max_age:
            return self._latest[1]
        if self._running is None:
            self._running = asyncio.create_task(self._run(), name="readiness checks")
        # A probe that gives up (its client left) must not cancel the others' shared run.
        return await asyncio.shield(self._running)

    async def _run(self) -> dict[str, dict[str, Any]]:
        # Probes are not traced (tracing.py), nor the checks they run: outside any span, an
        # instrumented client would start a trace of its own. This task's context is its own.
        untraced = otel_context.set_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY, True)
        otel_context.attach(untraced)
        try:
            names = list(self.checks)
            found = await asyncio.gather(*(run_check(self.checks[n], self.timeout) for n in names))
            results = dict(zip(names, found, strict=True))
            failed = [name for name, result in results.items() if result["status"] != "pass"]
            if failed:
                log.warning("not ready", failed_checks=failed)
            self._latest = (time.monotonic(), results)
            return results
        finally:
            self._running = None


def draining(since: float) -> JSONResponse:
    """Not ready because shutting down: the dependencies are not checked (nor loaded)."""
    check = {
        "status": "fail",
        "observedValue": round(time.monotonic() - since, 1),
        "observedUnit": "s",
        "output": "draining",
    }
    body = {"status": "fail", "output": "draining", "checks": {"server:draining": [check]}}
    return JSONResponse(body, status_code=503, media_type=HEALTH_JSON, headers=NO_STORE)


async def run_check(check: state.Check, limit: float) -> dict[str, Any]:
    """Run one check under its own deadline; report the exception class, never its message."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            await check()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported by class
        status, output = "fail", type(exc).__name__
    else:
        status, output = "pass", None
    result: dict[str, Any] = {
        "status": status,
        "observedValue": round((time.perf_counter() - started) * 1000, 1),
        "observedUnit": "ms",
    }
    if output:
        result["output"] = output
    return result
