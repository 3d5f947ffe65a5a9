"""Measurements on a running pair of apps: boot, idle memory, load points, ratios."""

import statistics
import time

from .load import combine, run_wrk
from .plan import Plan, request_headers
from .servers import HOST, Server, get_status

APPS = ("generated", "bare")
RATIO_KEYS = ("rps", "p50_ms", "p99_ms")


def prime(server: Server, plan: Plan, headers: dict) -> None:
    """A first start that answers each endpoint once, then stops. What those requests import
    is compiled to bytecode now, as a production image compiles it at build time: otherwise
    the first measured process of a fresh install compiles it, which reads as up to 6 MB more
    idle RSS for whichever app is measured first."""
    server.start()
    try:
        for path in plan.endpoints.values():
            get_status(server.port, path, headers)
    finally:
        server.stop()


def median_boot(server: Server, boots: int) -> float:
    times = []
    for attempt in range(boots):
        if attempt:
            server.stop()
        times.append(server.start())
    return round(statistics.median(times), 3)


def idle_rss_mb(server: Server, plan: Plan, headers: dict) -> float:
    """After one answer from each endpoint, at rest."""
    for path in plan.endpoints.values():
        status = get_status(server.port, path, headers)
        if status != 200:
            raise RuntimeError(f"{server.name} answered {status} on {path}:\n{server.log_tail()}")
    time.sleep(plan.settle_seconds)
    return round(server.rss_bytes() / 2**20, 1)


def warm_up(servers: dict[str, Server], plan: Plan, headers: dict) -> None:
    if plan.warmup_seconds:
        for server in servers.values():
            for path in plan.endpoints.values():
                run_wrk(
                    url(server, path),
                    connections=16,
                    seconds=plan.warmup_seconds,
                    headers=request_headers(path, headers),
                )
                server.drain(path, headers)


def compare(
    servers: dict[str, Server], path: str, connections: int, plan: Plan, headers: dict
) -> dict:
    """Both apps at one point, alternating which goes first; medians and generated/bare."""
    runs: dict[str, list[dict]] = {name: [] for name in APPS}
    for repeat in range(plan.repeats):
        for name in APPS if repeat % 2 == 0 else reversed(APPS):
            server = servers[name]
            load = run_wrk(
                url(server, path),
                connections=connections,
                seconds=plan.seconds,
                headers=request_headers(path, headers),
            )
            runs[name].append(load)
            server.drain(path, headers)
    result = {name: combine(runs[name]) for name in APPS}
    ratio = {key: _ratio(result["generated"][key], result["bare"][key]) for key in RATIO_KEYS}
    return result | {"ratio": ratio}


def difference(values: dict[str, float]) -> dict[str, float]:
    generated, bare = values["generated"], values["bare"]
    return {
        "generated": generated,
        "bare": bare,
        "difference": round(generated - bare, 3),
        "ratio": _ratio(generated, bare),
    }


def _ratio(generated: float, bare: float) -> float | None:
    return round(generated / bare, 3) if bare else None


def url(server: Server, path: str) -> str:
    return f"http://{HOST}:{server.port}{path}"
