"""The data layer under real load, real crashes and real concurrency, as real processes."""

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx2
import psycopg
import pytest

from .conftest import POSTGRES_ADMIN_URL, Project
from .service import running

pytestmark = pytest.mark.per_source

POOL_SIZE = 5
POOL_TIMEOUT = 2.0


def migrate(project: Project, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(project.python), "-m", "acme_orders", "migrate"],
        cwd=project.path,
        env=env or project.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def database_name(project: Project) -> str:
    return project.env["DATABASE_URL"].rsplit("/", 1)[1]


def postgres(query: str, database: str) -> list[tuple]:
    with psycopg.connect(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}") as connection:
        return connection.execute(query).fetchall()


@pytest.mark.databases("postgresql")
@pytest.mark.exercises("database")
def test_pool_exhaustion_sheds_load_with_503_and_never_exceeds_the_pool(variant: Project) -> None:
    assert migrate(variant).returncode == 0
    env = {
        **variant.env,
        "DB_POOL_SIZE": str(POOL_SIZE),
        "DB_MAX_OVERFLOW": "0",
        "DB_POOL_TIMEOUT": str(POOL_TIMEOUT),
    }
    database = database_name(variant)
    peak = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
            while not sampling.is_set():
                (count,) = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
                ).fetchone()
                peak = max(peak, count)
                time.sleep(0.01)

    async def burst(base: str) -> list[tuple[int, float, str | None]]:
        limits = httpx2.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx2.AsyncClient(
            base_url=base, limits=limits, timeout=60, headers=variant.headers
        ) as client:

            async def one() -> tuple[int, float, str | None]:
                started = time.monotonic()
                response = await client.get("/_test/hold-connection", params={"seconds": 0.3})
                elapsed = time.monotonic() - started
                return response.status_code, elapsed, response.headers.get("retry-after")

            return await asyncio.gather(*(one() for _ in range(200)))

    sampler = threading.Thread(target=sample)
    with running(variant.python, variant.path, env) as (base, _):
        sampler.start()
        try:
            results = asyncio.run(burst(base))
        finally:
            sampling.set()
            sampler.join()
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) >= POOL_SIZE
    assert statuses.count(503) > 0, "200 requests on 5 connections must shed some load"
    assert all(retry == "1" for status, _, retry in results if status == 503)
    slowest = max(elapsed for _, elapsed, _ in results)
    assert slowest < POOL_TIMEOUT + 0.3 + 5, f"a request waited {slowest:.1f}s: it hung"
    assert 0 < peak <= POOL_SIZE, f"peak {peak} connections for a pool of {POOL_SIZE}"


@pytest.mark.databases("postgresql")
@pytest.mark.exercises("database")
def test_sigkill_mid_write_leaves_no_half_written_request_and_restart_keeps_data(
    variant: Project, tmp_path: Path
) -> None:
    assert migrate(variant).returncode == 0
    database = database_name(variant)
    with running(variant.python, variant.path, variant.env) as (base, _):
        before = httpx2.post(
            f"{base}/notes",
            json={"title": "before restart 🎉"},
            headers=variant.headers,
            timeout=10,
        )
        assert before.status_code == 201
    with running(variant.python, variant.path, variant.env) as (base, _):  # a clean restart
        kept = httpx2.get(
            f"{base}/notes/{before.json()['id']}", headers=variant.headers, timeout=10
        )
        assert kept.json() == before.json()

    stop = threading.Event()

    def write_until_killed(base: str, worker: int) -> None:
        with httpx2.Client(base_url=base, timeout=5, headers=variant.headers) as client:
            for n in range(10_000):
                if stop.is_set():
                    return
                try:
                    client.post(
                        "/notes",
                        json={"title": f"w{worker}-{n}", "body": "x" * 2000},
                        headers={"Idempotency-Key": f"w{worker}-{n}"},
                    )
                except httpx2.HTTPError:
                    return  # the server is gone

    with running(variant.python, variant.path, variant.env) as (base, process):
        writers = [threading.Thread(target=write_until_killed, args=(base, w)) for w in range(8)]
        for writer in writers:
            writer.start()
        time.sleep(1.5)
        process.send_signal(signal.SIGKILL)
        process.wait()
        stop.set()
        for writer in writers:
            writer.join()
    # Each create writes its idempotency key, its note, then the key's stored response, in
    # one transaction: after a crash, every key is complete and has exactly one note.
    notes = postgres("SELECT title FROM notes WHERE title LIKE 'w%%'", database)
    keys = postgres("SELECT key, status_code, response_body FROM idempotency_keys", database)
    assert len(notes) > 0, "nothing was written before the kill: the test proves nothing"
    assert all(status == 201 for _, status, _ in keys), "a half-written request survived"
    assert sorted(title for (title,) in notes) == sorted(key for key, _, _ in keys)
    assert all(json.loads(body)["title"] == key for key, _, body in keys)
    with running(variant.python, variant.path, variant.env) as (base, _):  # it starts again
        assert httpx2.get(f"{base}/readyz", timeout=10).status_code == 200


@pytest.mark.databases("postgresql")
@pytest.mark.exercises("database")
def test_migrations_up_down_up_and_three_concurrent_upgrades(variant: Project) -> None:
    alembic = str(variant.python.with_name("alembic"))
    for step in (["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"]):
        result = subprocess.run(
            [alembic, *step], cwd=variant.path, env=variant.env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
    downgrade = [alembic, "downgrade", "base"]
    assert subprocess.run(downgrade, cwd=variant.path, env=variant.env).returncode == 0
    runs = [
        subprocess.Popen(
            [str(variant.python), "-m", "acme_orders", "migrate"],
            cwd=variant.path,
            env=variant.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    (version,) = postgres("SELECT version_num FROM alembic_version", database_name(variant))
    assert version == ("0002",)


HOSTILE_CREATES = [
    ('{"title": "x"', "application/json", 422),
    ('{"title": 5}', "application/json", 422),
    ("", "application/json", 422),
    ('{"title": "%s"}' % ("a" * 10_000), "application/json", 422),
    ('{"title": "nul\\u0000"}', "application/json", 422),
    ('{"title": "t"}', "text/plain", 422),
    ('{"title": "emoji 🎉 ok"}', "application/json", 201),
    ('{"title": "Robert\'); DROP TABLE notes;--"}', "application/json", 201),
]


@pytest.mark.databases("postgresql", "sqlite")
@pytest.mark.exercises("database", "auth")
def test_hostile_creates_get_4xx_or_store_exactly_what_was_sent(variant: Project) -> None:
    assert migrate(variant).returncode == 0
    with running(variant.python, variant.path, variant.env) as (base, _):
        for body, content_type, expected in HOSTILE_CREATES:
            response = httpx2.post(
                f"{base}/notes",
                content=body.encode(),
                headers={**variant.headers, "content-type": content_type},
                timeout=10,
            )
            assert response.status_code == expected, (body[:40], response.text)
            assert "Traceback" not in response.text
            if expected == 201:
                assert response.json()["title"] == json.loads(body)["title"]
        stored = httpx2.get(
            f"{base}/notes", params={"limit": 100}, headers=variant.headers, timeout=10
        ).json()["items"]
    assert len(stored) == sum(1 for *_, expected in HOSTILE_CREATES if expected == 201)


@pytest.mark.databases("sqlite")
@pytest.mark.exercises("database")
def test_sqlite_twenty_concurrent_writers_all_succeed(variant: Project) -> None:
    assert migrate(variant).returncode == 0

    async def writers(base: str) -> list[int]:
        async with httpx2.AsyncClient(base_url=base, timeout=30, headers=variant.headers) as client:
            responses = await asyncio.gather(
                *(client.post("/notes", json={"title": f"writer {n}"}) for n in range(20))
            )
            return [response.status_code for response in responses]

    env = {**variant.env, "DB_POOL_SIZE": "20", "DB_MAX_OVERFLOW": "0"}
    with running(variant.python, variant.path, env) as (base, _):
        assert asyncio.run(writers(base)) == [201] * 20
        stored = httpx2.get(
            f"{base}/notes", params={"limit": 100}, headers=variant.headers, timeout=10
        ).json()["items"]
    assert len(stored) == 20
    database = variant.env["DATABASE_URL"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(database)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
