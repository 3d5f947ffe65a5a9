"""Start a server process, time it to its first 200, weigh its process tree, stop it."""

import http.client
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"
BOOT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def get_status(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 5
) -> int | None:
    """The status of one GET, or None when nothing answers yet."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


class Server:
    """One server process (and its workers), its output in a log file."""

    def __init__(
        self, name: str, command: list[str], *, env: dict[str, str], cwd: Path, log: Path
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.cwd = cwd
        self.log = log
        self.port = int(env["PORT"])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; return the seconds from spawning to the first 200 from /healthz."""
        started = time.monotonic()
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        while time.monotonic() - started < BOOT_TIMEOUT_S:
            if get_status(self.port, "/healthz") == 200:
                return time.monotonic() - started
            if self.process.poll() is not None:
                break
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer /healthz; its log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def drain(self, path: str, headers: dict[str, str]) -> None:
        """Wait out the requests a load run left in flight: one more GET answers after them."""
        get_status(self.port, path, headers, timeout=60)

    def rss_bytes(self) -> int:
        """Resident memory of the process and every descendant (workers, helpers)."""
        assert self.process is not None
        return sum(_rss(pid) for pid in _tree(self.process.pid))

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
