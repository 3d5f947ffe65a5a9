"""free_port (tests/service.py): a port handed out to one server is handed to no other
until that server listens, whichever process asks; the server itself can listen on it."""

import socket
import subprocess
import sys

from .service import _held_ports, free_port, wait_until_listening

PLAIN_BIND = "import socket, sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1])))"


def test_a_port_handed_out_is_kept_from_others_until_its_server_listens() -> None:
    port = free_port()
    # Another process's free_port binds without SO_REUSEADDR: refused while the port is held.
    taken = subprocess.run(
        [sys.executable, "-c", PLAIN_BIND, str(port)], capture_output=True, text=True, check=False
    )
    assert taken.returncode != 0
    assert "Address already in use" in taken.stderr
    # The server it was meant for (uvicorn sets SO_REUSEADDR) listens on it all the same.
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(30)",
            str(port),
        ]
    )
    try:
        wait_until_listening(server, port)
        assert port not in _held_ports, "released once its server listens"
    finally:
        server.kill()
        server.wait()
    with socket.socket() as sock:  # free again for anyone once the server is gone
        sock.bind(("127.0.0.1", port))
