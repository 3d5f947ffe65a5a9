"""What one benchmark run measures: the full plan, and the smoke plan the test suite runs."""

from dataclasses import dataclass, field

ENDPOINTS = {"healthz": "/healthz", "notes": "/notes?limit=10"}
# Called as orchestrators and load balancers call them: without credentials.
PROBES = frozenset({ENDPOINTS["healthz"]})
OWNER = "bench-user"  # the principal whose notes the list returns


@dataclass(frozen=True)
class Plan:
    label: str
    seconds: int = 5  # per wrk run
    repeats: int = 3  # runs per point, alternating generated and bare; medians reported
    warmup_seconds: int = 2  # per endpoint, after each start
    settle_seconds: float = 1.0  # at rest after the first answers, before idle RSS
    boots: int = 3  # starts per app and worker count; the median boot time is reported
    workers: tuple[int, ...] = (1, 2)
    connections: tuple[int, ...] = (1, 16, 64, 256)
    concurrent_reads: int = 200
    growth_sizes: tuple[int, ...] = (1_000, 100_000, 1_000_000)
    growth_connections: int = 16
    endpoints: dict[str, str] = field(default_factory=lambda: dict(ENDPOINTS))


FULL = Plan(label="full")
SMOKE = Plan(
    label="smoke",
    seconds=1,
    repeats=1,
    warmup_seconds=0,
    settle_seconds=0.2,
    boots=1,
    workers=(1,),
    connections=(16,),
    growth_sizes=(1_000, 10_000),
)


def request_headers(path: str, headers: dict[str, str]) -> dict[str, str]:
    """What wrk sends to `path`: the credentials, except to a probe."""
    return {} if path.partition("?")[0] in PROBES else headers
