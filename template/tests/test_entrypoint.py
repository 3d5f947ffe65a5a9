"""`python -m <package>` as a real process: it serves, and SIGTERM shuts it down cleanly."""

import json
import signal

from .conftest import (
    LOCAL,
    PROJECT_ROOT,
    free_port,
    run_entrypoint,
    service_env,
    start_service,
    wait_for_port,
)

SHUTDOWN_TIMEOUT = 5


def test_serves_then_drains_and_exits_zero_on_sigterm() -> None:
    port = free_port()
    env = service_env(PORT=str(port), SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT))
    process = start_service(env, "serve")
    try:
        wait_for_port(process, port)
        assert LOCAL.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        assert LOCAL.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=SHUTDOWN_TIMEOUT + 10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
    assert "startup complete" in events
    assert any(event.startswith("shutdown started") for event in events)
    assert "resources closed" in events
    assert events[-1] == "exit"
    assert "Traceback" not in output


def test_healthcheck_command_reflects_the_server() -> None:
    port = free_port()
    env = service_env(PORT=str(port))
    assert run_entrypoint(env, PROJECT_ROOT, "healthcheck").returncode == 1  # nothing listens
    server = start_service(env, "serve")
    try:
        wait_for_port(server, port)
        assert run_entrypoint(env, PROJECT_ROOT, "healthcheck").returncode == 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=SHUTDOWN_TIMEOUT + 20)
