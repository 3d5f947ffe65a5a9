"""`copier update` keeps what users did to their project and brings what the template did.

Each test works on a throwaway git repository holding the template as it is on disk, with
release tags the test creates, and on a generated project that is itself a git repository,
as a user's is. Representative set (each value of database, ci and python_version, and
redis both ways; auth is `none` where a user-added route must answer without credentials):

- same-release update: postgresql+redis (github, 3.12, jwt), sqlite (gitlab, 3.11,
  api_key), no database (no CI, 3.13, none);
- update to a newer release over real user edits: postgresql+redis (github, 3.12) and
  sqlite (gitlab, 3.11);
- an answer changed on an existing project: redis no -> yes (sqlite, github, 3.13, jwt) and
  database sqlite -> postgresql (gitlab, 3.12, api_key);
- a project generated before the service/platform split (release 407de00, kept in
  tests/releases/) updated to the template on disk, over edits to the example resource and
  to settings (postgresql, github, 3.12, jwt).

Every project that comes out of an update must pass its own `scripts/check` (every
production rule, then its test suite) and boot. A project an answer change produced must be,
file for file, what `copier copy` makes of the new answers, whose service source is one
test_projects.py runs the suite of: its check runs every hook but that suite.
"""

import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from . import lifecycle
from .conftest import drop_database, plan, source_digest, tree_source_digest
from .lifecycle import (
    check,
    commit_all,
    copy,
    git,
    recorded_answers,
    release,
    template_repository,
    update,
)
from .matrix import snapshot_template
from .service import running

OLD, NEW = "1.0.0", "1.1.0"
PACKAGE = "src/acme_orders"

SAME_RELEASE = [
    {"database": "postgresql", "redis": True, "ci": "github", "python_version": "3.12"},
    {
        "database": "sqlite",
        "redis": False,
        "ci": "gitlab",
        "python_version": "3.11",
        "auth": "api_key",
    },
    {"database": "none", "redis": False, "ci": "none", "python_version": "3.13", "auth": "none"},
]
WITH_USER_EDITS = [
    {
        "database": "postgresql",
        "redis": True,
        "ci": "github",
        "python_version": "3.12",
        "auth": "none",
    },
    {
        "database": "sqlite",
        "redis": False,
        "ci": "gitlab",
        "python_version": "3.11",
        "auth": "none",
    },
]
ANSWER_CHANGES = [
    (
        {"database": "sqlite", "redis": False, "ci": "github", "python_version": "3.13"},
        {"redis": "true"},
    ),
    (
        {
            "database": "sqlite",
            "redis": False,
            "ci": "gitlab",
            "python_version": "3.12",
            "auth": "api_key",
        },
        {"database": "postgresql"},
    ),
]


def ident(answers: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in answers.items())


EnvFor = Callable[[Path, str], dict[str, str]]


@pytest.fixture
def env_for(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EnvFor]:
    """The shell a developer of `project` has (lifecycle.command_env), with a fresh database
    named `name` when the project uses PostgreSQL; dropped after the test."""
    admin = request.getfixturevalue("postgres_admin")
    redis_url = request.getfixturevalue("redis_url")
    created: list[str] = []

    def make(project: Path, base: str) -> dict[str, str]:
        answers = recorded_answers(project)
        name = lifecycle.database_name(base)
        if answers["database"] == "postgresql":
            created.append(name)
        return lifecycle.command_env(
            answers, tmp_path, postgres_admin=admin, redis_url=redis_url, name=name
        )

    yield make
    for name in created:
        drop_database(admin, name)


def assert_checks_and_boots(
    project: Path, env: dict[str, str], paths: list[str], *, suite: bool = True
) -> None:
    """After `uv sync` (an update may change dependencies), the project passes its own
    definition of done, migrates and serves. `suite=False`: every hook of the check but the
    test suite, for a project whose source is one test_projects.py runs the suite of."""
    synced = lifecycle.run(project, env, "uv sync --quiet && cp -n .env.example .env")
    assert synced.returncode == 0, synced.stderr  # .env: local settings, as README.md says
    result = check(project, env if suite else {**env, "SKIP": "tests"})
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    python = project / ".venv" / "bin" / "python"
    if (project / PACKAGE / "migrations").is_dir():
        migrated = lifecycle.run(project, env, "uv run python -m acme_orders migrate")
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    with running(python, project, env) as (base, _):
        for path in paths:
            response = httpx2.get(f"{base}{path}", timeout=10)
            assert response.status_code == 200, (path, response.status_code, response.text)


# --- 1. same release: nothing changes ---------------------------------------------------------


@pytest.mark.parametrize("answers", SAME_RELEASE, ids=ident)
def test_update_to_the_same_release_changes_nothing(
    answers: dict[str, Any], tmp_path: Path
) -> None:
    repo = template_repository(tmp_path / "prodready", OLD)
    project = copy(repo, tmp_path / "work", answers, OLD)
    recorded = recorded_answers(project)
    assert recorded["_src_path"] == str(repo)
    assert recorded["_commit"] == OLD
    assert not list(project.rglob("uv.lock")), "a lock file is the project's, never rendered"

    update(project, OLD)

    assert git(project, "status", "--porcelain") == ""


# --- 2. newer release over real user edits ----------------------------------------------------

ORDERS_MODULE = '''"""Orders: the team's own resource."""

from fastapi import APIRouter, Request

router = APIRouter(prefix="/orders", tags=["orders"])


@router.get("/summary")
async def summary(request: Request) -> dict[str, int]:
    return {"page_size": request.app.state.settings.orders_page_size}
'''
ORDERS_TEST = '''"""The orders summary reports the page size setting."""

from fastapi.testclient import TestClient


def test_summary_reports_the_page_size(client: TestClient) -> None:
    response = client.get("/orders/summary")
    assert response.status_code == 200
    assert response.json() == {"page_size": 20}
'''
SETTING_LINE = "    orders_page_size: int = Field(default=20, ge=1, le=100)\n"
SETTINGS_ANCHOR = '    """Every setting of this service. Yours go below."""\n'
ENV_EXAMPLE_LINES = "\n# Orders per page in /orders/summary.\n# ORDERS_PAGE_SIZE=20\n"
CHANGELOG_ENTRY = "- Orders summary endpoint.\n"
README_SECTION = "\n## Orders\n\nOur team's notes on the orders resource.\n"
ROUTE_CHANGE = ('@router.get("")\n', '@router.get("", summary="List notes, oldest first")\n')
DEPENDENCY = "filelock==4.2.11"  # small and already in uv's cache (the template suite uses it)
TEMPLATE_DOCSTRING = '"""One logging pipeline for the service, uvicorn and every library.'
NEW_DOCSTRING = '"""One logging pipeline for the service, uvicorn and every library alike.'
TEMPLATE_README_LINE = "- `GET /version`: the running release, for whoever is on call.\n"
VERSION_MODULE = '''"""Which release answers here, for whoever is on call."""

from importlib.metadata import version

from fastapi import APIRouter

router = APIRouter(tags=["meta"])


@router.get("/version")
async def current_version() -> dict[str, str]:
    return {"version": version("{{ package_name | replace('_', '-') }}")}
'''


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: expected one {old!r}"
    path.write_text(text.replace(old, new))


def make_user_edits(project: Path, env: dict[str, str]) -> None:
    package = project / PACKAGE
    (package / "orders.py").write_text(ORDERS_MODULE)
    (project / "tests" / "test_orders.py").write_text(ORDERS_TEST)
    app_py = package / "app.py"
    app_py.write_text(lifecycle.add_router(app_py.read_text(), "orders"))
    edit(package / "notes.py", *ROUTE_CHANGE)
    settings = package / "settings.py"
    edit(settings, SETTINGS_ANCHOR, SETTINGS_ANCHOR + "\n" + SETTING_LINE)
    edit(
        settings,
        "from typing import Any, cast\n",
        "from typing import Any, cast\n\nfrom pydantic import Field\n",
    )
    with (project / ".env.example").open("a") as env_example:
        env_example.write(ENV_EXAMPLE_LINES)
    with (project / "README.md").open("a") as readme:
        readme.write(README_SECTION)
    edit(project / "CHANGELOG.md", "## Unreleased\n", "## Unreleased\n\n" + CHANGELOG_ENTRY)
    git(project, "rm", "--quiet", "compose.staging.yaml")
    added = lifecycle.run(project, env, f"uv add --quiet '{DEPENDENCY}'")
    assert added.returncode == 0, added.stderr
    lifecycle.commit_all(project, "our orders resource")


def make_template_changes(repo: Path) -> None:
    """A release that touches a docstring, a file the user deleted, the README, a new module,
    and app.py on the very lines the user also changed."""
    package = repo / "template" / "src" / "{{ package_name }}"
    edit(package / "platform" / "logs.py", TEMPLATE_DOCSTRING, NEW_DOCSTRING)
    (package / "version.py.jinja").write_text(VERSION_MODULE)
    app = package / "app.py.jinja"
    edit(app, "from . import notes\n", "from . import notes, version\n")
    edit(
        app,
        "[{% if database != 'none' %}notes.router{% endif %}]",
        "[{% if database != 'none' %}notes.router, {% endif %}version.router]",
    )
    edit(
        repo / "template" / "README.md.jinja",
        "## Operate it\n\n",
        "## Operate it\n\n" + TEMPLATE_README_LINE,
    )
    edit(
        repo / "template" / "CHANGELOG.md", "## Unreleased\n", "## Unreleased\n\n- Template line.\n"
    )
    with (repo / "template" / "compose.staging.yaml.jinja").open("a") as staging:
        staging.write("# Staging runs the image CI built, never a local build.\n")
    release(repo, NEW, "version endpoint")


def conflict_blocks(text: str) -> list[tuple[str, str]]:
    """(ours, theirs) for each inline conflict: copier's "before updating" and "after updating"."""
    return re.findall(
        r"^<<<<<<< before updating\n(.*?)^=======\n(.*?)^>>>>>>> after updating\n",
        text,
        re.MULTILINE | re.DOTALL,
    )


def take_theirs(text: str) -> str:
    return re.sub(
        r"^<<<<<<< before updating\n.*?^=======\n(.*?)^>>>>>>> after updating\n",
        r"\1",
        text,
        flags=re.MULTILINE | re.DOTALL,
    )


@pytest.mark.parametrize("answers", WITH_USER_EDITS, ids=ident)
def test_update_keeps_user_edits_brings_template_changes_and_marks_only_real_conflicts(
    answers: dict[str, Any], tmp_path: Path, env_for: EnvFor
) -> None:
    repo = template_repository(tmp_path / "prodready", OLD)
    project = copy(repo, tmp_path / "work", answers, OLD)
    env = env_for(project, f"prodready_update_{answers['database']}")
    make_user_edits(project, env)
    lock_before = (project / "uv.lock").read_text()
    make_template_changes(repo)

    update(project, NEW)

    package = project / PACKAGE
    # Conflicts only where both sides changed the same lines, marked inline.
    assert lifecycle.files_with_conflict_markers(project) == {f"{PACKAGE}/app.py"}
    assert not list(project.rglob("*.rej"))
    app_py = (package / "app.py").read_text()
    blocks = conflict_blocks(app_py)
    assert blocks, app_py
    ours = "".join(block[0] for block in blocks)
    theirs = "".join(block[1] for block in blocks)
    # The user's import and router on one side, the template's on the other.
    assert "orders.router" in ours
    assert "version" not in ours
    assert "version.router" in theirs
    assert "orders" not in theirs
    # Every user edit survives.
    assert (package / "orders.py").read_text() == ORDERS_MODULE
    assert (project / "tests" / "test_orders.py").read_text() == ORDERS_TEST
    assert ROUTE_CHANGE[1] in (package / "notes.py").read_text()
    assert SETTING_LINE in (package / "settings.py").read_text()
    assert (project / ".env.example").read_text().endswith(ENV_EXAMPLE_LINES)
    assert (project / "README.md").read_text().endswith(README_SECTION)
    assert not (project / "compose.staging.yaml").exists(), "a deleted file stays deleted"
    changelog = (project / "CHANGELOG.md").read_text()
    assert CHANGELOG_ENTRY in changelog, "CHANGELOG.md is the project's own"
    assert "Template line" not in changelog
    assert f'"{DEPENDENCY}"' in (project / "pyproject.toml").read_text()
    assert (project / "uv.lock").read_text() == lock_before
    # Every template change arrives.
    assert NEW_DOCSTRING in (package / "platform" / "logs.py").read_text()
    assert (package / "version.py").exists()
    assert TEMPLATE_README_LINE in (project / "README.md").read_text()
    assert recorded_answers(project)["_commit"] == NEW

    # The check refuses to pass while a conflict is unresolved, and says why.
    lifecycle.commit_all(project, "update to 1.1.0 (conflicted)")
    refused = check(project, env)
    assert refused.returncode != 0
    assert "no merge-conflict markers" in refused.stdout
    assert "app.py" in refused.stdout

    # Resolve as a person would: take the template's side, put our line back.
    (package / "app.py").write_text(lifecycle.add_router(take_theirs(app_py), "orders"))
    lifecycle.commit_all(project, "resolve the update")
    assert_checks_and_boots(project, env, ["/orders/summary", "/version", "/healthz"])


# --- 3. an answer changed on an existing project ----------------------------------------------


@pytest.mark.parametrize(("answers", "change"), ANSWER_CHANGES, ids=lambda v: ident(v))
def test_changing_an_answer_regenerates_the_project_accordingly(
    answers: dict[str, Any], change: dict[str, Any], tmp_path: Path, env_for: EnvFor
) -> None:
    repo = template_repository(tmp_path / "prodready", OLD)
    project = copy(repo, tmp_path / "work", answers, OLD)
    with (project / "README.md").open("a") as readme:
        readme.write(README_SECTION)
    lifecycle.commit_all(project, "our notes")

    update(project, ":current:", change)

    recorded = recorded_answers(project)
    assert {name: str(recorded[name]).lower() for name in change} == change
    assert recorded["_commit"] == OLD, "the template version did not move"
    assert lifecycle.files_with_conflict_markers(project) == set()
    assert (project / "README.md").read_text().endswith(README_SECTION)
    pyproject = (project / "pyproject.toml").read_text()
    env_example = (project / ".env.example").read_text()
    if change.get("redis") == "true":
        assert (project / PACKAGE / "platform" / "redis_client.py").exists()
        assert '"redis==' in pyproject
        assert "\nREDIS_URL=" in env_example
    if change.get("database") == "postgresql":
        assert '"asyncpg==' in pyproject
        assert '"aiosqlite==' not in pyproject
        assert "DATABASE_URL=postgresql://" in env_example
    # What the update made is what copier makes of the new answers, file for file (the
    # user's README section aside), and that render's service source is one whose own suite
    # test_projects.py runs: the suite would run the same tests on the same code again.
    now = {name: value for name, value in recorded.items() if not name.startswith("_")}
    fresh = copy(repo, tmp_path / "fresh", now, OLD)
    ours, theirs = tree(project), tree(fresh)
    assert sorted(ours.keys() ^ theirs.keys()) == []
    assert ours.pop("README.md") == theirs.pop("README.md") + README_SECTION.encode()
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    tested = {source_digest(rendered) for rendered in plan().representatives()}
    assert tree_source_digest(fresh) in tested, "no tested source has this code"
    lifecycle.commit_all(project, "change an answer")
    env = env_for(project, f"prodready_answer_{next(iter(change))}")
    assert_checks_and_boots(project, env, ["/healthz", "/readyz"], suite=False)


def tree(project: Path) -> dict[str, bytes]:
    """Every file of a project as generated (not git's, not the virtualenv's)."""
    return {
        path.relative_to(project).as_posix(): path.read_bytes()
        for path in sorted(project.rglob("*"))
        if path.is_file() and not {".git", ".venv", "__pycache__"} & set(path.parts)
    }


# --- renamed questions: _migrations carry the answer over ------------------------------------

CUSTOM_EMAIL = "orders-team@example.org"
MIGRATION = """
_migrations:
  - version: "1.1.0"
    when: "{{ _stage == 'before' }}"
    command: ["{{ _copier_python }}", "{{ _copier_conf.src_path }}/hooks/answers.py",
              "rename", "author_email", "maintainer_email"]
"""


@pytest.mark.parametrize("with_migration", [True, False], ids=["with-migration", "without"])
def test_a_renamed_question_keeps_its_answer_through_a_migration(
    tmp_path: Path, with_migration: bool
) -> None:
    """copier.yml renames no question yet; prove the mechanism its comment documents on a
    release that renames `author_email` to `maintainer_email`: with the `_migrations` entry
    (hooks/answers.py) the project keeps its answer; without it, the answer is lost."""
    repo = template_repository(tmp_path / "prodready", OLD)
    answers = {"database": "none", "ci": "none", "auth": "none", "author_email": CUSTOM_EMAIL}
    project = copy(repo, tmp_path / "work", answers, OLD)
    assert f'email = "{CUSTOM_EMAIL}"' in (project / "pyproject.toml").read_text()

    for path in [repo / "copier.yml", *(repo / "template").rglob("*.jinja")]:
        text = path.read_text()
        if "author_email" in text:
            path.write_text(text.replace("author_email", "maintainer_email"))
    if with_migration:
        with (repo / "copier.yml").open("a") as config:
            config.write(MIGRATION)
    release(repo, NEW, "rename author_email to maintainer_email")

    update(project, NEW)

    recorded = recorded_answers(project)
    assert "author_email" not in recorded
    kept = f'email = "{CUSTOM_EMAIL}"' in (project / "pyproject.toml").read_text()
    assert kept == with_migration
    assert (recorded["maintainer_email"] == CUSTOM_EMAIL) == with_migration
    assert lifecycle.files_with_conflict_markers(project) == set()


# --- 4. the release before the layout split ---------------------------------------------------

BEFORE_SPLIT = (
    Path(__file__).parent / "releases" / "407de00.tar.gz"
)  # copier.yml, template/, hooks/
OLD_SETTINGS_ANCHOR = re.compile(r"^    readiness_timeout: .*\n", re.MULTILINE)
OLD_MODULES = ["auth.py", "errors.py", "db.py", "ratelimit.py", "server.py", "testing.py"]
SETTING_TEST = '''"""Our page-size setting exists, with its default."""

from acme_orders.settings import Settings


def test_orders_page_size_defaults_to_20() -> None:
    assert Settings.model_fields["orders_page_size"].default == 20
'''


def test_a_project_from_before_the_platform_split_updates_keeping_its_edits(
    tmp_path: Path, env_for: EnvFor
) -> None:
    """Release 407de00 had every module side by side in src/acme_orders/; the update moves
    the platform under platform/, keeps the user's edit to the example resource as it is,
    marks the settings (rewritten by both sides) as a conflict, and once that is resolved
    the project passes its check and serves."""
    repo = tmp_path / "prodready"
    repo.mkdir()
    with tarfile.open(BEFORE_SPLIT) as archive:
        archive.extractall(repo, filter="data")
    git(repo, "init", "--quiet", "--initial-branch=main")
    release(repo, OLD, "before the split")
    answers = {"database": "postgresql", "redis": False, "ci": "github", "python_version": "3.12"}
    project = copy(repo, tmp_path / "work", answers, OLD)
    env = env_for(project, "prodready_update_split")
    package = project / PACKAGE
    assert all((package / name).exists() for name in OLD_MODULES)
    edit(package / "notes.py", *ROUTE_CHANGE)
    old_settings = (package / "settings.py").read_text()
    anchor = OLD_SETTINGS_ANCHOR.search(old_settings)
    assert anchor
    edit(package / "settings.py", anchor.group(0), anchor.group(0) + SETTING_LINE)
    with (project / ".env.example").open("a") as env_example:
        env_example.write(ENV_EXAMPLE_LINES)
    (project / "tests" / "test_orders_setting.py").write_text(SETTING_TEST)
    commit_all(project, "our page size")

    for path in [p for p in repo.iterdir() if p.name != ".git"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    snapshot_template(repo)
    release(repo, NEW, "the platform split")
    update(project, NEW)

    assert (package / "platform" / "app.py").exists()
    assert not [name for name in OLD_MODULES if (package / name).exists()], "moved, not copied"
    assert ROUTE_CHANGE[1] in (package / "notes.py").read_text(), "an edit in place merges"
    assert "from .platform." in (package / "notes.py").read_text(), "the template's side too"
    assert lifecycle.files_with_conflict_markers(project) == {f"{PACKAGE}/settings.py"}
    blocks = conflict_blocks((package / "settings.py").read_text())
    assert any(SETTING_LINE in ours for ours, _ in blocks), "the user's line is shown, not lost"
    assert (project / ".env.example").read_text().endswith(ENV_EXAMPLE_LINES)
    assert (project / "tests" / "test_orders_setting.py").read_text() == SETTING_TEST

    # Resolve as the settings module now asks: the field goes into Settings.
    resolved = take_theirs((package / "settings.py").read_text())
    resolved = resolved.replace(SETTINGS_ANCHOR, SETTINGS_ANCHOR + "\n" + SETTING_LINE)
    resolved = resolved.replace(
        "from typing import Any, cast\n",
        "from typing import Any, cast\n\nfrom pydantic import Field\n",
    )
    (package / "settings.py").write_text(resolved)
    commit_all(project, "update to the platform layout")
    assert_checks_and_boots(project, env, ["/healthz"])
