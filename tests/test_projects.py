"""Each distinct service variant: install it and boot it as a real process; each distinct
service source: run its own test suite.

Variants that differ only in `python_version` run byte-identical code and tests, so a
project's own suite runs once per source, on interpreters taken in turn so every Python
version runs some (`one_per_source` in conftest.py); every variant still installs, imports
everything it serves, boots, answers its probes and shuts down on its own interpreter.
Two sources' suites run in test_agents.py instead, as AGENTS.md's `uv run pytest` on the
rendered tree (`assistant_runners` in conftest.py): running them here too would repeat them.
"""

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx2
import pytest

from . import credentials
from .conftest import Project
from .service import free_port, running

SHUTDOWN_TIMEOUT = 5


@pytest.mark.per_source
@pytest.mark.not_on_assistant_runners
@pytest.mark.stage_tested
def test_own_test_suite_passes(variant: Project) -> None:
    result = variant.run(str(variant.python), "-m", "pytest", "-q", "-p", "no:cacheprovider")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


@pytest.mark.stage_booted
def test_boots_answers_health_and_shuts_down_cleanly(variant: Project, tmp_path: Path) -> None:
    if variant.rendered.answers["database"] != "none":  # the release step comes first
        migrated = variant.run(str(variant.python), "-m", "acme_orders", "migrate", timeout=120)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    env = {**variant.env, "SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT)}
    log = tmp_path / "server.log"
    with running(variant.python, variant.path, env, output=log) as (base, process):
        assert httpx2.get(f"{base}/healthz", timeout=5).status_code == 200
        ready = httpx2.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        expected = (
            {"database:responsive"} if variant.rendered.answers["database"] != "none" else set()
        )
        if variant.rendered.answers["redis"]:
            expected.add("redis:responsive")
        assert set(ready.json()["checks"]) == expected
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        process.wait(timeout=SHUTDOWN_TIMEOUT + 10)
        elapsed = time.monotonic() - started
    output = log.read_text()
    assert process.returncode == 0, output
    assert elapsed < SHUTDOWN_TIMEOUT + 5, output
    events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
    for expected_event in ("startup complete", "resources closed", "exit"):
        assert expected_event in events, output
    assert any(event.startswith("shutdown started") for event in events), output
    assert "Traceback" not in output


@pytest.mark.per_source
def test_missing_configuration_stops_before_binding(variant: Project, tmp_path: Path) -> None:
    port = free_port()
    answers = variant.rendered.answers
    required = ["ENVIRONMENT"]
    required += ["DATABASE_URL"] if answers["database"] != "none" else []
    required += ["REDIS_URL"] if answers["redis"] else []
    required += credentials.required(answers["auth"])
    env = {k: v for k, v in variant.env.items() if k not in required}
    env["PORT"] = str(port)
    result = subprocess.run(
        [str(variant.python), "-m", "acme_orders", "serve"],
        cwd=tmp_path,  # no .env file to fall back on
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78
    for name in required:
        assert f"  {name}: missing" in result.stderr
    assert f"{len(required)} problem(s)" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.per_source
@pytest.mark.databases("postgresql")
@pytest.mark.exercises("database")
def test_readiness_fails_fast_and_liveness_holds_when_postgres_hangs(variant: Project) -> None:
    with socket.socket() as silent:  # accepts connections, never answers: a hung database
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        hung = f"postgresql://app:pw@127.0.0.1:{silent.getsockname()[1]}/app"
        env = {**variant.env, "DATABASE_URL": hung, "READINESS_TIMEOUT": "1"}
        with running(variant.python, variant.path, env) as (base, _):
            started = time.monotonic()
            ready = httpx2.get(f"{base}/readyz", timeout=10)
            elapsed = time.monotonic() - started
            assert ready.status_code == 503
            assert ready.json()["checks"]["database:responsive"][0]["output"] == "TimeoutError"
            assert elapsed < 2.5, f"readiness took {elapsed:.1f}s with a 1s check timeout"
            assert httpx2.get(f"{base}/healthz", timeout=5).status_code == 200
