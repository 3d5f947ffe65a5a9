"""A rolling deploy and its rollback, proven without a cluster: the same moving parts as
real processes. HAProxy stands for the Service/ingress: it health-checks each replica's
/readyz the way endpoints follow readiness, and only routes to replicas that pass. A
client sends continuous reads and idempotent writes through it while replicas of version 1
are replaced one by one by version 2 (the render plus an expand-only migration and code
that uses the new column), as a Deployment with maxUnavailable 0 does: the new replica
becomes ready, then the old one gets SIGTERM and drains.

The drain (DRAIN_DELAY, platform/server.py) is what makes it pass: the same deploy with
DRAIN_DELAY=0 fails requests, because the old replica stops accepting before the balancer
has seen it go. The drain itself, replica by replica (new connections served until the
delay ends, /readyz "draining", in-flight requests completed, exit 0), is proven in
test_runtime.py; here it is proven end to end."""

import asyncio
import contextlib
import csv
import json
import logging
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import psycopg
import pytest

from .conftest import POSTGRES_ADMIN_URL, Project
from .service import free_port
from .test_data_layer import database_name, migrate, postgres

pytestmark = [pytest.mark.default_answers, pytest.mark.databases("postgresql")]
log = logging.getLogger(__name__)  # measurements: pytest -n0 -o log_cli=true --log-cli-level=INFO

DRAIN_DELAY = 2.0
# How often the balancer probes /readyz; one result flips a replica. 1 s is the shortest
# period a Kubernetes readinessProbe allows, and about the delay of endpoints propagation
# (1-3 s): the time a replica keeps getting traffic after it turns unready, which
# DRAIN_DELAY must cover.
CHECK_INTERVAL_MS = 1000
# The client: steady traffic that leaves the CPU to the replicas starting up.
READERS, WRITERS, PAUSE = 3, 2, 0.02

# Debian's haproxy (.ci/run installs it); tested with 2.6. `http-check send` needs 2.2 or later.
HAPROXY_CFG = """\
global
    stats socket {stats} mode 600 level operator
    maxconn 2000

defaults
    mode http
    timeout connect 1s
    timeout client 15s
    timeout server 15s
    # Above the service's own READINESS_TIMEOUT (1 s), as the Deployment's probe timeouts are.
    timeout check 2s
    # One connection attempt per request and never another replica: a request routed to a
    # replica that refuses it fails, as a packet kube-proxy sent to a gone pod does.
    retries 0
    # Every request on a new connection to its replica: each one needs a listener that
    # still accepts (the case a drain is for), and no idle backend connection can race the
    # server's keep-alive timeout and fail for reasons that have nothing to do with deploys.
    option http-server-close

frontend web
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    # A replica that is down (not started yet) is probed more often, only to save time.
    default-server check inter {interval}ms downinter 200ms fall 1 rise 1
{servers}
"""


# --- version 2: the render plus an expand-only migration and code that uses it ----------------

MIGRATION_0003 = '''"""Give notes an optional label. Expand only: a nullable column, nothing to
backfill, so version 1 keeps working on this schema and rolling the code back needs no
migration.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("notes", sa.Column("label", sa.String(length=50), nullable=True))


def downgrade() -> None:
    op.drop_column("notes", "label")
'''


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name} changed: {old!r} is not there exactly once"
    path.write_text(text.replace(old, new))


def version_2(project: Project, destination: Path) -> Path:
    """A copy of the project's code with a `label` on notes: column, migration, API field.
    It runs on version 1's environment (PYTHONPATH puts its src/ first): no install."""
    shutil.copytree(project.path / "src", destination / "src")
    shutil.copy2(project.path / "alembic.ini", destination)
    package = destination / "src" / "acme_orders"
    (package / "migrations" / "versions" / "0003_note_labels.py").write_text(MIGRATION_0003)
    edit(package / "models.py", "BODY_MAX = 5000\n", "BODY_MAX = 5000\nLABEL_MAX = 50\n")
    edit(
        package / "models.py",
        '    body: Mapped[str] = mapped_column(String(BODY_MAX), default="")\n',
        '    body: Mapped[str] = mapped_column(String(BODY_MAX), default="")\n'
        "    label: Mapped[str | None] = mapped_column(String(LABEL_MAX), default=None)\n",
    )
    notes = package / "notes.py"
    edit(notes, "import BODY_MAX, TITLE_MAX, Note", "import BODY_MAX, LABEL_MAX, TITLE_MAX, Note")
    edit(
        notes,
        '    body: Annotated[Text, Field(max_length=BODY_MAX)] = ""\n\n\nclass NoteUpdate',
        '    body: Annotated[Text, Field(max_length=BODY_MAX)] = ""\n'
        "    label: Annotated[Text, Field(min_length=1, max_length=LABEL_MAX)] | None = None\n"
        "\n\nclass NoteUpdate",
    )
    edit(
        notes,
        "    body: str\n    created_at",
        "    body: str\n    label: str | None\n    created_at",
    )
    return destination


# --- replicas and the balancer --------------------------------------------------------------


def slot_ports(count: int) -> list[int]:
    """Free ports below the kernel's ephemeral range: a slot's port stays unbound between
    replicas, and no other test's free_port() (nor an outgoing connection) can take it then."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: set[int] = set()
    while len(ports) < count:
        port = random.randrange(20000, low)  # noqa: S311 - not a secret
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            ports.add(port)
    return sorted(ports)


@dataclass
class Release:
    name: str
    root: Path  # where its alembic.ini is; its code is root/src
    python: Path  # version 1's environment, shared

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "PYTHONPATH": str(self.root / "src")}

    def run(self, base: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), *args],
            cwd=self.root,
            env=self.env(base),
            capture_output=True,
            text=True,
            timeout=120,
        )


@dataclass
class Replica:
    release: Release
    slot: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls, release: Release, slot: str, port: int, env: dict[str, str], logs: Path
    ) -> "Replica":
        log = logs / f"{release.name}-{slot}-{time.monotonic_ns()}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                [str(release.python), "-m", "acme_orders", "serve"],
                cwd=release.root,
                env={**release.env(env), "PORT": str(port)},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        return cls(release, slot, process, log)

    def terminate(self) -> float:
        self.process.send_signal(signal.SIGTERM)
        return time.monotonic()

    def events(self) -> list[str]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line)["event"] for line in lines if line.startswith("{")]


class Balancer:
    """HAProxy in front of fixed slots (pod addresses): a slot whose replica is absent or
    unready is DOWN; the stats socket says what the balancer sees and counts."""

    def __init__(self, directory: Path, slots: dict[str, int]) -> None:
        self.seen: dict[str, str] = {}
        self.changes: list[tuple[float, str, str]] = []  # (when, slot, status), as polled
        self.port = free_port()
        self.stats = directory / "haproxy.sock"
        servers = "\n".join(f"    server {slot} 127.0.0.1:{port}" for slot, port in slots.items())
        config = directory / "haproxy.cfg"
        config.write_text(
            HAPROXY_CFG.format(
                stats=self.stats, port=self.port, interval=CHECK_INTERVAL_MS, servers=servers
            )
        )
        with (directory / "haproxy.log").open("w") as sink:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(config)], stdout=sink, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while not self.stats.exists():
            assert self.process.poll() is None, (directory / "haproxy.log").read_text()
            assert time.monotonic() < deadline, "haproxy did not start"
            time.sleep(0.02)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        rows = csv.DictReader(self.command("show stat").lstrip("# ").splitlines())
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["type"] == "2"}

    def wait(self, states: dict[str, str], timeout: float = 30) -> float:
        """Until every named slot has its status (UP or DOWN); returns the seconds it took.
        Every slot's changes are noted on the way, to the poll (about 10 ms)."""
        started = time.monotonic()
        while time.monotonic() < started + timeout:
            assert self.process.poll() is None, "haproxy exited"
            now = time.monotonic()
            for slot, row in self.servers().items():
                if self.seen.get(slot) != row["status"]:
                    self.changes.append((now, slot, row["status"]))
                    self.seen[slot] = row["status"]
            if all(self.seen[slot] == state for slot, state in states.items()):
                return now - started
            time.sleep(0.01)
        pytest.fail(f"haproxy never saw {states}: {self.seen}")

    def went(self, slot: str, status: str, after: float) -> float:
        """When the balancer was first seen to put `slot` in `status` after `after`."""
        return min(t for t, s, state in self.changes if s == slot and state == status and t > after)

    def backend_errors(self) -> Counter[str]:
        """Connections to replicas that failed (refused: econ) or broke mid-response (eresp,
        srv_abrt), summed over the slots: what the balancer itself saw go wrong."""
        totals: Counter[str] = Counter()
        for row in self.servers().values():
            for name in ("econ", "eresp", "srv_abrt"):
                totals[name] += int(row[name] or 0)
        return totals

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@dataclass
class Fleet:
    """The replicas behind the balancer, replaced the way a Deployment's rollout does."""

    balancer: Balancer
    ports: dict[str, int]
    env: dict[str, str]
    logs: Path
    live: dict[str, Replica] = field(default_factory=dict)
    stopped: list[Replica] = field(default_factory=list)
    unready_after: list[float] = field(default_factory=list)  # SIGTERM -> balancer sees DOWN

    def launch(self, release: Release, slots: list[str]) -> None:
        for slot in slots:
            self.live[slot] = Replica.start(release, slot, self.ports[slot], self.env, self.logs)

    def start(self, release: Release, slots: list[str]) -> None:
        self.launch(release, slots)
        took = self.balancer.wait(dict.fromkeys(slots, "UP"))
        log.info("%s ready in the balancer %.1f s after start", "+".join(slots), took)

    def roll(self, release: Release, slots: list[str]) -> None:
        """maxSurge 1, maxUnavailable 0: a new replica is ready, then an old one gets SIGTERM
        and, while it drains, the next new replica starts."""
        old = list(self.live.values())
        assert len(old) == len(slots)
        signalled = {}
        for replica, slot in zip(old, slots, strict=True):
            self.start(release, [slot])
            signalled[replica.slot] = replica.terminate()
            del self.live[replica.slot]
            self.stopped.append(replica)
        self.balancer.wait(dict.fromkeys(signalled, "DOWN"))
        for replica in old:
            replica.process.wait(timeout=30)
            at = signalled[replica.slot]
            self.unready_after.append(self.balancer.went(replica.slot, "DOWN", at) - at)

    def stop(self) -> None:
        for replica in self.live.values():
            replica.terminate()
        for replica in self.live.values():
            replica.process.wait(timeout=30)
        self.stopped += self.live.values()
        self.live.clear()


# --- the client -----------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # read | write
    result: str  # status code, or the transport error's class
    key: str = ""
    body: dict[str, object] = field(default_factory=dict)


class Traffic:
    """Continuous reads (GET /notes) and idempotent writes (POST /notes with an
    Idempotency-Key), on keep-alive connections to the balancer, in a thread of its own."""

    def __init__(self, name: str, url: str, headers: dict[str, str]) -> None:
        self.name, self.url, self.headers = name, url, headers
        self.outcomes: list[Outcome] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the client did not stop"
        if self.error is not None:
            raise self.error
        log.info("%s: %s, writes by %s", self.name, dict(self.results()), dict(self.served_by()))

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            self.error = error

    async def _main(self) -> None:
        async with httpx2.AsyncClient(base_url=self.url, headers=self.headers, timeout=10) as c:
            loops = [self._reads(c) for _ in range(READERS)] + [
                self._writes(c) for _ in range(WRITERS)
            ]
            await asyncio.gather(*loops)

    async def _reads(self, client: httpx2.AsyncClient) -> None:
        while not self._stop.is_set():
            try:
                response = await client.get("/notes", params={"limit": 5})
            except httpx2.TransportError as error:
                self.outcomes.append(Outcome("read", type(error).__name__))
            else:
                self.outcomes.append(Outcome("read", str(response.status_code)))
            await asyncio.sleep(PAUSE)

    async def _writes(self, client: httpx2.AsyncClient) -> None:
        while not self._stop.is_set():
            key = uuid.uuid4().hex
            self.outcomes.append(await write(client, key))
            await asyncio.sleep(PAUSE)

    def results(self) -> Counter[tuple[str, str]]:
        return Counter((o.kind, o.result) for o in self.outcomes)

    def failures(self) -> Counter[tuple[str, str]]:
        return Counter({k: n for k, n in self.results().items() if k[1] not in {"200", "201"}})

    def acknowledged(self) -> dict[str, dict[str, object]]:
        return {o.key: o.body for o in self.outcomes if o.kind == "write" and o.result == "201"}

    def served_by(self) -> Counter[str]:
        """Which version acknowledged each write: version 2's notes have a `label` field."""
        return Counter("v2" if "label" in body else "v1" for body in self.acknowledged().values())


async def write(client: httpx2.AsyncClient, key: str) -> Outcome:
    try:
        response = await client.post(
            "/notes", json={"title": f"rollout {key}"}, headers={"Idempotency-Key": key}
        )
    except httpx2.TransportError as error:
        return Outcome("write", type(error).__name__, key)
    body = response.json() if response.status_code == 201 else {}
    return Outcome("write", str(response.status_code), key, body)


def stored_notes(project: Project) -> dict[str, int]:
    """Title -> id of every note in the database."""
    return dict(postgres("SELECT title, id FROM notes", database_name(project)))


def assert_no_write_lost(project: Project, traffic: Traffic) -> None:
    twice = "SELECT title FROM notes GROUP BY title HAVING count(*) > 1"
    assert not postgres(twice, database_name(project)), "a write was stored twice"
    stored = stored_notes(project)
    acknowledged = traffic.acknowledged()
    lost = [key for key, body in acknowledged.items() if stored.get(f"rollout {key}") != body["id"]]
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged writes are not stored"


def execute(statement: str, database: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}") as connection:
        connection.execute(statement)


def label_column(project: Project) -> list[tuple]:
    query = "SELECT column_name FROM information_schema.columns WHERE table_name = 'notes'"
    return [row for row in postgres(query, database_name(project)) if row[0] == "label"]


# --- the deploys --------------------------------------------------------------------------------


@contextlib.contextmanager
def deployment(project: Project, tmp_path: Path, drain_delay: float) -> Iterator[Fleet]:
    """Version 1 migrated and running as two replicas (slots a, b) behind HAProxy, which also
    has slots c, d for the replicas that will replace them, as a new pod gets a new address."""
    env = {**project.env, "DRAIN_DELAY": str(drain_delay), "SHUTDOWN_TIMEOUT": "10"}
    logs = tmp_path / "logs"
    logs.mkdir()
    ports = dict(zip("abcd", slot_ports(4), strict=True))
    balancer = Balancer(tmp_path, ports)
    fleet = Fleet(balancer, ports, env, logs)
    try:
        # No traffic yet: the first release's schema and the client's token are made while
        # its replicas boot, to save time.
        fleet.launch(Release("v1", project.path, project.python), ["a", "b"])
        migrated = migrate(project)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert project.headers
        balancer.wait({"a": "UP", "b": "UP", "c": "DOWN", "d": "DOWN"})
        yield fleet
    finally:
        for replica in fleet.live.values():
            replica.process.kill()
            replica.process.wait()
        balancer.close()


def settle() -> None:
    time.sleep(0.5)  # traffic before and after each step, so every step is under load


def test_rolling_deploy_and_rollback_fail_no_request(variant: Project, tmp_path: Path) -> None:
    """Deploy version 2 (migrate, then replica by replica), roll the code back to version 1,
    then the schema: no request fails, no connection is refused or reset, no write is lost."""
    v1 = Release("v1", variant.path, variant.python)
    v2 = Release("v2", version_2(variant, tmp_path / "v2"), variant.python)
    with deployment(variant, tmp_path, DRAIN_DELAY) as fleet:
        balancer = fleet.balancer

        # Deploy: the expand migration runs while version 1 serves, then the rollout.
        with Traffic("deploy", balancer.url, variant.headers) as deploy:
            settle()
            migrated = v2.run(fleet.env, "-m", "acme_orders", "migrate")
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr
            settle()
            fleet.roll(v2, ["c", "d"])
            settle()
        assert label_column(variant), "version 2's migration added the column"
        assert not deploy.failures(), deploy.results()
        assert set(deploy.served_by()) == {"v1", "v2"}, "both versions served during the rollout"
        assert_no_write_lost(variant, deploy)

        # Version 2 uses the column.
        labelled = httpx2.post(
            f"{balancer.url}/notes",
            json={"title": "labelled", "label": "urgent"},
            headers=variant.headers,
            timeout=10,
        )
        assert labelled.status_code == 201, labelled.text
        assert labelled.json()["label"] == "urgent"

        # Roll the application back to version 1, on the expanded schema.
        with Traffic("rollback", balancer.url, variant.headers) as rollback:
            settle()
            fleet.roll(v1, ["a", "b"])
            settle()
        assert not rollback.failures(), rollback.results()
        assert set(rollback.served_by()) == {"v1", "v2"}
        assert_no_write_lost(variant, rollback)
        # Version 1 runs on version 2's schema because that schema only added to its own. A
        # change that is not (here, renaming a column version 1 reads) breaks it at once: the
        # README's rule, add first and remove only once no running code uses it.
        database = database_name(variant)
        execute("ALTER TABLE notes RENAME COLUMN body TO content", database)
        broken = httpx2.get(f"{balancer.url}/notes", headers=variant.headers, timeout=10)
        execute("ALTER TABLE notes RENAME COLUMN content TO body", database)
        assert broken.status_code == 500, broken.text

        # No replica runs version 2 any more: the schema can go back too (the migration that
        # knows how is version 2's), under traffic.
        with Traffic("schema downgrade", balancer.url, variant.headers) as downgrade:
            settle()
            downgraded = v2.run(fleet.env, "-m", "alembic", "downgrade", "-1")
            assert downgraded.returncode == 0, downgraded.stdout + downgraded.stderr
            settle()
        assert not label_column(variant)
        assert not downgrade.failures(), downgrade.results()
        assert downgrade.served_by() == Counter(v1=len(downgrade.acknowledged()))
        assert_no_write_lost(variant, downgrade)
        assert stored_notes(variant)["labelled"] == labelled.json()["id"]

        assert balancer.backend_errors() == Counter(), "no replica refused or reset a connection"
        fleet.stop()
    for traffic in (deploy, rollback, downgrade):
        assert_no_write_lost(variant, traffic)
    log.info("unready in the balancer after SIGTERM: %s s", fleet.unready_after)
    for replica in fleet.stopped:
        assert replica.process.returncode == 0, replica.log.read_text()
        events = replica.events()
        assert "draining" in events, replica.log.read_text()
        assert events[-1] == "exit", replica.log.read_text()
    assert max(fleet.unready_after) < DRAIN_DELAY, fleet.unready_after


def test_the_same_deploy_without_the_drain_fails_requests(variant: Project, tmp_path: Path) -> None:
    """DRAIN_DELAY=0: the old replica stops accepting at SIGTERM, before the balancer's next
    check has seen it unready; requests routed to it meanwhile are refused. The writes that
    failed are not lost for good: retried with their Idempotency-Key, each is stored once."""
    v2 = Release("v2", version_2(variant, tmp_path / "v2"), variant.python)
    with deployment(variant, tmp_path, 0) as fleet:
        balancer = fleet.balancer
        with Traffic("deploy without drain", balancer.url, variant.headers) as deploy:
            settle()
            migrated = v2.run(fleet.env, "-m", "acme_orders", "migrate")
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr
            fleet.roll(v2, ["c", "d"])
            settle()
        refused = balancer.backend_errors()

        async def retry(keys: list[str]) -> list[Outcome]:
            async with httpx2.AsyncClient(
                base_url=balancer.url, headers=variant.headers, timeout=10
            ) as client:
                return [await write(client, key) for key in keys]

        failed = [o.key for o in deploy.outcomes if o.kind == "write" and o.result != "201"]
        retried = asyncio.run(retry(failed))
        fleet.stop()
    failures = deploy.failures()
    log.info("balancer: %s; unready after SIGTERM: %s s", dict(refused), fleet.unready_after)
    assert sum(failures.values()) > 0, deploy.results()
    assert refused["econ"] > 0, refused  # refused by the replica, as the balancer saw it
    assert [o.result for o in retried] == ["201"] * len(failed)
    assert_no_write_lost(variant, deploy)
    stored = stored_notes(variant)
    assert all(f"rollout {key}" in stored for key in failed)
