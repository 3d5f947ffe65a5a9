"""Fixtures shared by the template's tests: the render plan, interpreters, services."""

import hashlib
import itertools
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import credentials
from .matrix import Plan, Rendered, build_plan, combo_id, default_answers
from .service import release_ports

# Bytecode caches on, for this process and every one it starts (xdist workers, copier, uv,
# each project's pytest and servers). Some images set PYTHONDONTWRITEBYTECODE=1 (this
# machine's does): then every process compiles each module it imports from source again,
# and a project's server took 3.5 s instead of 1.4 s to import. The service's image keeps
# the variable, with bytecode compiled at build (Dockerfile: UV_COMPILE_BYTECODE).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

POSTGRES_ADMIN_URL = os.environ.get(
    "PRODREADY_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PRODREADY_REDIS_URL", "redis://127.0.0.1:6379/0")
UV = Path(sys.executable).with_name("uv")

_plan: Plan | None = None


def plan() -> Plan:
    global _plan  # computed once per process, shared by collection and tests
    if _plan is None:
        _plan = build_plan()
    return _plan


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "databases(*names): run on variants with these databases")
    config.addinivalue_line("markers", "redis: run on variants that use Redis")
    config.addinivalue_line("markers", "per_source: run once per distinct service source")
    config.addinivalue_line(
        "markers",
        "not_on_assistant_runners: leave out the sources whose suite test_agents.py runs",
    )
    config.addinivalue_line(
        "markers", "exercises(*answers): run once per combination of these answers' values"
    )
    config.addinivalue_line("markers", "default_answers: run on the default answers' variant only")
    for stage in ("rendered", "tested", "booted"):
        config.addinivalue_line("markers", f"stage_{stage}: counts toward the '{stage}' total")
    started, cpu = time.monotonic(), cpu_seconds()
    plan()  # the xdist controller renders; workers find the renders cached
    _phase_seconds["render (plan, in the controller)"] += time.monotonic() - started
    _phase_cpu["render (plan, in the controller)"] += cpu_seconds() - cpu


# --- scheduling ---------------------------------------------------------------------------

# Tests that run a project's whole test suite (one to three minutes each) go first: queued
# in collection order, the last of them kept one worker busy minutes after the others
# had run out of work.
LONGEST_FIRST = (
    "test_update.py::test_a_project_from_before_the_platform_split",
    "test_update.py::test_changing_an_answer",
    "test_update.py::test_update_keeps_user_edits",
    "test_rules.py::test_the_",
    "test_agents.py::test_every_command_in_agents_md",
    "test_projects.py::test_own_test_suite_passes",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not any(longest in item.nodeid for longest in LONGEST_FIRST))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: two workers more than the cores. A worker spends much of its time waiting
    on the servers it started, on timeouts it provokes and on subprocesses' I/O; with one
    per core, about a third of the CPU stayed idle (2 cores: 35.5 min with 2 workers, 27
    with 3; with 3, the CPU was 84% busy while every worker was inside a test 97% of the
    time; 4 workers with hard-linked installs: 24.3 min, 92% busy). Six were slower than four
    on a faster machine (17.3 min against 16.2): more processes competing for two cores used
    18% more CPU for the same tests."""
    return len(os.sched_getaffinity(0)) + 2


# --- interpreters -----------------------------------------------------------------------------


def find_python(version: str) -> Path:
    """The interpreter a project answering `python_version: VERSION` runs on. Never skipped:
    a missing interpreter fails the tests that need it."""
    override = os.environ.get(f"PRODREADY_PYTHON_{version.replace('.', '_')}")
    candidates = [Path(override)] if override else []
    if found := shutil.which(f"python{version}"):
        candidates.append(Path(found))
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(pyenv_root.glob(f"versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in candidates:
        # Ask the interpreter for its own path: a pyenv shim is a script, and a venv built
        # on it would run against the shim's global site-packages.
        probe = subprocess.run(
            [
                str(candidate),
                "-c",
                "import sys; print('%d.%d' % sys.version_info[:2], sys.executable)",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        found_version, _, executable = probe.stdout.strip().partition(" ")
        if probe.returncode == 0 and found_version == version:
            return Path(executable)
    pytest.fail(
        f"no Python {version} interpreter found (set PRODREADY_PYTHON_{version.replace('.', '_')})"
    )


def uv_env() -> dict[str, str]:
    """One shared uv cache for every rendered project; never download an interpreter.
    PYTEST_ADDOPTS is this suite's: passed on, `-n 3` broke every project's own pytest."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VIRTUAL_ENV", "PYENV_VERSION", "PYTEST_ADDOPTS"))
    }
    env["UV_PYTHON_DOWNLOADS"] = "never"
    # Hard links from the cache (uv's default on Linux; it copies, with a warning, when the
    # cache is on another filesystem): a copy wrote 145 MB and spent 1.2 s of system CPU per
    # install, each of some 70 installs a run. Nothing edits an installed file in place.
    env.setdefault("UV_LINK_MODE", "hardlink")
    return env


# --- services ------------------------------------------------------------------------------


def require_service(host: str, port: int, name: str) -> None:
    with socket.socket() as sock:
        sock.settimeout(3)
        if sock.connect_ex((host, port)) != 0:
            pytest.fail(
                f"{name} is not reachable on {host}:{port}; .ci/run starts it (never skipped)"
            )


@pytest.fixture(scope="session")
def postgres_admin() -> str:
    require_service("127.0.0.1", 5432, "PostgreSQL")
    return POSTGRES_ADMIN_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_service("127.0.0.1", 6379, "Redis")
    return REDIS_URL


def create_database(admin_url: str, name: str) -> str:
    """A fresh, empty database; returns its URL."""
    import psycopg

    assert re.fullmatch(r"[a-z0-9_]+", name)
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        connection.execute(f"CREATE DATABASE {name}")
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- installed variants ----------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize the `installed` fixture with one representative per service variant,
    narrowed by a `databases(...)` marker; each variant's tests stay on one xdist worker."""
    if "installed" not in metafunc.fixturenames:
        return
    representatives = plan().representatives()
    if marker := metafunc.definition.get_closest_marker("databases"):
        representatives = [r for r in representatives if r.answers["database"] in marker.args]
    if metafunc.definition.get_closest_marker("redis"):
        representatives = [r for r in representatives if r.answers["redis"]]
    if metafunc.definition.get_closest_marker("per_source"):
        representatives = one_per_source(representatives)
    if metafunc.definition.get_closest_marker("not_on_assistant_runners"):
        covered = {source_digest(r) for r in assistant_runners() if not follows_the_recipe(r)}
        representatives = [r for r in representatives if source_digest(r) not in covered]
    if marker := metafunc.definition.get_closest_marker("exercises"):
        representatives = one_per_combination(representatives, marker.args)
    if metafunc.definition.get_closest_marker("default_answers"):
        defaults = plan().by_id(combo_id(default_answers()))
        representatives = [r for r in representatives if r.fingerprint == defaults.fingerprint]
    metafunc.parametrize(
        "installed",
        [
            pytest.param(r, id=r.id, marks=pytest.mark.xdist_group(r.fingerprint))
            for r in representatives
        ],
        indirect=True,
        scope="session",
    )


def one_per_source(representatives: list[Rendered]) -> list[Rendered]:
    """One variant per distinct service source: variants whose src/ and tests/ are
    byte-identical (they differ only in `python_version`, or in answers that shape
    documents) run the same code, so behaviour tests run once per source, on
    interpreters taken in turn so every version is used. Every variant still installs
    and boots (test_projects.py)."""
    by_source: dict[str, list[Rendered]] = {}
    for rendered in sorted(representatives, key=lambda r: r.id):
        by_source.setdefault(source_digest(rendered), []).append(rendered)
    chosen = []
    for index, group in enumerate(by_source.values()):
        group.sort(key=lambda r: r.answers["python_version"])
        chosen.append(group[index % len(group)])
    return chosen


def assistant_runners() -> list[Rendered]:
    """The variants test_agents.py runs AGENTS.md's commands on, its `uv run pytest`
    included: one per database value; across them, each auth answer and each python
    version once where the variants allow, and redis both ways. Where no recipe is followed
    first (follows_the_recipe), that `uv run pytest` runs the rendered source's own suite,
    which test_projects.py then leaves out (marker `not_on_assistant_runners`)."""
    chosen: list[Rendered] = []
    for database in ("postgresql", "sqlite", "none"):
        candidates = [r for r in plan().representatives() if r.answers["database"] == database]

        def novelty(rendered: Rendered) -> int:
            return sum(
                all(other.answers[name] != rendered.answers[name] for other in chosen)
                for name in ("auth", "python_version", "redis")
            )

        chosen.append(max(candidates, key=novelty))
    return chosen


def follows_the_recipe(rendered: Rendered) -> bool:
    """The PostgreSQL runner follows AGENTS.md's "add an endpoint" recipe (a table and a
    migration) before its tests run, so its suite runs on a changed tree."""
    return rendered.answers["database"] == "postgresql"


def one_per_combination(
    representatives: list[Rendered], answers: tuple[str, ...]
) -> list[Rendered]:
    """One variant per combination of the values of `answers`: a behaviour test marked
    `exercises(...)` tests code that only those answers shape (the database's pool and
    migrations do not change with `auth`, the drain's resources do not change with it
    either), so it runs once per combination of their values. The variant for each is
    taken in turn among those selected, so every value of the other answers still runs."""
    groups: dict[tuple[object, ...], list[Rendered]] = {}
    for rendered in sorted(representatives, key=lambda r: r.id):
        groups.setdefault(tuple(rendered.answers[name] for name in answers), []).append(rendered)
    return [group[index % len(group)] for index, group in enumerate(groups.values())]


def source_digest(rendered: Rendered) -> str:
    return tree_source_digest(rendered.path, rendered.files)


def tree_source_digest(project: Path, files: Iterable[str] | None = None) -> str:
    """What a project's own suite runs: its src/ and tests/, file by file (`files`: the
    files as rendered; by default every file now in the tree but bytecode caches)."""
    if files is None:
        files = [
            p.relative_to(project).as_posix()
            for p in sorted(project.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        ]
    digest = hashlib.sha256()
    for relative in files:
        if relative.startswith(("src/", "tests/")):
            digest.update(relative.encode() + b"\0" + (project / relative).read_bytes())
    return digest.hexdigest()


@dataclass
class Project:
    rendered: Rendered
    path: Path
    env: dict[str, str]  # what the service needs to run: ENVIRONMENT and its services

    @property
    def python(self) -> Path:
        return self.path / ".venv" / "bin" / "python"

    @property
    def headers(self) -> dict[str, str]:
        """Credentials for the service's protected routes (every route but health checks)."""
        auth = self.rendered.answers["auth"]
        return credentials.headers(auth, self.python, self.path, self.env)

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout
        )


def install(rendered: Rendered) -> None:
    """uv sync, once per variant across all xdist workers, on the interpreter its answer
    names. A file lock plus a marker: any worker may be first to need a variant."""
    from filelock import FileLock

    marker = install_marker(rendered)
    with FileLock(str(rendered.path.parent / "install.lock")):
        if marker.exists():
            return
        started = time.monotonic()
        python = find_python(rendered.answers["python_version"])
        result = subprocess.run(
            [UV, "sync", "--python", str(python), "--quiet"],
            cwd=rendered.path,
            env=uv_env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr
        marker.write_text(f"{time.monotonic() - started:.2f}\n")  # seconds, for the summary


def install_marker(rendered: Rendered) -> Path:
    return rendered.path / ".venv" / ".prodready-installed"


@pytest.fixture(scope="session")
def installed(request: pytest.FixtureRequest) -> Rendered:
    install(request.param)
    return request.param


@pytest.fixture
def variant(
    installed: Rendered, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Project]:
    """The installed project with a fresh database (and the shared Redis) for one test."""
    answers = installed.answers
    env = {k: v for k, v in uv_env().items() if not k.startswith("UV_")}
    env.update(ENVIRONMENT="test", LOG_FORMAT="json")
    env.update(credentials.service_env(answers["auth"]))
    # Tests that are not about rate limits must not trip them; test_runtime.py turns them on.
    env.update(RATE_LIMIT_ENABLED="false", RATE_LIMIT_NAMESPACE=f"suite-{uuid.uuid4().hex}")
    database = None
    if answers["database"] == "postgresql":
        postgres_admin = request.getfixturevalue("postgres_admin")
        database = f"prodready_{installed.fingerprint}_{next(_database_numbers)}_{os.getpid()}"
        env["DATABASE_URL"] = create_database(postgres_admin, database)
    elif answers["database"] == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{tmp_path}/app.db"
    if answers["redis"]:
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    yield Project(installed, installed.path, env)
    if database:
        drop_database(request.getfixturevalue("postgres_admin"), database)


_database_numbers = itertools.count()


# --- summary -------------------------------------------------------------------------------

_outcomes: Counter[tuple[str, str]] = Counter()
_contract: list[str] = []  # Schemathesis figures per variant (test_contract.py)
# Per xdist worker: [first test's start, last test's end, seconds inside tests] (epoch).
_workers: dict[str, list[float]] = {}
_calls: list[tuple[float, float, str]] = []  # (end, seconds, node id) of each test's call
_phase_seconds: Counter[str] = Counter()
_phase_cpu: Counter[str] = Counter()
_test_cpu: Counter[str] = Counter()  # CPU seconds by test (setup, call and teardown)
_cpu_mark = [0.0]  # this process's and its reaped children's CPU seconds at the last report
_session_started = time.monotonic()
_session_wall_start = time.time()

# Where the time goes, by phase: a test belongs to the first phase whose pattern its node id
# contains (setup, call and teardown summed, across all xdist workers).
PHASES = (
    ("own test suites", "test_projects.py::test_own_test_suite_passes"),
    ("boot and shut down", "test_projects.py::test_boots"),
    ("render and lint", "test_render.py"),
    ("rolling deploy (haproxy)", "test_rollout.py"),
    ("behaviour (real processes)", "test_runtime.py"),
    ("behaviour (real processes)", "test_data_layer.py"),
    ("behaviour (real processes)", "test_projects.py"),
    ("docker contract", "test_docker.py"),
    ("copier update", "test_update.py"),
    ("assistant commands", "test_agents.py"),
    ("production rules", "test_rules.py"),
    ("benchmark smoke", "test_bench.py"),
    ("deploy manifests", "test_deploy.py"),
    ("contract (Schemathesis)", "test_contract.py"),
    ("monitoring (Prometheus, promtool)", "test_monitoring.py"),
)


def phase_of(nodeid: str) -> str:
    return next((phase for phase, pattern in PHASES if pattern in nodeid), "other")


def cpu_seconds() -> float:
    """CPU of this process and of the children it waited for (servers, installs, suites)."""
    own, children = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """Each report carries the CPU its stage used, so the summary can say where the CPU goes:
    the suite is CPU bound, so CPU, not wall time, is what a cut has to remove."""
    outcome = yield
    now = cpu_seconds()
    outcome.get_result().user_properties.append(("cpu", now - _cpu_mark[0]))
    _cpu_mark[0] = now


def pytest_runtest_logstart() -> None:
    _cpu_mark[0] = cpu_seconds()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _phase_seconds[phase_of(report.nodeid)] += report.duration
    cpu = sum(value for key, value in report.user_properties if key == "cpu")
    _phase_cpu[phase_of(report.nodeid)] += cpu
    _test_cpu[report.nodeid] += cpu
    node = getattr(report, "node", None)  # set on the xdist controller
    worker = node.gateway.id if node is not None else "main"
    span = _workers.setdefault(worker, [report.start, report.stop, 0.0])
    span[0], span[1] = min(span[0], report.start), max(span[1], report.stop)
    span[2] += report.duration
    if report.when == "call":
        _calls.append((report.stop, report.duration, report.nodeid))
        variant = report.nodeid.partition("[")[2].rstrip("]")
        figures = [value for key, value in report.user_properties if key == "schemathesis"]
        _contract.extend(f"{variant}: {value}" for value in figures)
    if report.when == "call" and report.passed:
        for stage in ("rendered", "tested", "booted"):
            if f"stage_{stage}" in report.keywords:
                _outcomes[(stage, "passed")] += 1


def pytest_sessionfinish() -> None:
    release_ports()  # those free_port still holds: their servers never listened


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    current = plan()
    groups = len(current.groups)
    write = terminalreporter.write_line
    write("")
    write(
        f"prodready matrix (template {current.digest}): {len(current.renders)} combinations, "
        f"{groups} distinct service variants"
    )
    write(f"  rendered+linted: {_outcomes[('rendered', 'passed')]}/{len(current.renders)}")
    sources = len(one_per_source(current.representatives()))
    write(
        f"  own test suite passed: {_outcomes[('tested', 'passed')]}/{sources} distinct sources"
        " (each on one interpreter, taken in turn)"
    )
    write(f"  booted and shut down cleanly: {_outcomes[('booted', 'passed')]}/{groups}")
    installs = [
        float(marker.read_text() or 0)
        for r in current.representatives()
        if (marker := install_marker(r)).exists() and marker.stat().st_mtime >= _session_wall_start
    ]
    write(
        f"  time by phase (seconds summed over xdist workers; wall clock "
        f"{time.monotonic() - _session_started:.0f} s):"
    )
    write(f"    {'phase':<34} {'wall':>8} {'CPU':>8}")
    for phase, seconds in _phase_seconds.most_common():
        write(f"    {phase:<34} {seconds:8.1f} {_phase_cpu[phase]:8.1f}")
    write(f"    {'of which uv sync, ' + str(len(installs)) + ' variants':<34} {sum(installs):8.1f}")
    write("  workers (seconds from the session's start; busy: inside tests):")
    for worker, (first, last, busy) in sorted(_workers.items()):
        write(
            f"    {worker:<6} first test at {first - _session_wall_start:6.0f}, last ended at "
            f"{last - _session_wall_start:6.0f}, busy {busy:6.0f}"
        )
    write("  the tests that used the most CPU (seconds, with the processes they waited for)")
    for nodeid, seconds in _test_cpu.most_common(8):
        write(f"    {seconds:6.1f}  {nodeid[:110]}")
    write("  the last tests to end (end, seconds, test): the tail a long test leaves")
    for end, seconds, nodeid in sorted(_calls)[-5:]:
        write(f"    {end - _session_wall_start:6.0f} {seconds:6.0f}  {nodeid[:110]}")
    for figures in sorted(_contract):
        write(f"  schemathesis {figures}")
    write("  rule: every combination of choice/yes-no answers is rendered and linted; combinations")
    write("  whose service files (all but answers, CI config, Markdown, assistant rules and the")
    write("  Kubernetes deploy files) are byte-identical are installed and booted once, on a")
    write("  representative chosen so every answer value is covered (see tests/matrix.py);")
    write("  variants whose src/ and tests/ are byte-identical share one source, whose own suite")
    write("  and behaviour tests run once.")
    if current.documentation:
        write(
            f"  documentation axes ({', '.join(current.documentation)}): their default adds"
            " files the service never runs to what each other answer renders, so they take"
            " their default in every combination and each other answer is rendered once, on"
            " the defaults."
        )
