"""Start a generated service as a real process, and stop it."""

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_listening(process: subprocess.Popen, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited early with {process.returncode}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"not listening on {port} after {timeout}s")


@contextlib.contextmanager
def running(
    python: Path,
    cwd: Path,
    env: dict[str, str],
    *,
    output: Path | None = None,
    module: str = "tests.serve",
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m MODULE serve` on a free port; yields (base URL, process).

    By default that is tests/serve.py: the project's own command line and server
    (platform/cli.py, server.py) serving the tests' app, the service plus tests/routes.py,
    which no build of the service has and which serves ENVIRONMENT=test only. `module=
    "acme_orders"` runs the service itself, in any environment.
    """
    port = free_port()
    sink = output.open("w") if output else subprocess.DEVNULL
    process = subprocess.Popen(
        [str(python), "-m", module, "serve"],
        cwd=cwd,
        env={**env, "PORT": str(port)},
        stdout=sink,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_listening(process, port)
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if output:
            sink.close()
