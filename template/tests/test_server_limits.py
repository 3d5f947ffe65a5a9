"""The server's limits on slow, huge and numerous clients, against the real server process
(platform/http_limits.py, platform/concurrency.py), with small limits so it runs fast.

Each case is what a careless or hostile client does; each fails without its guard.
"""

import contextlib
import http.client
import json
import re
import resource
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .conftest import LOCAL, free_port, run_entrypoint, service_env, start_service, wait_for_port
from .credentials import headers_for

LIMITS = {
    "MAX_HEADER_BYTES": "8192",
    "MAX_HEADER_COUNT": "20",
    "HEADER_TIMEOUT": "0.5",
    "BODY_IDLE_TIMEOUT": "0.5",
    "BODY_MIN_RATE": "100",
    "KEEP_ALIVE_TIMEOUT": "1",
    "MAX_CONCURRENCY": "2",
    "RATE_LIMIT_ENABLED": "false",
}
CLOSED_WITHIN = 3.0  # seconds, for timeouts of 0.5-1 s: a loaded machine fires timers late
AUTHORIZATION = "".join(f"{name}: {value}\r\n" for name, value in headers_for("alice").items())
MB = 1024 * 1024
PROBES = ("/healthz", "/readyz")


@dataclass
class Server:
    port: int
    process: subprocess.Popen[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def serve(
    extra: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None
) -> Iterator[Server]:
    port = free_port()
    env = service_env(PORT=str(port), **{**LIMITS, **(extra or {})})
    process = start_service(env, "serve", preexec_fn=preexec_fn)
    try:
        wait_for_port(process, port)
        yield Server(port, process)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield from serve()


def request_head(path: str = "/healthz", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{AUTHORIZATION}{extra}\r\n".encode()


def send_and_read(server: Server, data: bytes) -> tuple[http.client.HTTPResponse, bytes]:
    with server.connect() as sock:
        with contextlib.suppress(OSError):  # refused mid-send: the answer is on its way
            sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response, response.read()


def healthz_within_a_second(server: Server) -> None:
    response = LOCAL.get(f"{server.base}/healthz", timeout=1)
    assert response.status_code == 200


HEADS = [
    ("a 6 KB header, within both limits", request_head(extra=f"X-Token: {'a' * 6000}\r\n"), 200),
    ("a 1 MB header", request_head(extra=f"X-Big: {'a' * MB}\r\n"), 431),
    ("a 9 KB URL", request_head(path=f"/healthz?{'a' * 9000}"), 431),
    ("30 header fields", request_head(extra="".join(f"X-{i}: v\r\n" for i in range(30))), 431),
    (
        "100 000 header fields",
        request_head(extra="".join(f"X-{i}: v\r\n" for i in range(100_000))),
        431,
    ),
]


@pytest.mark.parametrize(("data", "status"), [c[1:] for c in HEADS], ids=[c[0] for c in HEADS])
def test_a_request_head_over_the_limits_gets_431(server: Server, data: bytes, status: int) -> None:
    response, body = send_and_read(server, data)
    assert response.status == status
    if status == 431:
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.headers["Connection"] == "close"
        problem = json.loads(body)
        assert problem["status"] == 431
        # The app never saw it: the server's answer still carries an id, in the body too.
        assert problem["request_id"] == response.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", problem["request_id"])
    healthz_within_a_second(server)


def test_a_client_that_sends_a_whole_huge_head_before_reading_still_reads_the_431(
    server: Server,
) -> None:
    """http.client writes all 16 MB, then reads: the server drops the excess after answering,
    instead of resetting the connection under the unread answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", "/healthz", headers={"X-Big": "a" * (16 * MB)})
        response = connection.getresponse()
        assert response.status == 431
        assert json.loads(response.read())["status"] == 431
    finally:
        connection.close()


def rss_bytes(pid: int) -> int:
    """The resident memory of process `pid` (the worker: with WORKERS=1, the server itself)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def send_huge_header(server: Server, size: int, seconds: float) -> None:
    """Send a header of `size` bytes, until the server cuts it off or `seconds` pass."""
    chunk = b"a" * MB
    deadline = time.monotonic() + seconds
    with server.connect() as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: ")
            for _ in range(size // MB):
                if time.monotonic() > deadline:
                    return
                sock.sendall(chunk)
        except OSError:
            return


def test_four_100_mb_headers_neither_grow_the_worker_nor_block_the_probes(
    server: Server,
) -> None:
    healthz_within_a_second(server)
    before = rss_bytes(server.process.pid)
    peak = before
    senders = [
        threading.Thread(target=send_huge_header, args=(server, 100 * MB, 10)) for _ in range(4)
    ]
    for sender in senders:
        sender.start()
    while any(sender.is_alive() for sender in senders):
        healthz_within_a_second(server)
        peak = max(peak, rss_bytes(server.process.pid))
        time.sleep(0.05)
    peak = max(peak, rss_bytes(server.process.pid))
    assert peak - before < 50 * MB, f"the worker grew by {(peak - before) / MB:.0f} MB"


def wait_for_close(sock: socket.socket, nudge: Callable[[], None] | None = None) -> bytes:
    """Everything the server sends until it closes; `nudge` runs every 0.2 s meanwhile."""
    received = b""
    deadline = time.monotonic() + CLOSED_WITHIN
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], min(0.2, left))
        if not readable:
            if nudge is not None:
                nudge()
            continue
        try:
            data = sock.recv(65_536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data
    raise AssertionError(f"still open after {CLOSED_WITHIN} s; received {received[:200]!r}")


def drip(sock: socket.socket) -> Callable[[], None]:
    """Send a request head one byte at a time, never finishing it."""
    head = iter(request_head(extra=f"X-Slow: {'a' * 1000}\r\n"))

    def nudge() -> None:
        sock.send(bytes([next(head)]))

    return nudge


def stalled_body(sock: socket.socket) -> None:
    sock.sendall(
        b"POST /_test/echo HTTP/1.1\r\nHost: test\r\n"
        + AUTHORIZATION.encode()
        + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        + b'{"text": "'
    )


def body_drip(sock: socket.socket) -> Callable[[], None]:
    """Send a request body a byte at a time: it never stalls, it only never ends."""
    sock.sendall(
        b"POST /_test/echo HTTP/1.1\r\nHost: test\r\n"
        + AUTHORIZATION.encode()
        + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    )

    def nudge() -> None:
        sock.send(b" ")

    return nudge


def answered_then_idle(sock: socket.socket) -> None:
    sock.sendall(request_head())
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 200
    response.read()


# (name, what the client does first, what it does every 0.2 s, how the answer starts)
SLOW = [
    ("a connection that never sends", None, None, b""),
    ("headers dripping a byte every 0.2 s", None, drip, b"HTTP/1.1 408 "),
    ("a body stalled halfway", stalled_body, None, b"HTTP/1.1 408 "),
    ("a body dripping a byte every 0.2 s", None, body_drip, b"HTTP/1.1 408 "),
    ("a kept-alive connection left idle", answered_then_idle, None, b""),
]


@pytest.mark.parametrize(
    ("start", "every", "answer"), [c[1:] for c in SLOW], ids=[c[0] for c in SLOW]
)
def test_slow_and_idle_clients_are_disconnected(
    server: Server,
    start: Callable[[socket.socket], None] | None,
    every: Callable[[socket.socket], Callable[[], None]] | None,
    answer: bytes,
) -> None:
    with server.connect() as sock:
        if start is not None:
            start(sock)
        received = wait_for_close(sock, every(sock) if every else None)
    assert received.startswith(answer), received[:200]
    if answer:
        assert b"application/problem+json" in received
    healthz_within_a_second(server)


def test_past_max_concurrency_requests_get_503_and_the_probes_still_pass(server: Server) -> None:
    auth = headers_for("alice")
    sleep = f"{server.base}/_test/sleep"
    outcomes: list[int | str] = []
    probes: list[httpx.Response] = []
    for _ in range(3):
        # Two requests hold their slots for 6 s; a third must get 503 meanwhile. A holder
        # cut before it held one (on a starved machine, its thread sent its head after
        # HEADER_TIMEOUT) proves nothing either way: try again.
        with ThreadPoolExecutor(2) as pool:
            holders = [
                pool.submit(LOCAL.get, sleep, params={"seconds": 6}, headers=auth, timeout=10)
                for _ in range(2)
            ]
            busy = None
            while busy is None and not all(holder.done() for holder in holders):
                answer = LOCAL.get(sleep, params={"seconds": 0}, headers=auth)
                busy = answer if answer.status_code == 503 else None
                time.sleep(0.05)
            if busy is not None:  # both slots taken: the probes are exempt
                probes = [LOCAL.get(f"{server.base}{path}", timeout=1) for path in PROBES]
            outcomes = [held(holder) for holder in holders]
        assert busy is not None or outcomes != [200, 200], "two requests held, a third served"
        if busy is not None:
            break
    assert busy is not None, f"the two holders never held their slots: {outcomes}"
    assert outcomes == [200, 200], outcomes
    assert [probe.status_code for probe in probes] == [200, 200]
    assert busy.headers["content-type"] == "application/problem+json"
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["status"] == 503
    assert busy.headers["x-request-id"] == busy.json()["request_id"]
    assert LOCAL.get(sleep, params={"seconds": 0}, headers=auth).status_code == 200


def held(holder: Future[httpx.Response]) -> int | str:
    """A holder's status, or what cut it."""
    try:
        return holder.result().status_code
    except httpx.HTTPError as error:
        return type(error).__name__


def is_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


def test_500_silent_connections_never_lock_the_probes_out() -> None:
    """Open files 128, of a hard limit of 256: raised to 256 at start, three quarters of it
    for connections (192); past that the connection idle the longest is closed."""

    def limit_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 256))

    servers = serve({"HEADER_TIMEOUT": "60"}, preexec_fn=limit_open_files)
    server = next(servers)
    sockets = [server.connect() for _ in range(500)]  # connected, never a byte sent
    try:
        healthz_within_a_second(server)  # accepted after all 500
        time.sleep(0.2)
        still_open = sum(is_open(sock) for sock in sockets)
        assert 128 < still_open < 500, f"{still_open} of 500 still open"
    finally:
        for sock in sockets:
            sock.close()
        next(servers, None)


def test_invalid_limits_stop_the_start_each_by_name(tmp_path: Path) -> None:
    invalid = {
        "MAX_HEADER_BYTES": "1000",
        "HEADER_TIMEOUT": "0",
        "MAX_CONNECTIONS": "100",
        "MAX_CONCURRENCY": "200",
    }
    result = run_entrypoint(service_env(**invalid), tmp_path, "check-config")
    assert result.returncode == 78, result.stderr
    for message in (
        "MAX_HEADER_BYTES: Input should be greater than or equal to 4096",
        "HEADER_TIMEOUT: Input should be greater than 0",
        "MAX_CONCURRENCY: must not exceed MAX_CONNECTIONS (100)",
    ):
        assert message in result.stderr
