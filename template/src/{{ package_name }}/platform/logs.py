"""One logging pipeline for the service, uvicorn and every library.

structlog renders JSON lines (one object per line, for the log shipper) outside
development and a readable console format in development. Records from the
standard library, uvicorn included, pass through the same processors, so every
line carries the request id bound by the middleware.

The service's own lines (structlog loggers, the access line among them) skip the
standard library: a disabled level costs one method call, and an enabled line is
rendered once and written to the same stream, under the same lock, as the
handler that formats the standard library's records.
"""

import contextlib
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

REDACTED = "[REDACTED]"
SENSITIVE_KEY = re.compile(
    r"pass(word|wd)?|secret|token|authorization|api[-_]?key|cookie|credential|private[-_]?key|dsn",
    re.IGNORECASE,
)
_PLAIN = (str, int, float, bool, type(None))


@lru_cache(maxsize=4096)
def _sensitive(key: str) -> bool:
    return SENSITIVE_KEY.search(key) is not None


def redact(value: Any) -> Any:
    """Replace the value of any key that looks sensitive, at any depth."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _sensitive(str(key)) else redact(item) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def _redact_event(_: Any, __: str, event_dict: EventDict) -> EventDict:
    return redact(event_dict)


def _drop_uvicorn_extras(_: Any, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    return event_dict


class _Output:
    """Where rendered lines go: the root handler's stream, under the handler's lock."""

    handler: logging.StreamHandler = logging.StreamHandler(sys.stdout)  # type: ignore[type-arg]
    level = logging.INFO


def enabled_for(level: int) -> bool:
    """Whether the service's own lines at `level` are written (a line can be skipped whole)."""
    return level >= _Output.level


class LineLogger:
    """The end of structlog's chain for the service's own lines: writes the rendered line."""

    def __init__(self, name: str) -> None:
        self.name = name  # for add_logger_name

    def msg(self, line: str) -> None:
        handler = _Output.handler
        # Like logging's handlers: a closed or broken stream never fails the caller.
        with handler.lock, contextlib.suppress(OSError, ValueError):  # type: ignore[union-attr]
            handler.stream.write(line + "\n")
            handler.stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = msg


def _line_logger(*args: Any) -> LineLogger:
    return LineLogger(args[0] if args and isinstance(args[0], str) else "")


# Tracebacks as data, without each frame's local variables: a frame's locals can hold a
# request's credentials, a database URL or a user's data (structlog shows them by default).
_exception_as_dict = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure_logging(*, level: str, json: bool, context: Sequence[Processor] = ()) -> None:
    """Route structlog and stdlib logging to one stdout handler. Safe to call again.

    `context`: processors that add to every line what the request's context knows, after
    the request id (tracing.add_trace_ids).
    """
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        *context,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Processor] = (
        [_exception_as_dict, structlog.processors.JSONRenderer()]
        if json
        else [structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())]
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *shared,
                structlog.stdlib.ExtraAdder(),
                _drop_uvicorn_extras,
                _redact_event,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    _Output.handler = handler
    _Output.level = logging.getLevelNamesMapping()[level]
    structlog.configure(
        processors=[*shared, _redact_event, *renderer],
        logger_factory=_line_logger,
        # Lines below `level` are dropped before any processor runs.
        wrapper_class=structlog.make_filtering_bound_logger(_Output.level),
        cache_logger_on_first_use=False,  # configure_logging may run again (tests do)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # The access line comes from AccessLogMiddleware, with the request id and duration.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # httpx and httpcore log every request's full URL at INFO, credentials and query included;
    # outbound.py logs each call itself, by host.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
