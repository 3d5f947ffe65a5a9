"""What both tracing benchmarks share: a local OTLP/HTTP receiver that acknowledges every
export, and the three set-ups they compare (off, on at 100 %, on at 10 %).

Standard library only: bench/tracing_cpu.py imports it from a generated project's
interpreter.
"""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver(BaseHTTPRequestHandler):
    """Reads each export and answers 200 with an empty ExportTraceServiceResponse."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


def start_receiver() -> str:
    """The endpoint of a receiver running in a daemon thread, for OTEL_EXPORTER_OTLP_ENDPOINT."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def tracing_setups(endpoint: str) -> dict[str, dict[str, str]]:
    """Each set-up's settings, as environment variables."""
    return {
        "off": {},
        "on, 100%": {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
        "on, 10%": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
    }
