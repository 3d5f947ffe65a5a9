"""The benchmark (bench/, README "Benchmark") cannot rot: its smoke mode runs end to end.

Only the shape of the results and their sanity are checked, never a speed: numbers
from a loaded CI machine say nothing about the service.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ENDPOINTS = {"/healthz", "/notes?limit=10"}
APPS = ("generated", "bare")
MEASURE_KEYS = {"rps", "p50_ms", "p99_ms", "max_ms", "requests", "errors", "timeouts", "non_2xx"}
TOP_KEYS = {"label", "date", "machine", "versions", "template", "configuration", "plan"}


def assert_point(point: dict) -> None:
    """Both apps answered every request of the load, and the numbers are plausible."""
    for app in APPS:
        measured = point[app]
        assert measured.keys() >= MEASURE_KEYS, (app, measured)
        assert measured["requests"] > 0, (app, measured)
        assert measured["rps"] > 0, (app, measured)
        assert 0 < measured["p50_ms"] <= measured["p99_ms"], (app, measured)
        assert measured["errors"] == measured["timeouts"] == measured["non_2xx"] == 0, measured
    assert set(point["ratio"]) == {"rps", "p50_ms", "p99_ms"}
    assert all(value > 0 for value in point["ratio"].values()), point["ratio"]


@pytest.mark.xdist_group("bench")
def test_smoke_benchmark_measures_both_apps_and_saves_every_field(tmp_path: Path) -> None:
    output = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"saved {output}" in done.stdout
    result = json.loads(output.read_text())

    assert TOP_KEYS | {"workers", "growth", "wall_seconds"} <= result.keys()
    assert result["label"] == "smoke"
    assert result["machine"]["cpus"] >= 1
    assert result["versions"]["uvicorn"]
    assert result["versions"]["wrk"].startswith("wrk")

    [run] = result["workers"]  # smoke: one worker
    assert run["workers"] == 1
    for name in ("boot_s", "idle_rss_mb"):
        assert min(run[name]["generated"], run[name]["bare"]) > 0, run[name]
        assert {"difference", "ratio"} <= run[name].keys()
    assert {point["endpoint"] for point in run["endpoints"]} == ENDPOINTS
    for point in run["endpoints"]:
        assert point["connections"] >= 1
        assert_point(point)
    assert run["concurrent_reads"]["connections"] == 200
    assert_point(run["concurrent_reads"])

    growth = result["growth"]
    assert len(growth) == 2
    assert growth[0]["other_rows"] < growth[1]["other_rows"]
    for step in growth:
        assert step["total_rows"] > step["other_rows"]
        assert step["query"]["index"], step["query"]
        assert step["query"]["execution_ms"] > 0
        assert_point(step)
