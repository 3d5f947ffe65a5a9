"""Run uvicorn the production way: uvloop, httptools, bounded graceful shutdown.

The subclass only adds log lines; signal handling, draining and worker
supervision are uvicorn's own.
"""

import signal
from types import FrameType

import structlog
import uvicorn
from uvicorn.supervisors import multiprocess

from .settings import Settings

log = structlog.get_logger(__name__)


class Server(uvicorn.Server):
    """uvicorn.Server that says when and why it shuts down, and how much is in flight."""

    received_signal: str | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler must not log (it may interrupt a log call); shutdown() does.
        self.received_signal = self.received_signal or signal.Signals(sig).name
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        log.info(
            "shutdown started: no new connections, draining in-flight requests",
            signal=self.received_signal,
            in_flight=len(self.server_state.tasks),
            connections=len(self.server_state.connections),
            timeout_s=self.config.timeout_graceful_shutdown,
        )
        await super().shutdown(sockets)


class WorkerProcess(multiprocess.Process):
    """A uvicorn worker that runs Server, so each worker logs its own drain."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = Server(config=self.config)
        return self._server


class Supervisor(multiprocess.Multiprocess):
    """uvicorn's worker supervisor; it forwards SIGTERM and each worker drains itself.

    Workers it starts first run Server; one it restarts after a crash runs
    uvicorn's own, which drains the same way with fewer log lines.
    """

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = WorkerProcess(self.config, self.sockets)
            process.start()
            self.processes.append(process)


def serve(settings: Settings, app: str) -> None:
    config = uvicorn.Config(
        app,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,  # logging is configured by logs.py, in this process and each worker
        access_log=False,  # AccessLogMiddleware writes the access line
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        server_header=False,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = Server(config)

    def after_uvicorn(sig: int, _frame: FrameType | None) -> None:
        # uvicorn puts this handler back once it has drained and re-raises the signal
        # into it: a graceful shutdown then ends with status 0, not death by signal.
        # A signal that arrives before uvicorn has taken over stops start-up instead.
        if not server.started:
            raise SystemExit(128 + sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, after_uvicorn)
    if config.workers > 1:
        Supervisor(config, sockets=[config.bind_socket()]).run()
    else:
        server.run()
    log.info("server exited", signal=server.received_signal)
