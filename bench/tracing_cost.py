"""`uv run python -m bench.tracing_cost`: what traces and metrics cost the default render,
one worker.

Four servers of the same render side by side: everything off, metrics on (METRICS_PORT),
tracing on at 100% and on at 10% (`parentbased_traceidratio`), the last two exporting to a
local OTLP/HTTP receiver in this process that reads and acknowledges every batch. Each
round drives every server in turn with wrk (the order rotates each round; medians
reported): `/healthz` and the authenticated
notes list at 64 connections. Boot to first 200 (median of three starts) and idle RSS after
a warm-up are taken for each. Prints a table; figures, never verdicts.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import database, project
from .load import run_wrk
from .otlp_sink import start_receiver, tracing_setups
from .plan import ENDPOINTS, OWNER
from .servers import Server, free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    setups = tracing_setups(start_receiver())
    # Metrics beside them (a listener of their own): the table has both.
    configs = {"off": setups.pop("off"), "metrics on": {"METRICS_PORT": str(free_port())}}
    configs.update(setups)
    with tempfile.TemporaryDirectory(prefix="prodready-tracing-") as tmp:
        root = Path(tmp)
        say("rendering and installing the default project")
        python = project.install(project.render(root))
        with database.temporary_database() as url:
            db_url = database.asyncpg_url(url)
            project.migrate(python, root, db_url)
            token = project.dev_token(python, root, db_url, OWNER)
            database.grow(url, OWNER, 1_000)
            headers = {"Authorization": f"Bearer {token}"}
            servers = {}
            for name, extra in configs.items():
                env = project.generated_env(db_url, free_port(), 1, project.Tuning())
                servers[name] = Server(
                    name,
                    project.generated_command(python),
                    env={**env, **extra},
                    cwd=root / project.PROJECT_DIR,
                    log=root / f"{name.replace(' ', '').replace(',', '-')}.log",
                )
            table = measure(servers, headers, args)
    print_table(table, args)


def measure(servers: dict[str, Server], headers: dict[str, str], args: argparse.Namespace) -> dict:
    table: dict[str, dict] = {name: {"boot": [], "runs": {}} for name in servers}
    for _ in range(3):  # boots, alternating
        for name, server in servers.items():
            table[name]["boot"].append(server.start())
            server.stop()
    for server in servers.values():
        server.start()
    try:
        for name, server in servers.items():  # warm-up, then idle RSS
            for path in ENDPOINTS.values():
                run_wrk(url(server, path), connections=16, seconds=2, headers=headers)
            time.sleep(1.0)
            table[name]["rss_mb"] = server.rss_bytes() / 1e6
        names = list(servers)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for endpoint, path in ENDPOINTS.items():
                for name in order:
                    run = run_wrk(
                        url(servers[name], path),
                        connections=args.connections,
                        seconds=args.seconds,
                        headers=headers,
                    )
                    table[name]["runs"].setdefault(endpoint, []).append(run)
                    servers[name].drain(path, headers)
            say(f"round {round_ + 1}/{args.rounds} done")
    finally:
        for server in servers.values():
            server.stop()
    return table


def url(server: Server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def print_table(table: dict, args: argparse.Namespace) -> None:
    say(f"\n{args.rounds} rounds x {args.seconds} s, {args.connections} connections, medians")
    say(
        "| tracing | /healthz req/s | /healthz p99 ms | notes req/s | notes p99 ms "
        "| boot s | idle RSS MB |"
    )
    say("|---|---|---|---|---|---|---|")
    for name, row in table.items():
        cells = [name]
        for endpoint in ENDPOINTS:
            runs = row["runs"][endpoint]
            cells.append(f"{statistics.median(r['rps'] for r in runs):.0f}")
            cells.append(f"{statistics.median(r['p99_ms'] for r in runs):.1f}")
        cells.append(f"{statistics.median(row['boot']):.2f}")
        cells.append(f"{row['rss_mb']:.1f}")
        say("| " + " | ".join(cells) + " |")
    for name, row in table.items():
        for endpoint in ENDPOINTS:
            rates = [round(r["rps"]) for r in row["runs"][endpoint]]
            errors = sum(r["errors"] + r["non_2xx"] + r["timeouts"] for r in row["runs"][endpoint])
            say(f"{name} {endpoint}: req/s per round {rates}, errors+non-2xx {errors}")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
