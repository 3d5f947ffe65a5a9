"""A generated project's life after day one: a template git repository with release tags,
`copier copy` and `copier update` into a project that is itself a git repository, and the
project's own commands run the way its README and AGENTS.md tell a person to run them."""

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from .conftest import UV, create_database, find_python, uv_env
from .matrix import (
    PROJECT_DIR_NAME,
    jinja_compiled_once,
    snapshot_template,
    without_git_file_mode_sync,
)

COPIER = UV.with_name("copier")
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "prodready tests",
    "GIT_AUTHOR_EMAIL": "tests@example.org",
    "GIT_COMMITTER_NAME": "prodready tests",
    "GIT_COMMITTER_EMAIL": "tests@example.org",
}


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_IDENTITY},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def commit_all(cwd: Path, message: str) -> None:
    git(cwd, "add", "--all")
    git(cwd, "commit", "--quiet", "--allow-empty", "-m", message)


def template_repository(destination: Path, tag: str) -> Path:
    """The template as it is on disk (committed or not), as a fresh git repository whose
    only commit is tagged `tag`: copier then works exactly as with a published release."""
    repo = snapshot_template(destination)
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, "template")
    git(repo, "tag", tag)
    return repo


def release(repo: Path, tag: str, message: str) -> None:
    commit_all(repo, message)
    git(repo, "tag", tag)


def copy(repo: Path, parent: Path, answers: dict[str, Any], tag: str) -> Path:
    """`copier copy --vcs-ref=TAG`, then `git init` and a first commit, as a user does."""
    from copier import run_copy

    project = parent / PROJECT_DIR_NAME  # so project_name, and the package, default as in tests
    parent.mkdir(parents=True, exist_ok=True)
    with without_git_file_mode_sync(parent), jinja_compiled_once():
        run_copy(
            str(repo),
            str(project),
            data=answers,
            vcs_ref=tag,
            defaults=True,
            quiet=True,
            unsafe=True,
        )
    git(project, "init", "--quiet", "--initial-branch=main")
    commit_all(project, "generated")
    return project


def update(project: Path, ref: str, data: dict[str, str] | None = None) -> None:
    """`copier update --trust --defaults --conflict=inline --vcs-ref=REF [--data NAME=VALUE]`,
    the command the generated README gives, with the copier this suite pins."""
    settings = [
        arg for name, value in (data or {}).items() for arg in ("--data", f"{name}={value}")
    ]
    result = subprocess.run(
        [
            COPIER,
            "update",
            "--trust",
            "--defaults",
            "--quiet",
            "--conflict=inline",
            f"--vcs-ref={ref}",
            *settings,
            str(project),
        ],
        env={**os.environ, **GIT_IDENTITY},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"copier update: {result.stdout}{result.stderr}"


def recorded_answers(project: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((project / ".copier-answers.yml").read_text())


def add_router(app_py: str, module: str) -> str:
    """Import `module` in app.py and add its router to ROUTERS, as a person does: in the
    sorted `from . import ...` line and at the end of the list."""
    imported = re.search(r"^from \. import (.+)\n", app_py, re.MULTILINE)
    if imported:
        names = {name.strip() for name in imported.group(1).split(",")} | {module}
        line = f"from . import {', '.join(sorted(names))}\n"
        app_py = app_py[: imported.start()] + line + app_py[imported.end() :]
    else:
        anchor = "from .platform.app import build_app\n"
        assert anchor in app_py, "app.py imports the platform's build_app"
        app_py = app_py.replace(anchor, f"from . import {module}\n{anchor}")
    routers = re.search(r"^ROUTERS: list\[APIRouter\] = \[(.*)\]\n", app_py, re.MULTILINE)
    assert routers, "app.py lists its routers in ROUTERS"
    listed = [item.strip() for item in routers.group(1).split(",") if item.strip()]
    if f"{module}.router" not in listed:
        listed.append(f"{module}.router")
    line = f"ROUTERS: list[APIRouter] = [{', '.join(listed)}]\n"
    return app_py[: routers.start()] + line + app_py[routers.end() :]


def files_with_conflict_markers(project: Path) -> set[str]:
    return {
        path.relative_to(project).as_posix()
        for path in project.rglob("*")
        if path.is_file()
        and ".git" not in path.relative_to(project).parts
        and ".venv" not in path.relative_to(project).parts
        and "__pycache__" not in path.relative_to(project).parts
        and any(line.startswith("<<<<<<< ") for line in path.read_text().splitlines())
    }


def database_name(base: str) -> str:
    """Unique to this process: several suites may run on one PostgreSQL at once."""
    return f"{base}_{os.getpid()}"


def command_env(
    answers: dict[str, Any], tmp_path: Path, *, postgres_admin: str, redis_url: str, name: str
) -> dict[str, str]:
    """What a developer's shell has when following README.md "Test it": the test settings and
    their services, uv on PATH, and the interpreter the project's python_version names.
    `name` names the fresh database (see database_name) or SQLite file."""
    env = uv_env()
    env["PATH"] = f"{UV.parent}{os.pathsep}{env.get('PATH', '')}"
    env["UV_PYTHON"] = str(find_python(answers["python_version"]))
    env.update(ENVIRONMENT="test", LOG_FORMAT="json")
    if answers["database"] == "postgresql":
        env["DATABASE_URL"] = create_database(postgres_admin, name)
    elif answers["database"] == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{tmp_path}/{name}.db"
    if answers["redis"]:
        env["REDIS_URL"] = redis_url
    return env


def run(
    project: Path, env: dict[str, str], command: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """One shell command line, as typed in the project's root."""
    return subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def check(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The project's definition of done: `scripts/check`."""
    return run(project, env, "scripts/check")
