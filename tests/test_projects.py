"""Each distinct service variant: install it, run its own tests, boot it as a real process."""

import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from .conftest import UV, create_database, drop_database, find_python, plan, uv_env
from .matrix import Rendered

SHUTDOWN_TIMEOUT = 5


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "installed" in metafunc.fixturenames:
        representatives = plan().representatives()
        if metafunc.definition.get_closest_marker("postgresql_only"):
            representatives = [r for r in representatives if r.answers["database"] == "postgresql"]
        metafunc.parametrize(
            "installed",
            [
                pytest.param(r, id=r.id, marks=pytest.mark.xdist_group(r.fingerprint))
                for r in representatives
            ],
            indirect=True,
            scope="session",
        )


@dataclass
class Project:
    rendered: Rendered
    path: Path
    env: dict[str, str]  # what the service needs to run: ENVIRONMENT and its services

    @property
    def python(self) -> Path:
        return self.path / ".venv" / "bin" / "python"

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout
        )


_installed: set[str] = set()


def install(rendered: Rendered) -> None:
    """uv sync, once per variant and process, on the interpreter its answer names."""
    if rendered.fingerprint in _installed:
        return
    python = find_python(rendered.answers["python_version"])
    result = subprocess.run(
        [UV, "sync", "--python", str(python), "--quiet"],
        cwd=rendered.path,
        env=uv_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    _installed.add(rendered.fingerprint)


@pytest.fixture(scope="session")
def installed(request: pytest.FixtureRequest) -> Rendered:
    install(request.param)
    return request.param


@pytest.fixture
def variant(
    installed: Rendered, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Project]:
    """The installed project with a fresh database (and the shared Redis) for one test."""
    answers = installed.answers
    env = {k: v for k, v in uv_env().items() if not k.startswith("UV_")}
    env.update(ENVIRONMENT="test", LOG_FORMAT="json")
    database = None
    if answers["database"] == "postgresql":
        postgres_admin = request.getfixturevalue("postgres_admin")
        database = f"prodready_{installed.fingerprint}_{next(_database_numbers)}_{os.getpid()}"
        env["DATABASE_URL"] = create_database(postgres_admin, database)
    elif answers["database"] == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{tmp_path}/app.db"
    if answers["redis"]:
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    yield Project(installed, installed.path, env)
    if database:
        drop_database(request.getfixturevalue("postgres_admin"), database)


_database_numbers = itertools.count()


@pytest.mark.stage_tested
def test_own_test_suite_passes(variant: Project) -> None:
    result = variant.run(str(variant.python), "-m", "pytest", "-q", "-p", "no:cacheprovider")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_listening(process: subprocess.Popen[str], port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited early with {process.returncode}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"not listening on {port} after {timeout}s")


@pytest.mark.stage_booted
def test_boots_answers_health_and_shuts_down_cleanly(variant: Project) -> None:
    port = free_port()
    env = {**variant.env, "PORT": str(port), "SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT)}
    process = subprocess.Popen(
        [str(variant.python), "-m", "acme_orders"],
        cwd=variant.path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_listening(process, port)
        base = f"http://127.0.0.1:{port}"
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
        output, _ = process.communicate(timeout=SHUTDOWN_TIMEOUT + 10)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert elapsed < SHUTDOWN_TIMEOUT + 5, output
    events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
    for expected_event in ("startup complete", "resources closed", "exit"):
        assert expected_event in events, output
    assert any(event.startswith("shutdown started") for event in events), output
    assert "Traceback" not in output


def test_missing_configuration_stops_before_binding(variant: Project, tmp_path: Path) -> None:
    port = free_port()
    answers = variant.rendered.answers
    required = ["ENVIRONMENT"]
    required += ["DATABASE_URL"] if answers["database"] != "none" else []
    required += ["REDIS_URL"] if answers["redis"] else []
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


@pytest.mark.postgresql_only
def test_readiness_fails_fast_and_liveness_holds_when_postgres_hangs(variant: Project) -> None:
    with socket.socket() as silent:  # accepts connections, never answers: a hung database
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        hung = f"postgresql://app:pw@127.0.0.1:{silent.getsockname()[1]}/app"
        port = free_port()
        env = {**variant.env, "PORT": str(port), "DATABASE_URL": hung, "READINESS_TIMEOUT": "1"}
        process = subprocess.Popen(
            [str(variant.python), "-m", "acme_orders"],
            cwd=variant.path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_listening(process, port)
            base = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            ready = httpx2.get(f"{base}/readyz", timeout=10)
            elapsed = time.monotonic() - started
            assert ready.status_code == 503
            assert ready.json()["checks"]["database:responsive"][0]["output"] == "TimeoutError"
            assert elapsed < 2.5, f"readiness took {elapsed:.1f}s with a 1s check timeout"
            assert httpx2.get(f"{base}/healthz", timeout=5).status_code == 200
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=SHUTDOWN_TIMEOUT + 10)
