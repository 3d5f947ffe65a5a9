"""Each production rule is a machine check: `scripts/check` fails on a planted violation and
names the rule, and passes again once the violation is gone.

One installed project (PostgreSQL, JWT auth: every rule applies to it) in a fresh git
repository, per xdist worker. Its hooks pass (one test). Each rule that a hook catches is
planted alone; the check stops at the first failing hook (lint before tests), so these runs
are quick. After each, the tree is restored to exactly the generated commit (git status
clean), whose hooks pass (the first test). The three rules the test suite enforces are
planted together, in one unskipped check run: each must fail its own test file, and no
other test may fail, so every failure is attributable to its plant (and the rest of the
suite is shown to pass on this tree).
"""

import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from . import lifecycle
from .conftest import drop_database, plan
from .matrix import Rendered

PACKAGE = "src/acme_orders"
ANSWERS = {"database": "postgresql", "redis": False, "auth": "jwt", "python_version": "3.12"}


def representative() -> Rendered:
    return next(
        r
        for r in plan().renders
        if all(r.answers[name] == value for name, value in ANSWERS.items())
        and r.answers["ci"] == "github"
    )


@dataclass
class Project:
    path: Path
    env: dict[str, str]

    def write(self, relative: str, text: str) -> None:
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def insert_after(self, relative: str, pattern: str, text: str) -> None:
        path = self.path / relative
        source = path.read_text()
        anchor = re.search(pattern, source, re.MULTILINE)
        assert anchor, f"{relative}: no line matches {pattern!r}"
        path.write_text(source[: anchor.end()] + text + source[anchor.end() :])

    def replace(self, relative: str, old: str, new: str) -> None:
        path = self.path / relative
        source = path.read_text()
        assert source.count(old) == 1, f"{relative}: expected one {old!r}"
        path.write_text(source.replace(old, new))

    def restore(self) -> None:
        lifecycle.git(self.path, "checkout", "--", ".")
        lifecycle.git(self.path, "clean", "--force", "-d", "--quiet")  # not -x: keeps .venv
        assert lifecycle.git(self.path, "status", "--porcelain") == ""


@pytest.fixture(scope="session")  # once per xdist worker
def project(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Project]:
    rendered = representative()
    root = tmp_path_factory.mktemp("rules") / "acme-orders"
    shutil.copytree(rendered.path, root, ignore=shutil.ignore_patterns(".venv"))
    lifecycle.git(root, "init", "--quiet", "--initial-branch=main")
    env = lifecycle.command_env(
        rendered.answers,
        root.parent,
        postgres_admin=request.getfixturevalue("postgres_admin"),
        redis_url=request.getfixturevalue("redis_url"),
        name=lifecycle.database_name("prodready_rules"),
    )
    synced = lifecycle.run(root, env, "uv sync --quiet")
    assert synced.returncode == 0, synced.stderr
    lifecycle.commit_all(root, "generated")
    yield Project(root, env)
    drop_database(
        request.getfixturevalue("postgres_admin"), lifecycle.database_name("prodready_rules")
    )


def test_the_generated_project_passes_its_own_check(project: Project) -> None:
    """Every hook but the last: the test suite runs unskipped on this same tree in
    test_the_test_suite_catches_its_rules_in_one_check_run, where only the planted tests
    may fail (and on this source in test_projects.py)."""
    result = lifecycle.run(project.path, {**project.env, "SKIP": "tests"}, "scripts/check")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert re.search(r"^test suite\b.*Skipped$", result.stdout, re.MULTILINE), result.stdout
    assert lifecycle.git(project.path, "status", "--porcelain") == "", "the check changed files"


PLANTED = f"{PACKAGE}/planted.py"


def module(body: str, imports: str = "") -> str:
    return f'"""Planted by the template\'s tests."""\n{imports}\n\n{body}'


RULES: dict[str, tuple[Callable[[Project], None], list[str]]] = {
    "environment read outside settings": (
        lambda p: p.write(
            PLANTED,
            module('def port() -> str | None:\n    return os.getenv("PORT")\n', "\nimport os\n"),
        ),
        ["TID251", "Read configuration through settings.py"],
    ),
    "print in application code": (
        lambda p: p.write(PLANTED, module('def hello() -> None:\n    print("hello")\n')),
        ["T201"],
    ),
    "bare except that swallows": (
        lambda p: p.write(
            PLANTED,
            module(
                "def parse(text: str) -> int:\n    try:\n        return int(text)\n"
                "    except:\n        pass\n    return 0\n"
            ),
        ),
        ["E722", "S110"],
    ),
    "blind except": (
        lambda p: p.write(
            PLANTED,
            module(
                "def parse(text: str) -> int | None:\n    try:\n        return int(text)\n"
                "    except Exception:\n        return None\n"
            ),
        ),
        ["BLE001"],
    ),
    "outbound HTTP without a timeout": (
        lambda p: p.write(
            PLANTED,
            module(
                "async def fetch(url: str) -> bytes:\n"
                "    async with httpx.AsyncClient(timeout=None) as client:\n"
                "        return (await client.get(url)).content\n",
                "\nimport httpx\n",
            ),
        ),
        ["S113"],
    ),
    "hard-coded loopback host in application code": (
        lambda p: p.write(PLANTED, module('UPSTREAM = "http://localhost:9000/orders"\n')),
        ["no hard-coded localhost/127.0.0.1/0.0.0.0 in application code", "planted.py"],
    ),
    "create_all in application code": (
        lambda p: p.write(
            PLANTED,
            module(
                "async def create_tables(engine: AsyncEngine) -> None:\n"
                "    async with engine.begin() as connection:\n"
                "        await connection.run_sync(Base.metadata.create_all)\n",
                "\nfrom sqlalchemy.ext.asyncio import AsyncEngine\n\nfrom .models import Base\n",
            ),
        ),
        ["no create_all or schema DDL in application code", "planted.py"],
    ),
    "schema DDL in application code": (
        lambda p: p.write(
            PLANTED,
            module('ADD_PRIORITY = "ALTER TABLE notes ADD COLUMN priority integer"\n'),
        ),
        ["no create_all or schema DDL in application code", "planted.py"],
    ),
    "committed secret": (
        lambda p: p.write(
            "deploy/values.yaml",
            'database:\n  host: db.internal\n  password: "q8Zt4RwEv2LkP7mXa9"\n',
        ),
        ["no committed secrets", "Secret Keyword", "deploy/values.yaml"],
    ),
    "Kubernetes rolling update that drops capacity": (
        lambda p: p.replace(
            "deploy/kubernetes/base/deployment.yaml",
            "maxUnavailable: 0",
            "maxUnavailable: 1",
        ),
        ["Kubernetes manifests keep their rules", "rolling-update: maxUnavailable is 1, not 0"],
    ),
    "merge-conflict markers": (
        lambda p: p.insert_after(
            "README.md",
            r"\A.*\n",
            "<<<<<<< before updating\nours\n=======\ntheirs\n>>>>>>> after updating\n",
        ),
        ["no merge-conflict markers", "README.md"],
    ),
    "rejected update hunk (.rej)": (
        lambda p: p.write(f"{PACKAGE}/app.py.rej", "@@ -1 +1 @@\n-old\n+new\n"),
        ["no .rej files", "app.py.rej"],
    ),
}


@pytest.mark.parametrize("rule", RULES)
def test_check_catches_the_planted_violation_and_passes_without_it(
    project: Project, rule: str
) -> None:
    plant, names = RULES[rule]
    plant(project)
    try:
        result = lifecycle.check(project.path, project.env)
        assert result.returncode != 0, f"{rule}: the check passed with the violation planted"
        for name in names:
            assert name in result.stdout, f"{rule}: {name!r} not in\n{result.stdout[-4000:]}"
        assert "test suite" not in result.stdout, "a lint rule must stop the check before tests"
    finally:
        project.restore()  # exactly the generated commit again, whose hooks pass (first test)


TEST_RULES = {
    "setting missing from .env.example": (
        lambda p: p.insert_after(
            f"{PACKAGE}/settings.py",
            r'^    """Every setting of this service. Yours go below."""\n',
            "\n    orders_page_size: int = 20\n",
        ),
        "tests/test_env_example.py",
    ),
    "model change without a migration": (  # an index: every query still works, only the
        lambda p: p.replace(  # models-vs-migrations check can tell
            f"{PACKAGE}/models.py",
            "mapped_column(String(TITLE_MAX))",
            "mapped_column(String(TITLE_MAX), index=True)",
        ),
        "tests/test_migrations.py",
    ),
    "public route not on the allowlist": (
        lambda p: (
            p.write(
                f"{PACKAGE}/status.py",
                module(
                    'router = APIRouter()\n\n\n@router.get("/status")\n@public\n'
                    'async def status() -> dict[str, str]:\n    return {"status": "ok"}\n',
                    "\nfrom fastapi import APIRouter\n\nfrom .platform.auth import public\n",
                ),
            ),
            p.write(
                f"{PACKAGE}/app.py",
                lifecycle.add_router((p.path / PACKAGE / "app.py").read_text(), "status"),
            ),
        ),
        "tests/test_auth.py",
    ),
}


def test_the_test_suite_catches_its_rules_in_one_check_run(project: Project) -> None:
    for plant, _ in TEST_RULES.values():
        plant(project)
    try:
        result = lifecycle.check(project.path, project.env)
        assert result.returncode != 0
        assert "test suite" in result.stdout, "lint must pass: only the tests may catch these"
        failed = re.findall(r"^(?:FAILED|ERROR) (tests/[^:\s]+)::", result.stdout, re.MULTILINE)
        # Each plant fails a test of its own file, and nothing else fails.
        assert set(failed) == {test_file for _, test_file in TEST_RULES.values()}, result.stdout[
            -6000:
        ]
    finally:
        project.restore()


def test_every_render_passes_the_grep_rules() -> None:
    """The rules pre-commit checks with a regular expression (`pygrep`) or by file name
    (`fail`) hold on every combination, not only on the projects installed here."""
    for rendered in plan().renders:
        config = yaml.safe_load((rendered.path / ".pre-commit-config.yaml").read_text())
        hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
        for hook in hooks:
            if hook["language"] not in {"pygrep", "fail"}:
                continue
            files = [
                relative
                for relative in rendered.files
                if re.search(hook.get("files", ""), relative)
                and not (hook.get("exclude") and re.search(hook["exclude"], relative))
            ]
            if hook["language"] == "fail":
                assert not files, (rendered.id, hook["id"], files)
                continue
            pattern = re.compile(hook["entry"])
            for relative in files:
                for number, line in enumerate((rendered.path / relative).read_text().splitlines()):
                    assert not pattern.search(line), (rendered.id, hook["id"], relative, number + 1)
