"""free_port (conftest.py): a port handed out for one server goes to no other until that
server listens, whichever process asks, and the server itself can listen on it. Without the
hold, two suites running side by side were handed one port and a test talked to the other
suite's server."""

import socket
import subprocess
import sys

import pytest

from .conftest import _held_ports, free_port, wait_for_port

PLAIN_BIND = "import socket, sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1])))"
LISTENER = (  # binds as uvicorn does: SO_REUSEADDR, then bind and listen
    "import socket, sys, time\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(30)"
)


@pytest.mark.skipif(sys.platform != "linux", reason="the port is held on Linux only")
def test_a_port_handed_out_is_kept_from_others_until_its_server_listens() -> None:
    port = free_port()
    # Another process's free_port binds without SO_REUSEADDR: refused while the port is held.
    taken = subprocess.run(
        [sys.executable, "-c", PLAIN_BIND, str(port)], capture_output=True, text=True, check=False
    )
    assert taken.returncode != 0
    assert "Address already in use" in taken.stderr
    with subprocess.Popen(
        [sys.executable, "-c", LISTENER, str(port)], stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            wait_for_port(server, port)
            assert port not in _held_ports, "released once its server listens"
        finally:
            server.kill()
    with socket.socket() as sock:  # free again for anyone once the server is gone
        sock.bind(("127.0.0.1", port))
