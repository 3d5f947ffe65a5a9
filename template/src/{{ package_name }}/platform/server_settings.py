"""The server's limits on clients: how big, how slow, how many (http_limits.py, concurrency.py).

A mixin of PlatformSettings, kept apart so the settings module stays readable, and the
limits each worker is given (ConnectionLimits). Defaults are safe for a service on the
internet or behind a load balancer.
"""

import resource
from dataclasses import dataclass

import structlog
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings

log = structlog.get_logger(__name__)


class ServerLimitSettings(BaseSettings):
    """Per worker process; `.env.example` documents each."""

    # The request line and headers together, in bytes: room for a few KB of tokens and cookies.
    max_header_bytes: int = Field(default=32_768, ge=4096, le=1_048_576)
    max_header_count: int = Field(default=100, ge=16, le=10_000)
    # Seconds from a connection's start, or a request's first byte, to the end of its headers.
    header_timeout: float = Field(default=10.0, gt=0, le=300)
    # Seconds a request body may stall while it is still coming.
    body_idle_timeout: float = Field(default=30.0, gt=0, le=3600)
    # Bytes per second a request body must average once BODY_IDLE_TIMEOUT's grace is spent:
    # 500 (Apache mod_reqtimeout's MinRate) lets 1 MB take over half an hour.
    body_min_rate: int = Field(default=500, ge=1, le=100_000_000)
    # Seconds an idle connection stays open between requests. Above a load balancer's own
    # idle timeout (ingress-nginx and AWS ALB: 60 s), so the server never closes a connection
    # the balancer is about to reuse.
    keep_alive_timeout: int = Field(default=75, ge=1, le=3600)
    max_connections: int = Field(default=1000, ge=16, le=100_000)
    max_concurrency: int = Field(default=500, ge=1, le=100_000)

    @field_validator("max_concurrency", mode="after")
    @classmethod
    def _within_connections(cls, value: int, info: ValidationInfo) -> int:
        """Every request in flight holds a connection: more requests than connections is a typo."""
        connections = info.data.get("max_connections")
        if connections is not None and value > connections:
            raise PydanticCustomError(
                "concurrency",
                "must not exceed MAX_CONNECTIONS ({connections}): each request needs a connection",
                {"connections": connections},
            )
        return value


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits one worker enforces; pickled into each worker with uvicorn's Config."""

    max_header_bytes: int
    max_header_count: int
    header_timeout: float
    body_idle_timeout: float
    body_min_rate: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: ServerLimitSettings, open_files: int) -> "ConnectionLimits":
        """MAX_CONNECTIONS, lowered to three quarters of the open-file limit when that is
        lower: the rest stays for pools, log files and the listening socket."""
        max_connections = min(settings.max_connections, open_files * 3 // 4)
        if max_connections < settings.max_connections:
            log.warning(
                "MAX_CONNECTIONS lowered to fit the open-file limit",
                max_connections=max_connections,
                open_files=open_files,
            )
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout=settings.header_timeout,
            body_idle_timeout=settings.body_idle_timeout,
            body_min_rate=settings.body_min_rate,
            max_connections=max_connections,
        )


def raise_open_files_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one (containers often start at 1024 of
    a million); returns the limit now in force, which workers inherit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        log.warning("could not raise the open-file limit", soft=soft, hard=hard)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
