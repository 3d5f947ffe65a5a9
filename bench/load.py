"""The load generator: wrk, with a Lua reporter that prints one JSON line per run."""

import json
import shutil
import statistics
import subprocess
from pathlib import Path

REPORTER = Path(__file__).with_name("wrk_report.lua")
MARKER = "BENCH_JSON "
TIMEOUT_S = 10  # wrk's per-request timeout; slower answers count as timeouts


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk; .ci/run does it)")
    return found


def run_wrk(url: str, *, connections: int, seconds: int, headers: dict[str, str]) -> dict:
    """One wrk run: requests, req/s, p50/p99 in ms, socket errors and non-2xx answers."""
    command = [
        wrk_path(),
        f"-t{min(2, connections)}",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={TIMEOUT_S}s",
        "-s",
        str(REPORTER),
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    done = subprocess.run(
        [*command, url], capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(MARKER)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed on {url}: {done.stdout[-800:]}{done.stderr[-800:]}")
    raw = json.loads(line.removeprefix(MARKER))
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "errors": sum(raw[key] for key in ("connect_errors", "read_errors", "write_errors")),
        "timeouts": raw["timeouts"],
        "non_2xx": raw["non_2xx"],
    }


def combine(runs: list[dict]) -> dict:
    """Repeated runs of one point: medians of the rates and latencies, totals of the errors."""
    medians = {
        key: round(statistics.median(run[key] for run in runs), 3)
        for key in ("rps", "p50_ms", "p99_ms")
    }
    totals = {
        key: sum(run[key] for run in runs) for key in ("requests", "errors", "timeouts", "non_2xx")
    }
    return {
        **medians,
        "max_ms": max(run["max_ms"] for run in runs),
        **totals,
        "runs": len(runs),
    }
