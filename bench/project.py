"""The default render, installed, migrated and configured like production, and its baseline.

Configuration, within what this machine allows: ENVIRONMENT=development, because
staging and production refuse what a single-machine benchmark needs (JWT_SECRET
instead of an identity provider's JWKS, a loopback database, in-memory rate-limit
counters with WORKERS=2), and because `dev-token` mints a token only with
JWT_SECRET. Everything else is set as production would run it: JSON logs at INFO
(LOG_FORMAT=json), DEBUG off, rate limits on. RATE_LIMIT_DEFAULT is raised so one
principal's load is never throttled; its window is one second, because the `limits`
memory storage keeps one entry per hit in the window: a minute's worth of one client
at full load would price a list no real client (120/minute) ever builds.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "acme_orders"
PROJECT_DIR = "acme-orders"  # copier's default project_name comes from it
BARE_APP = Path(__file__).with_name("bare_app.py")
UV = Path(sys.executable).with_name("uv")
ISSUER = "https://bench.invalid/"
AUDIENCE = "acme-orders"
JWT_SECRET = secrets.token_urlsafe(48)  # per run; never a placeholder


@dataclass(frozen=True)
class Tuning:
    """The settings both apps share."""

    db_pool_size: int = 5
    db_max_overflow: int = 5
    db_pool_timeout: float = 5.0
    rate_limit: str = "100000/second"


def render(destination: Path) -> Path:
    """The default answers (jwt + postgresql), from the working tree as it is."""
    from copier import run_copy

    source = destination / "template-snapshot"
    for name in ("template", "hooks"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "copier.yml", source / "copier.yml")
    project = destination / PROJECT_DIR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_copy(str(source), str(project), defaults=True, unsafe=True, quiet=True)
    return project


def install(project: Path) -> Path:
    """`uv sync` with the shared uv cache; returns the project's interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYENV_"))}
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env.setdefault("UV_LINK_MODE", "hardlink")  # as tests/conftest.py says: no 145 MB copy
    _run([str(UV), "sync", "--quiet"], cwd=project, env=env)
    return project / ".venv" / "bin" / "python"


def base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


def server_env(database_url: str, port: int, workers: int, tuning: Tuning) -> dict[str, str]:
    """What both apps get alike: address, worker count, database and pool."""
    return {
        **base_env(),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": str(workers),
        "DATABASE_URL": database_url,
        "DB_POOL_SIZE": str(tuning.db_pool_size),
        "DB_MAX_OVERFLOW": str(tuning.db_max_overflow),
        "DB_POOL_TIMEOUT": str(tuning.db_pool_timeout),
    }


def generated_env(database_url: str, port: int, workers: int, tuning: Tuning) -> dict[str, str]:
    return {
        **server_env(database_url, port, workers, tuning),
        "ENVIRONMENT": "development",
        "DEBUG": "false",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "RATE_LIMIT_ENABLED": "true",
        "RATE_LIMIT_DEFAULT": tuning.rate_limit,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "JWT_SECRET": JWT_SECRET,
    }


def bare_env(
    database_url: str, port: int, workers: int, tuning: Tuning, owner: str
) -> dict[str, str]:
    return {**server_env(database_url, port, workers, tuning), "NOTES_OWNER": owner}


def generated_command(python: Path) -> list[str]:
    return [str(python), "-m", PACKAGE, "serve"]


def bare_command(python: Path) -> list[str]:
    """The baseline runs on the project's interpreter: the same library versions."""
    return [str(python), str(BARE_APP)]


def migrate(python: Path, root: Path, database_url: str) -> None:
    """`python -m acme_orders migrate`, the project's release step."""
    env = generated_env(database_url, 8000, 1, Tuning())
    _run([str(python), "-m", PACKAGE, "migrate"], cwd=root / PROJECT_DIR, env=env)


def dev_token(python: Path, root: Path, database_url: str, subject: str) -> str:
    """A bearer token from the project's own `dev-token` command (JWT_SECRET, development)."""
    env = generated_env(database_url, 8000, 1, Tuning())
    command = [str(python), "-m", PACKAGE, "dev-token", subject, "--ttl", str(6 * 3600)]
    return _run(command, cwd=root / PROJECT_DIR, env=env).strip()


def package_versions(python: Path) -> dict[str, str]:
    names = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "asyncpg", "pydantic")
    code = (
        "import importlib.metadata as m, json, sys;"
        f"print(json.dumps({{n: m.version(n) for n in {names!r}}}))"
    )
    return json.loads(_run([str(python), "-c", code], cwd=python.parent, env=base_env()))


def _run(command: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{done.stdout}{done.stderr}")
    return done.stdout
