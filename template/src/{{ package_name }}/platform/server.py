"""Run uvicorn the production way: uvloop, httptools with http_limits.py, a drain the LB sees.

On SIGTERM (or SIGINT) the server first keeps accepting and serving for
DRAIN_DELAY seconds while /readyz answers 503 "draining": an orchestrator
removes an instance from its endpoints only some time after sending SIGTERM,
and connections routed here meanwhile must still be served. Then uvicorn's own
shutdown runs: the listener closes (new connections are refused), in-flight
requests drain within SHUTDOWN_TIMEOUT, the lifespan closes every resource.
A second SIGTERM or SIGINT during the delay ends it at once; the drain stays
graceful. With WORKERS > 1 each worker does the same; the supervisor forwards
the signals and gives up its own copy of the listening socket, so the socket
stops listening (refusing, never resetting) once the last worker stops accepting.
Once started, the server freezes start-up's objects out of the garbage collector's sight.
"""

import asyncio
import gc
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

import structlog
import uvicorn
from uvicorn.supervisors import multiprocess

from .http_limits import LimitedHttpToolsProtocol
from .server_settings import ConnectionLimits, raise_open_files_limit
from .settings import PlatformSettings
from .state import DRAINING_SINCE

log = structlog.get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Config(uvicorn.Config):
    """uvicorn's Config plus the drain delay and connection limits, pickled into every worker."""

    def __init__(
        self, app: str, *, drain_delay: float, connection_limits: ConnectionLimits, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.drain_delay = drain_delay
        self.connection_limits = connection_limits


class Server(uvicorn.Server):
    """uvicorn.Server that drains in two steps and says when, why and how much is in flight."""

    received_signal: str | None = None
    in_drain_delay = False
    delay_ended_by: str | None = None

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        # Everything start-up built (modules, the app, its pools) lives as long as the
        # process: move it out of the collector's sight. A full collection then scans only
        # what requests allocate, instead of pausing every request for 100+ ms now and then.
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler must not log (it may interrupt a log call); the loop does.
        self.received_signal = self.received_signal or signal.Signals(sig).name
        if self.in_drain_delay:
            # The second stop signal ends the delay. Not passed to uvicorn, for which a second
            # SIGINT means "exit now, skip the drain and the lifespan shutdown".
            self.delay_ended_by = signal.Signals(sig).name
            return
        super().handle_exit(sig, frame)

    async def main_loop(self) -> None:
        await super().main_loop()  # returns once a signal has set should_exit
        if self.received_signal is not None:
            await self.drain_delay()

    async def drain_delay(self) -> None:
        """Keep accepting and serving while /readyz answers 503, for DRAIN_DELAY seconds.

        The listening sockets stay open and uvicorn's accept loop untouched: new
        connections are served exactly as before, only readiness changes.
        """
        delay: float = getattr(self.config, "drain_delay", 0.0)
        started = time.monotonic()
        self.lifespan.state[DRAINING_SINCE] = started
        log.info(
            "draining",
            delay_s=delay,
            signal=self.received_signal,
            in_flight=len(self.server_state.tasks),
            connections=len(self.server_state.connections),
        )
        self.in_drain_delay = True
        counter = 0
        try:
            while self.delay_ended_by is None and (left := started + delay - time.monotonic()) > 0:
                await asyncio.sleep(min(0.1, left))
                counter += 1
                await self.on_tick(counter)  # keeps the Date header fresh, as the main loop does
        finally:
            self.in_drain_delay = False
        if self.delay_ended_by is not None:
            log.info(
                "drain delay ended early",
                signal=self.delay_ended_by,
                after_s=round(time.monotonic() - started, 2),
            )

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
    uvicorn's own, which stops accepting at once (the other workers keep the
    shared socket served) and drains with fewer log lines.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        sockets: list[socket.socket],
        on_worker_exit: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(config, sockets)
        self.signals_to_forward: list[int] = []
        self.on_worker_exit = on_worker_exit
        self.worker_pids: set[int] = set()

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = WorkerProcess(self.config, self.sockets)
            process.start()
            self.processes.append(process)

    def keep_subprocess_alive(self) -> None:
        """uvicorn's restart of dead workers, then `on_worker_exit` for each one gone since
        the last poll (died, or replaced by a SIGHUP restart)."""
        super().keep_subprocess_alive()
        pids = {p.pid for p in self.processes if p.pid is not None}
        if self.on_worker_exit is not None:
            for pid in self.worker_pids - pids:
                self.on_worker_exit(pid)
        self.worker_pids = pids

    def handle_term(self) -> None:
        self.begin_exit(signal.SIGTERM, super().handle_term)

    def handle_int(self) -> None:
        self.begin_exit(signal.SIGINT, super().handle_int)

    def begin_exit(self, sig: int, handle: Callable[[], None]) -> None:
        if self.should_exit.is_set():  # a second stop signal in the same poll
            self.signals_to_forward.append(sig)
            return
        # The workers hold the shared listening socket through their drain delay. Were this
        # process's copy left open, the socket would go on listening after the last worker
        # stopped accepting: the kernel would complete handshakes nobody accepts, and reset
        # them at exit. Closed here, the socket stops listening with the last worker.
        for sock in self.sockets:
            sock.close()
        handle()  # uvicorn's: log it and exit the loop; terminate_all() sends SIGTERM

    def join_all(self) -> None:
        """Wait for the workers, passing on a second SIGTERM or SIGINT: it ends their delay."""
        while alive := [p.process.sentinel for p in self.processes if p.process.is_alive()]:
            while self.signal_queue:
                self.signals_to_forward.append(self.signal_queue.pop(0))
            for sig in self.signals_to_forward:
                if sig in STOP_SIGNALS:
                    log.info("forwarding signal to workers", signal=signal.Signals(sig).name)
                    for process in self.processes:
                        if process.process.is_alive() and process.pid is not None:
                            os.kill(process.pid, sig)
            self.signals_to_forward.clear()
            wait(alive, timeout=0.1)
        super().join_all()


def serve(settings: PlatformSettings, app: str) -> None:
    config = Config(
        app,
        drain_delay=settings.drain_seconds,
        connection_limits=ConnectionLimits.from_settings(settings, raise_open_files_limit()),
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http=LimitedHttpToolsProtocol,
        timeout_keep_alive=settings.keep_alive_timeout,
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
    exporter = None
    if settings.metrics_port is not None:  # before any worker starts: see metrics_exporter.py
        from .metrics_exporter import start_exporter

        exporter = start_exporter(settings)
    try:
        if config.workers > 1:
            on_exit = exporter.worker_exited if exporter else None
            Supervisor(config, sockets=[config.bind_socket()], on_worker_exit=on_exit).run()
        else:
            server.run()
    finally:
        if exporter is not None:
            exporter.close()
    log.info("server exited", signal=server.received_signal)
