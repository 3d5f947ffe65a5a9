"""RUNBOOK.md, the generated project's operating steps: every name it shows exists, and its
commands that can run here are run, taken from RUNBOOK.md itself.

Names: on every distinct RUNBOOK.md of the matrix (with the render it came with), each
backticked path, setting, `python -m` command, route, readiness check, log event, flag,
pipeline job and variable exists in that render; a planted wrong name of each kind is
found. With `deploy: kubernetes`, the objects, namespaces, label and Secret keys it names
exist in the kustomize build of the production overlay.

Commands: the fenced blocks marked `<!-- runbook-test: NAME -->` run, as written, on an
installed PostgreSQL variant against its own fresh database and a running server: the
kill switch (the flags-file flip turns a flagged field off without a restart; the pinned
variable keeps it off over the file), the backup with `pg_dump` and the restore into a
scratch database with `pg_restore` (the note written before is there), and the schema
rollback's `alembic` commands on that restored copy. `DRY_RUN=1 scripts/deploy`, the
runbook's preview of a deploy, runs on a render with `deploy: kubernetes`.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import psycopg
import pytest
import yaml

from .conftest import POSTGRES_ADMIN_URL, UV, Project, drop_database, plan, source_digest
from .matrix import Rendered
from .service import running
from .test_agents import (
    CODE_SPAN,
    COMMAND,
    HEADER,
    NOT_RENDERED,
    PATH,
    VARIABLE,
    Sources,
    path_exists,
    read_sources,
)

# A fenced block, indented or not (the runbook has one inside a list item).
CODE_FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
BLOCK = re.compile(
    r"^<!-- runbook-test: (?P<name>[\w-]+) -->\n```sh\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL
)
TABLE_EVENT = re.compile(r"^\s*\| `(?P<event>[^`]+)` \|", re.MULTILINE)
LOGGED_EVENT = re.compile(r"logs\s+`(?P<event>[^`]+)`")
CHECK_NAME = re.compile(r"[a-z]+:[a-z]+")  # `database:responsive`
# A job, an environment, a flag, a log field or JSON key (`failed_checks`, `observedValue`).
NAME = re.compile(r"[a-z][A-Za-z0-9_]*(?:-[a-z0-9]+)*")
TOOLS = frozenset({"pg_dump", "pg_restore"})  # PostgreSQL's: run by the test below
REGISTRY_REFERENCE = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)+/")  # `ghcr.io/<owner>/...`
# What `deploy: kubernetes` brings: its manifests and scripts, checked against the
# kustomize build below.
KUBERNETES_PATH = re.compile(r"deploy/|scripts/(?:deploy|rollback)\b")
APP = "acme-orders"
PACKAGE = "acme_orders"
FLAG = "notes-word-count"
WORD = re.compile(r"[\w-]+")
PINNED_OFF = re.compile(r"\b(?P<name>FEATURE_[A-Z0-9_]+)=false\b")


def blocks(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for match in BLOCK.finditer(text):
        assert match.group("name") not in found, f"two blocks named {match.group('name')}"
        found[match.group("name")] = match.group("body")
    return found


# --- every name RUNBOOK.md shows exists in its render ----------------------------------------


@dataclass
class Render:
    """What a RUNBOOK.md is checked against: its render's sources, flags, files, and every
    word of its files that are not documents (code, settings, pipelines, scripts)."""

    rendered: Rendered
    sources: Sources
    flags: frozenset[str]  # the keys of `flag("...")` in src/
    words: frozenset[str]

    @classmethod
    def of(cls, rendered: Rendered) -> "Render":
        sources, flags, words = source_facts(rendered)
        others = [
            relative
            for relative in rendered.files
            if not relative.startswith(("src/", "tests/"))
            and not relative.endswith((".md", ".mdc", ".lock"))
        ]
        text = "\n".join((rendered.path / relative).read_text() for relative in others)
        return cls(rendered, sources, flags, words | frozenset(WORD.findall(text)))

    def has_word(self, word: str) -> bool:
        return word in self.words


_source_digests: dict[str, str] = {}  # fingerprint -> source digest
_source_facts: dict[str, tuple[Sources, frozenset[str], frozenset[str]]] = {}


def source_of(rendered: Rendered) -> str:
    if rendered.fingerprint not in _source_digests:
        _source_digests[rendered.fingerprint] = source_digest(rendered)
    return _source_digests[rendered.fingerprint]


def source_facts(rendered: Rendered) -> tuple[Sources, frozenset[str], frozenset[str]]:
    """What src/ and tests/ define, once per distinct source."""
    digest = source_of(rendered)
    if digest not in _source_facts:
        text = "\n".join(
            (rendered.path / relative).read_text()
            for relative in rendered.files
            if relative.startswith(("src/", "tests/"))
        )
        flags = frozenset(re.findall(r'flag\("([^"]+)"\)', text))
        _source_facts[digest] = (read_sources(rendered.path), flags, frozenset(WORD.findall(text)))
    return _source_facts[digest]


def kubernetes_names(text: str) -> set[str]:
    """The Kubernetes names a RUNBOOK.md shows: objects, namespaces (checked against the
    manifests, below)."""
    names = {span for span in spans(text) if span == APP or span.startswith(f"{APP}-")}
    for code in [*CODE_FENCE.findall(text), *spans(text)]:
        names |= set(re.findall(rf"\b(?:deployment|secret)/({APP}[\w-]*)", code))
        names |= set(re.findall(r"--namespace=([\w-]+)", code))
        names |= set(re.findall(rf"generic ({APP}[\w-]*)", code))
    return names


def secrets_referenced(value: Any) -> set[str]:
    """Names of the Secrets the objects read (secretKeyRef, secretRef)."""
    if isinstance(value, list):
        return set().union(*map(secrets_referenced, value)) if value else set()
    if not isinstance(value, dict):
        return set()
    found = {
        value[key]["name"]
        for key in ("secretKeyRef", "secretRef")
        if isinstance(value.get(key), dict) and "name" in value[key]
    }
    return found.union(*map(secrets_referenced, value.values()))


def spans(text: str) -> list[str]:
    prose = CODE_FENCE.sub("", text)
    return list(dict.fromkeys(" ".join(m.group(1).split()) for m in CODE_SPAN.finditer(prose)))


def runbook_problems(text: str, render: Render) -> list[str]:
    sources, files = render.sources, frozenset(render.rendered.files)
    problems: list[str] = []
    events = {m.group("event") for m in TABLE_EVENT.finditer(text)}
    events |= {m.group("event") for m in LOGGED_EVENT.finditer(text)}
    for event in sorted(events):
        if event not in sources.strings:
            problems.append(f"`{event}`: no log event of that name in src/")
    flags = render.flags
    for span in spans(text):
        if span in events:
            continue
        if command := COMMAND.fullmatch(span):
            if command.group("module") != sources.package or (
                command.group("command") and command.group("command") not in sources.commands
            ):
                problems.append(f"`{span}`: no such command")
        elif span.startswith("/"):
            if span not in sources.strings:
                problems.append(f"`{span}`: no route {span} in src/")
        elif CHECK_NAME.fullmatch(span):
            if span not in sources.strings:
                problems.append(f"`{span}`: no readiness check {span}")
        elif variable := VARIABLE.fullmatch(span):
            name = variable.group("name")
            known = (
                name.lower() in sources.settings_fields
                or any(name.startswith(prefix) for prefix in sources.variable_prefixes)
                or render.has_word(name)  # KUBECONFIG, STAGING_URL: the pipeline's
            )
            if not known:
                problems.append(f"`{span}`: {name} is neither a setting nor used by the render")
            pinned = name.removeprefix("FEATURE_").lower().replace("_", "-")
            if name.startswith("FEATURE_") and pinned not in flags:
                problems.append(f"`{span}`: pins {pinned}, which is no flag in src/")
        elif HEADER.fullmatch(span) or REGISTRY_REFERENCE.match(span) or span.startswith("<"):
            continue  # `X-Request-ID`, `ghcr.io/<owner>/<repository>`, `<...>`
        elif KUBERNETES_PATH.match(span) or span.startswith(APP):
            continue  # the manifests' files and objects: test_the_kubernetes_names_...
        elif NAME.fullmatch(span) and span not in TOOLS:
            # A pipeline job, an environment, a flag, a log field: a word of the render.
            if not render.has_word(span):
                problems.append(f"`{span}`: no job, environment, flag or field of that name")
        elif (
            PATH.fullmatch(span)
            and ("/" in span or "." in span)
            and span not in NOT_RENDERED
            and not path_exists(span, sources.package, files)
        ):
            problems.append(f"`{span}`: no such path")
    for code in CODE_FENCE.findall(text):
        for script in re.findall(r"(?m)(?:^|\s)(scripts/[\w-]+)", code):
            if script not in files and not KUBERNETES_PATH.match(script):
                problems.append(f"`{script}`: no such script")
        for command in re.findall(rf"python -m {PACKAGE} ([a-z][\w-]*)", code):
            if command not in sources.commands:
                problems.append(f"`python -m {PACKAGE} {command}`: no such command")
    found = blocks(text)
    if "kill-switch-file" in found:
        key = next(iter(json.loads(found["kill-switch-file"].split("\n", 1)[1].split("EOF")[0])))
        if key != "<flag-key>" and key not in flags:
            problems.append(f"`{key}`: no flag of that name in src/")
    return problems


def distinct_runbooks() -> list[tuple[str, Rendered]]:
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    found = []
    for rendered in plan().renders:
        text = (rendered.path / "RUNBOOK.md").read_text()
        key = (text, source_of(rendered), rendered.files)
        if key not in seen:
            seen.add(key)
            found.append((text, rendered))
    return found


def test_every_name_in_the_runbook_exists_in_its_render() -> None:
    renders: dict[str, Render] = {}
    problems: dict[str, list[str]] = {}
    runbooks = distinct_runbooks()
    assert len({text for text, _ in runbooks}) > 4
    for text, rendered in runbooks:
        key = f"{source_of(rendered)}:{rendered.files}"
        if key not in renders:
            renders[key] = Render.of(rendered)
        render = renders[key]
        for problem in runbook_problems(text, render):
            problems.setdefault(problem, []).append(rendered.id)
    assert not problems, "RUNBOOK.md names what the render lacks:\n" + "\n".join(
        f"{problem}  (in {len(ids)} renders, e.g. {ids[0]})" for problem, ids in problems.items()
    )


PLANTED = {
    "`database connection lost`": "no log event of that name",
    "`python -m acme_orders restore`": "no such command",
    "`/livez`": "no route /livez",
    "`database:reachable`": "no readiness check database:reachable",
    "`DB_POOL_MAX`": "DB_POOL_MAX is neither a setting nor used by the render",
    "`deploy-prod`": "no job, environment, flag or field of that name",
    "`scripts/backup`": "no such path",
    "`FEATURE_NOTES_WORDS=false`": "pins notes-words, which is no flag in src/",
}


def test_the_runbook_check_finds_planted_wrong_names() -> None:
    text, rendered = next(
        (t, r)
        for t, r in distinct_runbooks()
        if r.answers["database"] == "postgresql" and r.answers["ci"] == "github"
    )
    render = Render.of(rendered)
    assert runbook_problems(text, render) == []
    table_row = "   | `database connection lost` | x | y |\n"
    lines = "\n".join(f"Use {span} here." for span in PLANTED if "connection lost" not in span)
    planted = text.replace("   |---|---|---|\n", "   |---|---|---|\n" + table_row, 1)
    planted += f"\n{lines}\n\n```sh\nscripts/restore\n```\n"
    problems = runbook_problems(planted, render)
    for span, message in PLANTED.items():
        assert any(span in problem and message in problem for problem in problems), (
            span,
            problems,
        )
    assert any("`scripts/restore`: no such script" in problem for problem in problems)


# --- the Kubernetes names, against the manifests ---------------------------------------------


def kubernetes_parts_merged() -> bool:
    """The manifests and scripts of `deploy: kubernetes` are in the template (they arrive
    from their own branch; until then the checks that need them say so and stop)."""
    return any(
        "scripts/deploy" in r.files for r in plan().renders if r.answers["deploy"] == "kubernetes"
    )


def kustomize(project: Path, overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize) is needed: .ci/run installs it"
    result = subprocess.run(
        [kubectl, "kustomize", str(project / "deploy/kubernetes/overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_kubernetes_names_in_the_runbook_exist_in_the_manifests() -> None:
    if not kubernetes_parts_merged():
        pytest.skip("no render has scripts/deploy: the Kubernetes manifests are not merged yet")
    checked: set[tuple[str, str]] = set()
    for text, rendered in distinct_runbooks():
        if rendered.answers["deploy"] != "kubernetes":
            assert "deploy/kubernetes" not in text, rendered.id
            continue
        manifests = "".join(
            (rendered.path / f).read_text() for f in rendered.files if f.startswith("deploy/")
        )
        if (text, manifests) in checked:
            continue
        checked.add((text, manifests))
        files = frozenset(rendered.files)
        named = [s for s in spans(text) if KUBERNETES_PATH.match(s)]
        named += re.findall(r"(?m)(?:^|\s)(scripts/[\w-]+)", "".join(CODE_FENCE.findall(text)))
        for path in named:
            assert path_exists(path.split()[0], PACKAGE, files), (rendered.id, path)
        objects = kustomize(rendered.path, "staging") + kustomize(rendered.path, "production")
        names = {o["metadata"]["name"] for o in objects}
        names |= {o["metadata"].get("namespace") for o in objects} - {None}
        names |= secrets_referenced(objects)  # created out of band, never in the repository
        for name in sorted(kubernetes_names(text)):
            assert name in names, (rendered.id, name, sorted(names))
        deployments = [o for o in objects if o["kind"] == "Deployment"]
        assert {d["metadata"]["name"] for d in deployments} == {APP}
        for deployment in deployments:
            pod = deployment["spec"]["template"]
            assert pod["metadata"]["labels"].get("app.kubernetes.io/component") == "server"
            read = json.dumps(pod["spec"])
            for key in re.findall(r"`([A-Z_]+)=\.\.\.`", text):  # the Secret's keys
                assert f'"{key}"' in read or '"secretRef"' in read, (rendered.id, key)
            ports = {
                port.get("containerPort")
                for container in pod["spec"]["containers"]
                for port in container.get("ports", [])
            }
            assert 8000 in ports, "the runbook port-forwards to 8000"


def test_the_runbooks_dry_run_deploy_prints_the_migration_job_first(tmp_path: Path) -> None:
    if not kubernetes_parts_merged():
        pytest.skip("no render has scripts/deploy: the Kubernetes manifests are not merged yet")
    rendered = next(
        r
        for r in plan().renders
        if r.answers["deploy"] == "kubernetes" and r.answers["ci"] == "github"
    )
    text = (rendered.path / "RUNBOOK.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("DRY_RUN=1 scripts/deploy"))
    image = f"ghcr.io/acme/{APP}@sha256:{'0' * 64}"
    command = line.split("#")[0].replace("<registry>/<name>@sha256:<digest>", image)
    project = tmp_path / APP
    shutil.copytree(rendered.path, project, ignore=shutil.ignore_patterns(".venv"))
    # A kubectl that cannot reach anything: a dry run must not need a cluster.
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-cluster")}
    result = subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = re.findall(r"(?m)^kind: (\w+)", result.stdout)
    assert "Job" in kinds, result.stdout[-3000:]
    assert "Deployment" in kinds, result.stdout[-3000:]
    assert kinds.index("Job") < kinds.index("Deployment"), kinds
    assert image in result.stdout


# --- the runbook's commands, run ---------------------------------------------------------------


def run_block(body: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", body],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{body}\nfailed:\n{result.stdout}{result.stderr}"
    return result


@contextlib.contextmanager
def servers(project: Project, envs: list[dict[str, str]]) -> Iterator[list[str]]:
    """`serve`, once per env, started together; yields their base URLs."""
    managers = [running(project.python, project.path, env) for env in envs]
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(manager.__enter__) for manager in managers]
    entered = [m for m, f in zip(managers, futures, strict=True) if f.exception() is None]
    try:
        yield [future.result()[0] for future in futures]
    finally:
        for manager in entered:
            manager.__exit__(None, None, None)


def word_count(base: str, project: Project, note_id: int) -> int | None:
    response = httpx2.get(f"{base}/notes/{note_id}", headers=project.headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json().get("word_count")


@pytest.mark.databases("postgresql")
@pytest.mark.default_answers
def test_the_runbooks_commands_work_as_written(variant: Project, tmp_path: Path) -> None:
    found = blocks((variant.path / "RUNBOOK.md").read_text())
    assert set(found) == {
        "schema-rollback",
        "kill-switch-file",
        "kill-switch-pin",
        "backup",
        "restore",
    }
    pinned = PINNED_OFF.search(found["kill-switch-pin"])
    assert pinned, found["kill-switch-pin"]
    assert pinned.group("name") == "FEATURE_" + FLAG.upper().replace("-", "_")
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({FLAG: True}))
    env = {**variant.env, "FLAGS_FILE": str(flags), "FLAGS_RELOAD_INTERVAL": "0.1"}
    # Two servers on the flags file that says on, the second with the runbook's pin; started
    # while migrate runs (starting touches no table), to keep this test short.
    migrate = subprocess.Popen(
        [str(variant.python), "-m", PACKAGE, "migrate"],
        cwd=variant.path,
        env=variant.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with servers(variant, [env, {**env, pinned.group("name"): "false"}]) as (base, pinned_base):
        output, _ = migrate.communicate(timeout=120)
        assert migrate.returncode == 0, output
        created = httpx2.post(
            f"{base}/notes",
            json={"title": "kept by the backup", "body": "three words here"},
            headers=variant.headers,
            timeout=10,
        )
        assert created.status_code == 201, created.text
        note = created.json()["id"]
        assert word_count(base, variant, note) == 3
        # The pin keeps the flag off over the file.
        assert word_count(pinned_base, variant, note) is None
        # The file flip, as the runbook writes it: off within the reload interval, no restart.
        run_block(found["kill-switch-file"], tmp_path, {**os.environ, "FLAGS_FILE": str(flags)})
        deadline = time.monotonic() + 10
        while word_count(base, variant, note) is not None:
            assert time.monotonic() < deadline, "the flag is still on after the runbook's flip"
            time.sleep(0.1)

    # Backup, then restore into a scratch database: the note is there.
    script = found["backup"] + found["restore"] + 'echo "restored into: $RESTORE_DB"\n'
    restored = run_block(
        script, tmp_path, {**os.environ, "DATABASE_URL": variant.env["DATABASE_URL"]}
    )
    scratch = re.search(r"restored into: (\w+)", restored.stdout).group(1)
    try:
        assert list(tmp_path.glob(f"{APP}-*.dump")), "pg_dump wrote the dump where it said"
        assert re.search(r"^\s*1\s*$", restored.stdout, re.MULTILINE), restored.stdout
        scratch_url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{scratch}"
        with psycopg.connect(scratch_url) as connection:
            titles = [row[0] for row in connection.execute("SELECT title FROM notes")]
        assert titles == ["kept by the backup"]

        # The schema rollback's commands, on the restored copy: at head, then one back.
        uv_env = {
            **variant.env,
            "DATABASE_URL": scratch_url,
            "PATH": f"{UV.parent}{os.pathsep}{variant.env.get('PATH', '')}",
        }
        rolled = run_block(found["schema-rollback"], variant.path, uv_env)
        assert "(head)" in rolled.stdout, rolled.stdout
        with psycopg.connect(scratch_url) as connection:
            (version,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        assert version == "0001", version
    finally:
        drop_database(POSTGRES_ADMIN_URL, scratch)
