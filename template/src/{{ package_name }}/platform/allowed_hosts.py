"""Requests must name one of ALLOWED_HOSTS in their Host header; any other gets a 400.

Whatever is built from the Host header (an absolute URL in a response, a redirect a route
adds later, a link in an email) points wherever the client chose, unless the host is one
the service knows it answers for: the classic host-header injection. The probes are
exempt: kubelets and load balancers call them by the instance's own address.
"""

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .problems import refuse


def host_name(header: str) -> str:
    """The host of a Host header, without its port, lower-cased, without a final dot."""
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class AllowedHostsMiddleware:
    def __init__(
        self, app: ASGIApp, allowed_hosts: list[str], exempt_paths: frozenset[str]
    ) -> None:
        self.app = app
        self.exact = frozenset(h for h in allowed_hosts if not h.startswith("*."))
        self.suffixes = tuple(h[1:] for h in allowed_hosts if h.startswith("*."))  # ".example.org"
        self.exempt_paths = exempt_paths

    def allows(self, host: str) -> bool:
        return host in self.exact or (bool(self.suffixes) and host.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        if not self.allows(host_name(Headers(scope=scope).get("host", ""))):
            detail = "The Host header names no host this service answers for."
            await refuse(scope, receive, send, 400, detail)
            return
        await self.app(scope, receive, send)
