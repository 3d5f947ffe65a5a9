"""Runtime resilience of every service variant, as real processes over real HTTP:
rate limits under a burst (and shared through Redis), trusted proxies, and graceful
shutdown with requests in flight, one or two workers, inside and past the timeout."""

import asyncio
import contextlib
import json
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import psycopg
import pytest

from .conftest import POSTGRES_ADMIN_URL, Project
from .service import running
from .test_data_layer import database_name, migrate

pytestmark = pytest.mark.per_source

SLEEP = "/_test/sleep"


async def burst(urls: list[str], headers: dict[str, str] | None = None) -> Counter[int]:
    limits = httpx2.Limits(max_connections=len(urls), max_keepalive_connections=0)
    async with httpx2.AsyncClient(timeout=30, limits=limits, headers=headers) as client:
        responses = await asyncio.gather(*(client.get(url) for url in urls))
    return Counter(response.status_code for response in responses)


def limited_env(project: Project, limit: str, **extra: str) -> dict[str, str]:
    return {**project.env, "RATE_LIMIT_ENABLED": "true", "RATE_LIMIT_DEFAULT": limit, **extra}


def events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.exercises("redis", "auth")
def test_a_burst_of_300_gets_exactly_the_limit_through(variant: Project) -> None:
    env = limited_env(variant, "100/minute")
    with running(variant.python, variant.path, env) as (base, _):
        outcome = asyncio.run(burst([f"{base}{SLEEP}?seconds=0"] * 300, variant.headers))
        assert outcome == Counter({200: 100, 429: 200})
        probe = httpx2.get(f"{base}/healthz", timeout=5)
        assert probe.status_code == 200, "health probes are never limited"


@pytest.mark.redis
@pytest.mark.exercises("auth")
def test_two_processes_share_one_limit_through_redis(variant: Project) -> None:
    env = limited_env(variant, "60/minute")
    with (
        running(variant.python, variant.path, env) as (first, _),
        running(variant.python, variant.path, env) as (second, _),
    ):
        urls = [f"{first}{SLEEP}?seconds=0", f"{second}{SLEEP}?seconds=0"] * 100
        outcome = asyncio.run(burst(urls, variant.headers))
    assert outcome == Counter({200: 60, 429: 140})


@pytest.mark.redis
@pytest.mark.exercises("auth")
def test_two_workers_share_one_limit_through_redis(variant: Project) -> None:
    env = limited_env(variant, "40/minute", WORKERS="2")
    with running(variant.python, variant.path, env) as (base, _):
        outcome = asyncio.run(burst([f"{base}{SLEEP}?seconds=0"] * 120, variant.headers))
    assert outcome == Counter({200: 40, 429: 80})


@pytest.mark.exercises("redis", "auth")
def test_clients_behind_a_trusted_proxy_are_limited_one_by_one(variant: Project) -> None:
    """Anonymous requests are limited by address (they are refused with 401 afterwards
    where the service authenticates: what counts here is whether the limiter let them by)."""
    url = SLEEP + "?seconds=0"

    def limited(outcome: Counter[int]) -> tuple[int, int]:
        return sum(n for status, n in outcome.items() if status != 429), outcome[429]

    env = limited_env(variant, "5/minute")  # FORWARDED_ALLOW_IPS defaults to loopback
    with running(variant.python, variant.path, env) as (base, _):
        alice = asyncio.run(burst([base + url] * 8, {"X-Forwarded-For": "203.0.113.1"}))
        bob = asyncio.run(burst([base + url] * 8, {"X-Forwarded-For": "203.0.113.2"}))
    assert limited(alice) == limited(bob) == (5, 3)

    untrusting = limited_env(variant, "5/minute", FORWARDED_ALLOW_IPS="192.0.2.250")
    with running(variant.python, variant.path, untrusting) as (base, _):
        alice = asyncio.run(burst([base + url] * 8, {"X-Forwarded-For": "203.0.113.1"}))
        bob = asyncio.run(burst([base + url] * 8, {"X-Forwarded-For": "203.0.113.2"}))
    # An untrusted peer's X-Forwarded-For is ignored: both share the peer's own budget.
    assert limited(alice + bob) == (5, 11)


@contextlib.asynccontextmanager
async def sleepers(
    base: str, headers: dict[str, str], *, count: int, seconds: float
) -> AsyncIterator[list[asyncio.Task[httpx2.Response]]]:
    """`count` requests held open for `seconds`, each on its own connection, all in flight."""
    limits = httpx2.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx2.AsyncClient(timeout=30, limits=limits, headers=headers) as client:
        url = f"{base}{SLEEP}?seconds={seconds}"
        requests = [asyncio.create_task(client.get(url)) for _ in range(count)]
        await asyncio.sleep(0.7)  # every request has reached the server
        yield requests


def wait_for_drains(log: Path, workers: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text().count('"shutdown started') >= workers:  # a line may be half-written
            return
        time.sleep(0.05)
    pytest.fail(f"{workers} worker(s) did not start draining within {timeout}s")


async def not_served(url: str) -> bool:
    """A new connection after SIGTERM is refused (one process) or accepted by the
    supervisor's socket and reset (workers): either way it is never served."""
    async with httpx2.AsyncClient(timeout=5) as client:
        try:
            await client.get(url)
        except httpx2.TransportError:
            return True
    return False


def connections_to(database: str) -> int:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchone()
    return row[0] if row else 0


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.exercises("database", "redis")
def test_sigterm_drains_20_in_flight_requests_then_closes_everything(
    variant: Project, workers: int, tmp_path: Path
) -> None:
    uses_postgres = variant.rendered.answers["database"] == "postgresql"
    if variant.rendered.answers["database"] != "none":
        assert migrate(variant).returncode == 0
    env = {**variant.env, "WORKERS": str(workers), "SHUTDOWN_TIMEOUT": "15"}
    log = tmp_path / "server.log"
    with running(variant.python, variant.path, env, output=log) as (base, process):
        if variant.rendered.answers["database"] != "none":  # open pooled connections first
            warm = asyncio.run(burst([f"{base}/notes"] * 10, variant.headers))
            assert warm == Counter({200: 10})
        if uses_postgres:
            assert connections_to(database_name(variant)) > 0

        async def in_flight_then_sigterm() -> tuple[list[httpx2.Response], bool]:
            async with sleepers(base, variant.headers, count=20, seconds=2) as requests:
                process.send_signal(signal.SIGTERM)
                # The supervisor forwards SIGTERM on its next poll (every 0.5 s): probe once
                # every worker has started to drain.
                await asyncio.to_thread(wait_for_drains, log, workers)
                refused = await not_served(f"{base}/healthz")
                return await asyncio.gather(*requests), refused

        responses, refused = asyncio.run(in_flight_then_sigterm())
        process.wait(timeout=20)
    output = log.read_text()
    assert [r.status_code for r in responses] == [200] * 20, output
    assert refused, "new connections must be refused once shutdown starts"
    assert process.returncode == 0, output
    assert "Traceback" not in output
    logged = events(log)
    names = [str(event["event"]) for event in logged]
    drains = [e for e in logged if str(e["event"]).startswith("shutdown started")]
    assert len(drains) == workers, output
    assert sum(int(e["in_flight"]) for e in drains) >= 20 - 1, output  # the warm-up may be done
    closed = Counter(str(e["resource"]) for e in logged if e["event"] == "resource closed")
    expected = {"http client"}
    expected |= {"database"} if variant.rendered.answers["database"] != "none" else set()
    expected |= {"redis"} if variant.rendered.answers["redis"] else set()
    assert {name: closed[name] for name in expected} == dict.fromkeys(expected, workers), output
    assert names.count("resources closed") == workers
    if uses_postgres:
        assert connections_to(database_name(variant)) == 0, "connections left after exit"


@pytest.mark.exercises("database", "redis")
def test_requests_past_the_shutdown_timeout_are_cut_with_a_logged_reason(
    variant: Project, tmp_path: Path
) -> None:
    env = {**variant.env, "SHUTDOWN_TIMEOUT": "1"}
    log = tmp_path / "server.log"
    with running(variant.python, variant.path, env, output=log) as (base, process):

        async def stuck_then_sigterm() -> list[httpx2.Response | BaseException]:
            async with sleepers(base, variant.headers, count=5, seconds=20) as requests:
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*requests, return_exceptions=True)

        started = time.monotonic()
        outcomes = asyncio.run(stuck_then_sigterm())
        process.wait(timeout=15)
        elapsed = time.monotonic() - started
    output = log.read_text()
    assert process.returncode == 0, output
    assert elapsed < 10, f"the 20 s requests held shutdown for {elapsed:.1f} s"
    assert not any(isinstance(o, httpx2.Response) and o.status_code == 200 for o in outcomes)
    assert "timeout graceful shutdown exceeded" in output, output
    assert "resources closed" in output, "resources must still be closed after the cut"


DRAIN_DELAY = 2.0
MARGIN = 0.4  # stop opening connections this long before the delay ends (the log says when)


async def new_connections(
    url: str, headers: dict[str, str], until: list[float]
) -> list[tuple[float, str]]:
    """One request per new connection, again and again until `until[0]` (time.monotonic);
    each outcome is (when the connection was opened, status code or error class)."""
    limits = httpx2.Limits(max_connections=1, max_keepalive_connections=0)
    outcomes: list[tuple[float, str]] = []
    async with httpx2.AsyncClient(timeout=10, limits=limits, headers=headers) as client:
        while (opened := time.monotonic()) < until[0]:
            try:
                response = await client.get(url)
            except httpx2.TransportError as error:
                outcomes.append((opened, type(error).__name__))
            else:
                outcomes.append((opened, str(response.status_code)))
    return outcomes


def wait_for_logged(log: Path, event: str, count: int, timeout: float = 10) -> None:
    logged = re.compile(rf'"event": ?"{re.escape(event)}"')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(logged.findall(log.read_text())) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"{event!r} was not logged {count} time(s) within {timeout}s")


async def readiness(url: str) -> tuple[int, dict[str, Any]]:
    async with httpx2.AsyncClient(timeout=5) as client:  # a new connection, as a prober's
        response = await client.get(url)
    return response.status_code, response.json()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.exercises("database", "redis")
def test_new_connections_are_served_through_the_drain_delay_then_refused(
    variant: Project, workers: int, tmp_path: Path
) -> None:
    """What an orchestrator needs: it removes an instance from its endpoints only some time
    after SIGTERM. Until DRAIN_DELAY ends, every new connection is served and /readyz says
    "draining"; after it, new connections are refused (never accepted and reset)."""
    env = {**variant.env, "WORKERS": str(workers), "DRAIN_DELAY": str(DRAIN_DELAY)}
    env["SHUTDOWN_TIMEOUT"] = "10"
    log = tmp_path / "server.log"
    with running(variant.python, variant.path, env, output=log) as (base, process):
        wait_for_logged(log, "startup complete", workers, timeout=30)  # workers start late

        async def clients_through_the_drain() -> tuple[
            float, list[tuple[float, str]], list[tuple[int, dict[str, Any]]]
        ]:
            until = [float("inf")]
            url = f"{base}{SLEEP}?seconds=0"
            loops = [
                asyncio.create_task(new_connections(url, variant.headers, until)) for _ in range(10)
            ]
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            until[0] = signalled + DRAIN_DELAY - MARGIN
            # The supervisor forwards SIGTERM on its next poll (every 0.5 s): probe once every
            # worker is draining, each probe on a new connection.
            await asyncio.to_thread(wait_for_logged, log, "draining", workers)
            probes = [await readiness(f"{base}/readyz") for _ in range(4)]
            outcomes = [outcome for done in await asyncio.gather(*loops) for outcome in done]
            return signalled, outcomes, probes

        signalled, outcomes, probes = asyncio.run(clients_through_the_drain())
        wait_for_drains(log, workers)  # every worker's delay is over: it stops accepting
        time.sleep(0.3)
        with pytest.raises(httpx2.ConnectError):  # refused, not accepted then reset
            httpx2.get(f"{base}/healthz", timeout=5)
        process.wait(timeout=20)
    output = log.read_text()
    during = Counter(outcome for opened, outcome in outcomes if opened >= signalled)
    assert set(during) == {"200"}, f"{during}\n{output}"
    assert during["200"] >= 20, during  # ten clients, about 1.6 s: many new connections
    for status, body in probes:
        assert status == 503, body
        assert body["status"] == "fail"
        assert body["checks"] == {"server:draining": body["checks"]["server:draining"]}
        assert body["checks"]["server:draining"][0]["output"] == "draining"
    assert process.returncode == 0, output
    assert "Traceback" not in output
    logged = events(log)
    names = [str(event["event"]) for event in logged]
    draining = [event for event in logged if event["event"] == "draining"]
    assert [(e["delay_s"], e["signal"]) for e in draining] == [(DRAIN_DELAY, "SIGTERM")] * workers
    started = [i for i, name in enumerate(names) if name.startswith("shutdown started")]
    assert len(started) == workers, output
    assert names.index("draining") < min(started)
    assert names.count("resources closed") == workers
    assert names[-1] == "exit"
