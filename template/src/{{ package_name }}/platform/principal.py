"""Who a caller is, and how a backend says so: the types every auth module shares.

No FastAPI and no settings here: tables and settings depend on these types, and must
not pull in the web stack with them.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from starlette.datastructures import Headers

SUBJECT_MAX_LENGTH = 255  # a subject is stored as the owner of rows


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: who it is (subject) and what it was granted (scopes)."""

    subject: str
    scopes: frozenset[str] = frozenset()
    # False when every caller shares one principal: rate limits and flag rollouts then key
    # by address instead.
    identifies_caller: ClassVar[bool] = True

    def holds(self, scopes: Iterable[str]) -> bool:
        return self.scopes.issuperset(scopes)


class AuthenticationError(Exception):
    """Credentials were presented and are not valid.

    `reason` is for the log and never contains the credentials; `description` is
    what the client is told; `error` is the RFC 6750 error code.
    """

    def __init__(
        self,
        reason: str,
        description: str = "The credentials are not valid.",
        error: str = "invalid_token",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.description = description
        self.error = error
        # The 429 headers once its client is over the failure limit, if one applies.
        self.throttled: dict[str, str] | None = None


class CredentialsUnverifiable(AuthenticationError):
    """Credentials were presented and cannot be checked now (what checks them is out of
    reach). No fault of the client's: not counted as a failure, and answered 503 with
    Retry-After, so clients retry instead of discarding credentials that may be valid."""

    def __init__(self, reason: str, *, retry_after: int) -> None:
        super().__init__(
            reason,
            "The credentials cannot be checked now; retry shortly.",
            "temporarily_unavailable",
        )
        self.retry_after = retry_after


class Authenticator(Protocol):
    """What the backend that reads credentials provides."""

    async def authenticate(self, headers: Headers) -> Principal | None:
        """The caller; None without credentials; AuthenticationError for bad ones."""
        ...

    def challenge(self, **params: str) -> str:
        """The WWW-Authenticate value, with parameters such as error or scope."""
        ...


def challenge(scheme: str, **params: str) -> str:
    """`Scheme realm="api", error="invalid_token"`: every value a quoted-string."""
    quoted = [f'{name}="{_escape(value)}"' for name, value in params.items() if value]
    return f"{scheme} {', '.join(quoted)}" if quoted else scheme


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
