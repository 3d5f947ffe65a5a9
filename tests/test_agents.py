"""AI-assistant instructions: written for the answers given, one text everywhere, and every
command they list works, so the instructions cannot rot.

The "Commands" block of AGENTS.md depends on the answers only through `database` (no
`migrate` without one); every render's block is checked to be the block of its database's
variant, and the commands are run, in order, on one installed variant per database value,
in a fresh copy that is a git repository, with a fresh database (those variants also take
each auth answer and each python version): install, migrate, serve
(it must listen, then stop cleanly on SIGTERM), the tests, lint and `scripts/check`.
"""

import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from . import lifecycle
from .conftest import drop_database, plan
from .matrix import Rendered
from .service import free_port, wait_until_listening

COMMANDS_BLOCK = re.compile(r"^## Commands\n.*?^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)
ASSISTANT_FILES = {
    "claude": "CLAUDE.md",
    "cursor": ".cursor/rules/project.mdc",
    "copilot": ".github/copilot-instructions.md",
}


def commands(project: Path) -> list[str]:
    found = COMMANDS_BLOCK.search((project / "AGENTS.md").read_text())
    assert found, "AGENTS.md has a '## Commands' section with a ```sh block"
    return [line for line in found.group(1).splitlines() if line.strip()]


def runners() -> list[Rendered]:
    """One installed variant per database value; across them, each auth answer and each
    python version once where the variants allow, and redis both ways."""
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


def test_assistant_files_follow_the_answer_and_say_the_same_thing() -> None:
    assert "assistants" in plan().documentation, "assistant files must not multiply installs"
    blocks = {r.answers["database"]: commands(r.path) for r in runners()}
    for rendered in plan().renders:
        project, chosen = rendered.path, rendered.answers["assistants"]
        agents = (project / "AGENTS.md").read_text()
        for name, relative in ASSISTANT_FILES.items():
            assert (project / relative).exists() == (name in chosen), (rendered.id, relative)
        if "claude" in chosen:
            assert "@AGENTS.md" in (project / "CLAUDE.md").read_text().split()
        if "copilot" in chosen:
            assert (project / ASSISTANT_FILES["copilot"]).read_text() == agents
        if "cursor" in chosen:
            text = (project / ASSISTANT_FILES["cursor"]).read_text()
            _, front, body = text.split("---\n", 2)
            assert body == agents, rendered.id
            meta = yaml.safe_load(front)
            assert meta["alwaysApply"] is True
            assert meta["description"]
        assert commands(project) == blocks[rendered.answers["database"]], rendered.id


def test_agents_md_speaks_of_this_project_only() -> None:
    for rendered in plan().renders:
        answers, text = rendered.answers, (rendered.path / "AGENTS.md").read_text()
        has_database = answers["database"] != "none"
        assert ("python -m acme_orders migrate" in text) == has_database, rendered.id
        assert ("alembic revision --autogenerate" in text) == has_database, rendered.id
        assert ("REDIS_URL" in text) == answers["redis"], rendered.id
        backend = {"jwt": "jwt_auth.py", "api_key": "api_keys.py", "none": "gateway_auth.py"}
        assert all(
            (name in text) == (name == backend[answers["auth"]]) for name in backend.values()
        )
        for promise in (
            "settings.py",
            ".env.example",
            "outbound.py",
            "flag(",
            "rate_limit(",
            "@public",
        ):
            assert promise in text, (rendered.id, promise)
        assert "scripts/check" in commands(rendered.path)[-1]


@pytest.mark.parametrize("rendered", runners(), ids=lambda r: r.id)
def test_every_command_in_agents_md_exists_and_passes(
    rendered: Rendered, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    project = tmp_path / "acme-orders"
    shutil.copytree(rendered.path, project, ignore=shutil.ignore_patterns(".venv"))
    lifecycle.git(project, "init", "--quiet", "--initial-branch=main")
    lifecycle.commit_all(project, "generated")
    env = lifecycle.command_env(
        rendered.answers,
        tmp_path,
        postgres_admin=request.getfixturevalue("postgres_admin"),
        redis_url=request.getfixturevalue("redis_url"),
        name=lifecycle.database_name(f"prodready_agents_{rendered.fingerprint}"),
    )
    if rendered.answers["database"] == "postgresql":
        admin = request.getfixturevalue("postgres_admin")
        request.addfinalizer(
            lambda: drop_database(admin, f"prodready_agents_{rendered.fingerprint}")
        )
    for line in commands(project):
        if re.search(r" serve\b", line.split("#")[0]):
            serve(project, env, line)
            continue
        result = lifecycle.run(project, env, line)
        output = result.stdout[-6000:] + result.stderr[-3000:]
        assert result.returncode == 0, f"`{line}` failed ({result.returncode}):\n{output}"


def serve(project: Path, env: dict[str, str], line: str) -> None:
    port = free_port()
    process = subprocess.Popen(
        ["/bin/sh", "-c", f"exec {line}"],
        cwd=project,
        env={**env, "PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_listening(process, port)
    except (AssertionError, pytest.fail.Exception):
        process.kill()
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"`{line}` did not listen on {port}:\n{output[-6000:]}")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, f"`{line}` did not stop cleanly on SIGTERM:\n{output[-6000:]}"
