"""Start a generated service as a real process, and stop it."""

import contextlib
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
EPHEMERAL_FLOOR = 32768  # Linux's default; macOS and Windows start theirs at 49152
PORT_FLOOR = 20000


# Ports free_port handed out, still bound by this process: see free_port.
_held_ports: dict[int, socket.socket] = {}


def free_port() -> int:
    """A free port below the kernel's ephemeral range. bind(0) and every outgoing
    connection take their ports from that range, so with many servers and clients at once
    one of them took a port handed out here before its server could bind it; below the
    range, nothing but another explicit bind can.

    That bind can be another free_port's: this one in another xdist worker, or a generated
    project's own, in a suite running beside this test. Two handed out one port, and a test
    talked to the other's server. So the port stays bound here, not listening, until
    `wait_until_listening` sees the server listen: SO_REUSEADDR, set after the bind, lets the
    server (uvicorn, HAProxy and Prometheus set it too) listen on it on Linux, and no other
    free_port, which binds without it, can take it meanwhile."""
    ceiling = EPHEMERAL_FLOOR
    with contextlib.suppress(OSError, ValueError):  # Linux; elsewhere 32768 is below it
        ceiling = min(ceiling, int(Path(PORT_RANGE).read_text().split()[0]))
    for _ in range(100):
        port = random.randrange(PORT_FLOOR, ceiling) if ceiling > PORT_FLOOR else 0  # noqa: S311
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = sock.getsockname()[1]
        _held_ports[port] = sock
        return port
    raise RuntimeError("no free port below the ephemeral range")


def release_ports() -> None:
    """Give back the ports whose server never listened (or that were meant to stay closed)."""
    while _held_ports:
        _held_ports.popitem()[1].close()


def wait_until_listening(process: subprocess.Popen, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited early with {process.returncode}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:  # the server's: see free_port
                held = _held_ports.pop(port, None)
                if held is not None:
                    held.close()
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
