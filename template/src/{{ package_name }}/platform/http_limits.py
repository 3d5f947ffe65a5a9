"""uvicorn's httptools protocol, with limits on slow, huge and idle clients.

uvicorn with httptools bounds nothing a client sends before the app sees it:
httptools appends to a header value until the value ends (four 100 MB headers grew
a worker by 500 MB), a connection that sends nothing stays open for ever, and
every open connection holds a file descriptor. This subclass adds, per connection:

- the request head (request line and headers) within MAX_HEADER_BYTES, counted as
  bytes arrive, before the parser buffers them, and MAX_HEADER_COUNT: past either,
  431 and the connection closes;
- HEADER_TIMEOUT from the connection's start, or a request's first byte, to the
  end of its headers: 408 (or a silent close, if nothing came);
- BODY_IDLE_TIMEOUT while a request body is incomplete and the app waits for it, and
  BODY_MIN_RATE over the whole body (after a BODY_IDLE_TIMEOUT grace, each byte earns
  1/BODY_MIN_RATE s more, as Apache's mod_reqtimeout does): 408. A body dripped a byte
  at a time never stalls, yet would hold its connection and a request slot for ever;
- MAX_CONNECTIONS per worker: past it, the connection that has waited longest for
  a request is closed, so idle or half-open connections never lock a probe out.

Keep-alive is uvicorn's own timeout (KEEP_ALIVE_TIMEOUT); requests in flight are
bounded by concurrency.py.
"""

import asyncio
from typing import Any

import structlog
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .middleware import REQUEST_ID_HEADER, new_request_id
from .problems import problem
from .server_settings import ConnectionLimits

log = structlog.get_logger(__name__)

# After a refusal, what the client still sends is read and dropped for this long before the
# connection closes: closing with unread data would reset it, and the client could lose the answer.
LINGER_SECONDS = 1.0
WARN_EVERY_SECONDS = 10.0


class HeadTooLarge(Exception):
    """Raised from a parser callback: it stops httptools."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """Pass the class as uvicorn's `http`; it reads `config.connection_limits`."""

    warned_at = float("-inf")  # the last "connection limit reached" warning, per worker

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = config.connection_limits
        if not hasattr(server_state, "idle_connections"):  # one per server, oldest first
            server_state.idle_connections = {}
        self.idle: dict[LimitedHttpToolsProtocol, None] = server_state.idle_connections
        self.reading_head = True
        self.head_bytes = 0
        self.refused = False
        self.deadline: asyncio.TimerHandle | None = None
        self.body_started = self.body_moved = 0.0  # loop times
        self.body_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle[self] = None
        if len(self.connections) > self.limits.max_connections:
            self._close_longest_idle()
        self._arm(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.idle.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # answered already: drop whatever still comes, buffer nothing
        if self.reading_head:
            self._feed_head(data)
        else:
            self._disarm()  # the body moved: its idle clock starts again
            self.body_bytes += len(data)
            self.body_moved = self.loop.time()
            super().data_received(data)
        if self.deadline is not None or (self.reading_head and not self.head_bytes):
            return  # a deadline runs already, or nothing is pending: the usual case
        if self.refused or self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # refused, closed or upgraded to a WebSocket
        if self.reading_head:  # a head begun, not finished
            self._arm(self.limits.header_timeout, self._head_timed_out)
        else:
            self._arm(self._body_wait(), self._body_timed_out)

    def _body_wait(self) -> float:
        """Seconds the body may take to move again: BODY_IDLE_TIMEOUT, cut to what its
        bytes so far have earned at BODY_MIN_RATE."""
        grace = self.limits.body_idle_timeout
        earned = self.body_started + grace + self.body_bytes / self.limits.body_min_rate
        return max(0.0, min(grace, earned - self.loop.time()))

    def _feed_head(self, data: bytes) -> None:
        room = self.limits.max_header_bytes - self.head_bytes
        self.head_bytes += len(data)
        if len(data) <= room:
            super().data_received(data)
            return
        super().data_received(data[:room])  # the parser never holds more head than the limit
        if self.refused or self.transport.is_closing():
            return
        if self.reading_head:
            limit = self.limits.max_header_bytes
            self._refuse(431, f"The request line and headers exceed {limit} bytes.")
        else:  # the head ended within the limit: the rest is body, or the next request
            self.data_received(data[room:])

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error, which HeadTooLarge also is."""
        if len(self.headers) > self.limits.max_header_count:
            count = self.limits.max_header_count
            self._refuse(431, f"The request has more than {count} header fields.")
        else:
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        # Counted once the head is in: its bytes are bounded already, and a count per
        # header would cost every request a call per header.
        if len(self.headers) > self.limits.max_header_count:
            raise HeadTooLarge  # stops the parser; uvicorn then calls send_400_response
        self.reading_head = False
        self.idle.pop(self, None)
        if self.deadline is not None:
            self._disarm()
        self.body_started = self.body_moved = self.loop.time()
        self.body_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.deadline is not None:
            self._disarm()
        self.reading_head, self.head_bytes = True, 0

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self.idle[self] = None  # waits for its next request: the newest idle connection

    def _head_timed_out(self) -> None:
        self.deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a response is on its way: close once it is sent
        elif self.head_bytes:
            timeout = self.limits.header_timeout
            self._refuse(408, f"The request headers took longer than {timeout:g} seconds.")
        else:
            self.transport.close()  # connected, sent nothing

    def _body_timed_out(self) -> None:
        self.deadline = None
        now = self.loop.time()
        if self.flow.read_paused or self.cycle.waiting_for_100_continue:
            # The app has not asked for more of the body yet: the wait is not the client's,
            # so neither is the time the rate counts.
            self.body_started = now - self.body_bytes / self.limits.body_min_rate
            self.body_moved = now
            self._arm(self.limits.body_idle_timeout, self._body_timed_out)
            return
        started = self.cycle.response_started
        self.cycle.disconnected = True  # the app's receive() sees the client gone
        self.cycle.message_event.set()
        if started:
            self.transport.close()
        elif now - self.body_moved >= self.limits.body_idle_timeout:
            timeout = self.limits.body_idle_timeout
            self._refuse(408, f"The request body stalled for {timeout:g} seconds.")
        else:
            rate = self.limits.body_min_rate
            self._refuse(408, f"The request body came slower than {rate} bytes per second.")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer with a problem, then close: sent before the app sees any of the request."""
        self.refused = True
        self._disarm()
        request_id = new_request_id()  # the app never saw the request: the id starts here
        headers = {"Connection": "close", REQUEST_ID_HEADER: request_id}
        response = problem(status, detail=detail, request_id=request_id, headers=headers)
        raw_headers = [*self.server_state.default_headers, *response.raw_headers]
        head = [STATUS_LINE[status], *(b"%s: %s\r\n" % header for header in raw_headers), b"\r\n"]
        self.transport.write(b"".join(head) + response.body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.deadline = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        log.info(
            "request refused",
            status=status,
            detail=detail,
            client=self.client,
            request_id=request_id,
        )

    def _close_longest_idle(self) -> None:
        victim = next(iter(self.idle))  # this new connection itself when no other is idle
        del self.idle[victim]  # closing takes a turn of the loop: never pick it twice
        victim.transport.close()
        now = self.loop.time()
        if now - LimitedHttpToolsProtocol.warned_at >= WARN_EVERY_SECONDS:
            LimitedHttpToolsProtocol.warned_at = now
            log.warning(
                "connection limit reached",
                action="closed the connection idle the longest",
                max_connections=self.limits.max_connections,
            )

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
