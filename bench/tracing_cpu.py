"""CPU time per request with tracing off, on at 100% and on at 10%, in one process.

Run with a rendered default project's interpreter, from its root, with its test settings
(DATABASE_URL of a migrated database):
    .venv/bin/python /path/to/bench/tracing_cpu.py
Three apps of the same render, their lifespans open, are called straight through ASGI on
one event loop; batches alternate between them and the medians of the per-batch CPU time
per request are printed. Process CPU time includes the exporting thread's work. Spans go
to a local receiver that acknowledges every batch. Load on the machine moves wall-clock
rates; CPU time per request moves far less.
"""

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from otlp_sink import start_receiver, tracing_setups  # beside this script

BATCH = 200
BATCHES = 25


async def call(app, state: dict, path: str, headers: list) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path.split("?")[0],
        "raw_path": path.split("?")[0].encode(),
        "query_string": path.partition("?")[2].encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": dict(state),
    }
    status = 0

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def main() -> None:
    from acme_orders.app import create_app
    from acme_orders.platform.logs import configure_logging
    from acme_orders.platform.tracing import add_trace_ids
    from acme_orders.settings import load_settings

    from tests.credentials import TEST_AUTH_ENV, headers_for

    os.environ.update(TEST_AUTH_ENV)
    os.environ.update({"ENVIRONMENT": "test", "RATE_LIMIT_ENABLED": "false", "LOG_LEVEL": "INFO"})
    variants = {
        name: {variable.lower(): value for variable, value in overrides.items()}
        for name, overrides in tracing_setups(start_receiver()).items()
    }
    out, sys.stdout = sys.stdout, Path(os.devnull).open("w")  # noqa: SIM115 (the log lines)
    settings = {name: load_settings(**overrides) for name, overrides in variants.items()}
    apps = {name: create_app(found) for name, found in settings.items()}
    headers = [(b"host", b"localhost")] + [
        (name.lower().encode(), value.encode()) for name, value in headers_for("alice").items()
    ]
    results: dict[str, dict[str, list[float]]] = {name: {} for name in apps}
    contexts = {name: app.router.lifespan_context(app) for name, app in apps.items()}
    states = {name: await context.__aenter__() for name, context in contexts.items()}
    for path in ("/healthz", "/notes?limit=10"):
        for name, app in apps.items():  # warm-up
            for _ in range(50):
                assert await call(app, states[name], path, headers) == 200
        for batch in range(BATCHES):
            order = list(apps)[batch % 3 :] + list(apps)[: batch % 3]
            for name in order:
                # Logging is configured per process: each app's, before its batch.
                configure_logging(
                    level="INFO",
                    json=True,
                    context=[add_trace_ids] if name != "off" else [],
                )
                started = time.process_time()
                for _ in range(BATCH):
                    await call(apps[name], states[name], path, headers)
                spent = time.process_time() - started
                results[name].setdefault(path, []).append(spent / BATCH * 1e6)
    for context in contexts.values():
        await context.__aexit__(None, None, None)
    sys.stdout = out
    say(f"CPU µs per request, medians of {BATCHES} batches of {BATCH}")
    for name, paths in results.items():
        cells = [f"{path}: {statistics.median(values):.0f}" for path, values in paths.items()]
        say(f"{name:10s} " + "  ".join(cells))


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
