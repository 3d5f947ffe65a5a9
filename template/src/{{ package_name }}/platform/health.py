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
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from . import state
from .auth import public

HEALTH_JSON = "application/health+json"
NO_STORE = {"Cache-Control": "no-store"}
# Probes are never rate limited: a throttled probe gets a healthy instance restarted.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})

log = structlog.get_logger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", include_in_schema=False)
@public
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "pass"}, media_type=HEALTH_JSON, headers=NO_STORE)


@router.get("/readyz", include_in_schema=False)
@public
async def readyz(request: Request) -> JSONResponse:
    draining_since = state.draining_since(request.scope)
    if draining_since is not None:
        return draining(draining_since)
    resources = state.get_resources(request)
    checks: Mapping[str, state.Check] = resources.readiness_checks
    limit = resources.settings.readiness_timeout
    names = list(checks)
    results = await asyncio.gather(*(run_check(checks[name], limit) for name in names))
    failed = [
        name for name, result in zip(names, results, strict=True) if result["status"] != "pass"
    ]
    if failed:
        log.warning("not ready", failed_checks=failed)
    body = {
        "status": "fail" if failed else "pass",
        "checks": {name: [result] for name, result in zip(names, results, strict=True)},
    }
    return JSONResponse(
        body, status_code=503 if failed else 200, media_type=HEALTH_JSON, headers=NO_STORE
    )


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
