"""One benchmark run: render, install, migrate, then measure both apps turn by turn."""

import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from . import database, machine, project
from .measure import compare, difference, idle_rss_mb, median_boot, prime, warm_up
from .plan import OWNER, Plan
from .servers import Server, free_port

Log = Callable[[str], None]


class Apps:
    """Builds the generated service and the bare baseline for one worker count."""

    def __init__(self, python: Path, root: Path, url: str, tuning: project.Tuning) -> None:
        self.python, self.root, self.url, self.tuning = python, root, url, tuning
        self.project = root / project.PROJECT_DIR

    def pair(self, workers: int) -> dict[str, Server]:
        gen_port, bare_port = free_port(), free_port()
        generated = Server(
            "generated",
            project.generated_command(self.python),
            env=project.generated_env(self.url, gen_port, workers, self.tuning),
            cwd=self.project,
            log=self.root / f"generated-{workers}w.log",
        )
        bare = Server(
            "bare",
            project.bare_command(self.python),
            env=project.bare_env(self.url, bare_port, workers, self.tuning, OWNER),
            cwd=project.BARE_APP.parent,
            log=self.root / f"bare-{workers}w.log",
        )
        return {"generated": generated, "bare": bare}


def run(plan: Plan, tuning: project.Tuning, log: Log) -> dict:
    started, date = time.monotonic(), machine.utc_now()
    load_before = machine.load_average()
    with tempfile.TemporaryDirectory(prefix="prodready-bench-") as tmp:
        root = Path(tmp)
        log("rendering the default project and installing it with uv")
        python = project.install(project.render(root))
        with database.temporary_database() as url:
            db_url = database.asyncpg_url(url)
            log("migrating a fresh database; minting a token with dev-token")
            with ThreadPoolExecutor(2) as pool:  # two interpreter start-ups at once
                minting = pool.submit(project.dev_token, python, root, db_url, OWNER)
                project.migrate(python, root, db_url)
                token = minting.result()
            database.grow(url, OWNER, plan.growth_sizes[0])
            headers = {"Authorization": f"Bearer {token}"}
            apps = Apps(python, root, db_url, tuning)
            by_workers, growth = measure_all(plan, apps, url, headers, log)
        versions = project.package_versions(python)
    return {
        "label": plan.label,
        "date": date,
        "machine": machine.describe(load_before),
        "versions": {**versions, **machine.tool_versions()},
        "template": machine.template_revision(),
        "configuration": configuration(tuning),
        "plan": asdict(plan),
        "workers": by_workers,
        "growth": growth,
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def measure_all(
    plan: Plan, apps: Apps, url: str, headers: dict, log: Log
) -> tuple[list[dict], list[dict]]:
    """Every worker count, then data growth on the one-worker pair (growth changes the data,
    so one worker goes last; without one in the plan, growth gets a pair of its own)."""
    by_workers, growth = {}, None
    for workers in sorted(plan.workers, key=lambda n: (n == 1, n)):
        with running(apps.pair(workers)) as servers:
            by_workers[workers] = measure_workers(plan, servers, workers, headers, log)
            if workers == 1:
                growth = measure_growth(plan, servers, url, headers, log)
    if growth is None:
        with running(apps.pair(1)) as servers:
            for server in servers.values():
                server.start()
            growth = measure_growth(plan, servers, url, headers, log)
    return [by_workers[n] for n in sorted(by_workers)], growth


@contextmanager
def running(servers: dict[str, Server]) -> Iterator[dict[str, Server]]:
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def measure_workers(
    plan: Plan, servers: dict[str, Server], workers: int, headers: dict, log: Log
) -> dict:
    log(f"workers={workers}: booting both apps ({plan.boots}x each)")
    for server in servers.values():
        prime(server, plan, headers)
    boot = {name: median_boot(server, plan.boots) for name, server in servers.items()}
    rss = {name: idle_rss_mb(server, plan, headers) for name, server in servers.items()}
    warm_up(servers, plan, headers)
    points = []
    for path in plan.endpoints.values():
        for connections in plan.connections:
            log(f"workers={workers}: {path} at {connections} connections")
            points.append(
                {"endpoint": path, "connections": connections}
                | compare(servers, path, connections, plan, headers)
            )
    log(f"workers={workers}: {plan.concurrent_reads} concurrent reads")
    notes = plan.endpoints["notes"]
    concurrent = {"endpoint": notes, "connections": plan.concurrent_reads} | compare(
        servers, notes, plan.concurrent_reads, plan, headers
    )
    return {
        "workers": workers,
        "boot_s": difference(boot),
        "idle_rss_mb": difference(rss),
        "endpoints": points,
        "concurrent_reads": concurrent,
    }


def measure_growth(
    plan: Plan, servers: dict[str, Server], url: str, headers: dict, log: Log
) -> list[dict]:
    """The notes list, one worker, as the rows of other principals grow."""
    path, connections = plan.endpoints["notes"], plan.growth_connections
    rows = []
    for size in plan.growth_sizes:
        log(f"growth: {size} rows of other principals")
        database.grow(url, OWNER, size)
        warm_up(servers, plan, headers)
        rows.append(
            {
                "other_rows": size,
                "total_rows": database.count_rows(url),
                "connections": connections,
                "query": database.explain(url, OWNER),
            }
            | compare(servers, path, connections, plan, headers)
        )
    return rows


def configuration(tuning: project.Tuning) -> dict:
    shown = project.generated_env("postgresql+asyncpg://…", 0, 0, tuning)
    hidden = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PORT", "WORKERS", "JWT_SECRET"}
    return {
        "generated": {k: v for k, v in shown.items() if k not in hidden}
        | {"JWT_SECRET": "(random per run)"},
        "bare": "bench/bare_app.py: same pool settings, no auth/limits/logging middleware",
        "tuning": asdict(tuning),
        "token": "python -m acme_orders dev-token (HS256 with JWT_SECRET)",
    }
