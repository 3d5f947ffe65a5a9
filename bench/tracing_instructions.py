"""Instructions per request with everything off, metrics on, tracing on at 100% and on at
10%: a count that does not move with the machine's load, where CPU time moves by ±10%
between runs.

`uv run python -m bench.tracing_instructions` (from the template's root) renders the
default project, migrates a fresh database and runs this file with the project's
interpreter under callgrind:
    valgrind --tool=callgrind --dump-before=getppid --callgrind-out-file=OUT.%p \\
        .venv/bin/python bench/tracing_instructions.py OUT
then reports (`... OUT report`). Needs valgrind (Debian's package).
Each batch is bracketed by two getppid() calls, and callgrind dumps its counters at each:
the dump between two brackets is exactly that batch's instructions, on every thread of
the process (the span exporter's included: each tracing batch ends by flushing it). The
OTLP receiver runs in a process of its own, so its work is not counted. The apps (one
per set-up, as bench/tracing_cost.py has them) are called straight through ASGI, batches
alternated.
"""

import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BATCH = int(os.environ.get("BATCH", 200))
BATCHES = int(os.environ.get("BATCHES", 3))
PATHS = ("/healthz", "/notes?limit=10")


def bracket() -> None:
    """A dump point for callgrind (--dump-before=getppid)."""
    os.getppid()


async def measure(out: Path) -> None:
    sys.path.insert(0, str(Path.cwd()))
    sys.path.insert(0, str(BENCH))
    from acme_orders.app import create_app
    from acme_orders.platform.logs import configure_logging
    from acme_orders.platform.tracing import add_trace_ids
    from acme_orders.settings import load_settings
    from otlp_sink import tracing_setups  # beside this script
    from tracing_cpu import call

    from tests.credentials import TEST_AUTH_ENV, headers_for

    serve = "import otlp_sink, time; print(otlp_sink.start_receiver(), flush=True); time.sleep(1e6)"
    receiver = subprocess.Popen(
        [sys.executable, "-c", serve],
        cwd=BENCH,
        stdout=subprocess.PIPE,
        text=True,
    )
    endpoint = receiver.stdout.readline().strip()
    os.environ.update(TEST_AUTH_ENV)
    os.environ.update({"ENVIRONMENT": "test", "RATE_LIMIT_ENABLED": "false", "LOG_LEVEL": "INFO"})
    setups = tracing_setups(endpoint)
    setups = {"off": setups.pop("off"), "metrics on": {"METRICS_PORT": "9464"}, **setups}
    variants = {
        name: {variable.lower(): value for variable, value in overrides.items()}
        for name, overrides in setups.items()
    }
    stdout, sys.stdout = sys.stdout, Path(os.devnull).open("w")  # noqa: SIM115 (log lines)
    apps = {name: create_app(load_settings(**found)) for name, found in variants.items()}
    headers = [(b"host", b"localhost")] + [
        (name.lower().encode(), value.encode()) for name, value in headers_for("alice").items()
    ]
    contexts = {name: app.router.lifespan_context(app) for name, app in apps.items()}
    states = {name: await context.__aenter__() for name, context in contexts.items()}
    order: list[tuple[str, str]] = []  # (set-up, path) of each bracketed batch, in order
    for path in PATHS:
        for name, app in apps.items():  # warm-up
            for _ in range(10):
                assert await call(app, states[name], path, headers) == 200
        for batch in range(BATCHES):
            names = list(apps)[batch % len(apps) :] + list(apps)[: batch % len(apps)]
            for name in names:
                configure_logging(
                    level="INFO", json=True, context=[add_trace_ids] if name != "off" else []
                )
                traces = apps[name].state.traces
                bracket()
                for _ in range(BATCH):
                    await call(apps[name], states[name], path, headers)
                if traces is not None:
                    traces.provider.force_flush()
                bracket()
                order.append((name, path))
    for context in contexts.values():
        await context.__aexit__(None, None, None)
    receiver.kill()
    sys.stdout = stdout
    out.write_text("\n".join(f"{name}\t{path}" for name, path in order) + "\n")


def report(out: Path) -> None:
    """Pair each batch with its dump: dumps come two per batch, the second of each pair
    holding the batch (the first, what ran between batches)."""
    order = [line.split("\t") for line in out.read_text().splitlines()]
    numbered = re.compile(re.escape(out.name) + r"\.\d+\.(\d+)$")  # OUT.<pid>.<dump>
    dumps = sorted(
        (p for p in out.parent.iterdir() if numbered.match(p.name)),
        key=lambda p: int(numbered.match(p.name).group(1)),  # type: ignore[union-attr]
    )
    totals = []
    for dump in dumps:
        match = re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.MULTILINE)
        if match:
            totals.append(int(match.group(1)))
    # Dump 1 is everything before the first bracket; then (batch, between) alternate.
    batches = totals[1 : 1 + 2 * len(order) : 2]
    figures: dict[tuple[str, str], list[float]] = {}
    for (name, path), total in zip(order, batches, strict=True):
        figures.setdefault((name, path), []).append(total / BATCH)
    say(f"instructions per request (callgrind), medians of {BATCHES} batches of {BATCH}")
    base = {path: statistics.median(figures[("off", path)]) for path in PATHS}
    for name in dict.fromkeys(name for name, _ in order):
        cells = []
        for path in PATHS:
            value = statistics.median(figures[(name, path)])
            cells.append(f"{path}: {value / 1000:,.0f} k ({value / base[path] - 1:+.1%})")
        say(f"{name:10s} " + "  ".join(cells))


def say(line: str) -> None:
    sys.stdout.write(line + "\n")


def main() -> None:
    """Render and install the default project, migrate a fresh database, count, report."""
    from . import database, project

    with tempfile.TemporaryDirectory(prefix="prodready-instructions-") as tmp:
        root = Path(tmp)
        say("rendering and installing the default project")
        python = project.install(project.render(root))
        with database.temporary_database() as url:
            db_url = database.asyncpg_url(url)
            project.migrate(python, root, db_url)
            out = root / "callgrind"
            say("counting under callgrind (a few minutes)")
            subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    "--dump-before=getppid",
                    f"--callgrind-out-file={out}.%p",
                    str(python),
                    __file__,
                    str(out),
                ],
                cwd=root / project.PROJECT_DIR,
                env={**project.base_env(), "DATABASE_URL": db_url, "ENVIRONMENT": "test"},
                capture_output=True,
                check=True,
            )
            report(out)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        main()
    elif len(sys.argv) > 2 and sys.argv[2] == "report":
        report(Path(sys.argv[1]))
    else:
        asyncio.run(measure(Path(sys.argv[1])))
