"""The server's limits on clients: how big, how slow, how many (http_limits.py, concurrency.py).

A mixin of PlatformSettings, kept apart so the settings module stays readable.
Defaults are safe for a service on the internet or behind a load balancer.
"""

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings


class ServerLimitSettings(BaseSettings):
    """Per worker process; `.env.example` documents each."""

    # The request line and headers together, in bytes: room for a few KB of tokens and cookies.
    max_header_bytes: int = Field(default=32_768, ge=4096, le=1_048_576)
    max_header_count: int = Field(default=100, ge=16, le=10_000)
    # Seconds from a connection's start, or a request's first byte, to the end of its headers.
    header_timeout: float = Field(default=10.0, gt=0, le=300)
    # Seconds a request body may stall while it is still coming.
    body_idle_timeout: float = Field(default=30.0, gt=0, le=3600)
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
