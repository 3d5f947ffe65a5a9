"""Bad answers are refused with a message that says what is wrong and what is allowed."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from copier import run_copy

from .matrix import ROOT, snapshot_template

INVALID = [
    ("project_name", "", "must not be empty"),
    ("project_name", "9 lives", "must also start with a letter"),
    ("project_name", "orders/api", "has characters other than"),
    ("project_name", "x" * 65, "at most 64"),
    ("package_name", "Orders", "not a lowercase Python identifier"),
    ("package_name", "orders-api", "not a lowercase Python identifier"),
    ("package_name", "1orders", "not a lowercase Python identifier"),
    ("package_name", "class", "is a Python keyword"),
    ("package_name", "match", "is a Python keyword"),
    ("package_name", "json", "is a standard-library module"),
    ("package_name", "asyncio", "is a standard-library module"),
    ("package_name", "fastapi", "a package the service depends on"),
    ("package_name", "tests", "a package the service depends on"),
    ("description", "  ", "must not be empty"),
    ("author_name", "", "must not be empty"),
    ("author_email", "team.example.org", "is not an e-mail address"),
    ("database", "mysql", "mysql"),
    ("auth", "basic", "basic"),
    ("python_version", "3.10", "3.10"),
    ("deploy", "helm", "'helm' is not in ['kubernetes', 'none']"),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return snapshot_template(tmp_path_factory.mktemp("template"))


@pytest.mark.parametrize(("question", "value", "message"), INVALID, ids=lambda v: str(v)[:20])
def test_invalid_answer_is_refused_with_its_message(
    template: Path, tmp_path: Path, question: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=r".") as caught:
        run_copy(
            str(template), str(tmp_path / "out"), data={question: value}, defaults=True, quiet=True
        )
    assert message in str(caught.value)
    assert not (tmp_path / "out" / "pyproject.toml").exists()


def test_kubernetes_with_sqlite_is_refused_and_not_the_default(
    template: Path, tmp_path: Path
) -> None:
    """Replicas cannot share one SQLite file: deploy=kubernetes is refused with it, saying
    what to answer instead, and the default follows the database."""
    with pytest.raises(ValueError, match="SQLite is one file on one host") as caught:
        run_copy(
            str(template),
            str(tmp_path / "refused"),
            data={"database": "sqlite", "deploy": "kubernetes"},
            defaults=True,
            quiet=True,
        )
    assert "answer database=postgresql, or deploy=none" in str(caught.value)
    assert not (tmp_path / "refused" / "pyproject.toml").exists()
    run_copy(
        str(template), str(tmp_path / "out"), data={"database": "sqlite"}, defaults=True, quiet=True
    )
    assert "deploy: none" in (tmp_path / "out" / ".copier-answers.yml").read_text()
    assert not (tmp_path / "out" / "deploy").exists()


def test_package_name_is_derived_from_the_project_name(template: Path, tmp_path: Path) -> None:
    run_copy(
        str(template),
        str(tmp_path / "out"),
        data={"project_name": "Billing API v2"},
        defaults=True,
        quiet=True,
    )
    assert (tmp_path / "out" / "src" / "billing_api_v2" / "__main__.py").exists()


def test_renders_without_trust_because_it_has_no_tasks_or_extensions() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "copier.yml").read_text())
    assert "_tasks" not in config
    assert "_jinja_extensions" not in config
    assert "_migrations" not in config


POSTGRES_TEST_URL = "postgresql://postgres@127.0.0.1:5432/test"  # the README's "Test it"
NEXT_STEPS = {
    "postgresql": {"database": "postgresql", "redis": "false"},
    "none": {"database": "none", "redis": "true", "auth": "api_key"},
}


@pytest.mark.parametrize("database", sorted(NEXT_STEPS))
def test_copy_ends_with_the_next_commands_for_the_answers_given(
    template: Path, tmp_path: Path, database: str
) -> None:
    """`copier copy`, as a user runs it (the CLI, without --trust), prints what to run next:
    the commands of the README and AGENTS.md that these answers need, in order."""
    answers = NEXT_STEPS[database]
    project = tmp_path / "acme-orders"
    data = [arg for name, value in answers.items() for arg in ("--data", f"{name}={value}")]
    result = subprocess.run(
        [Path(sys.executable).with_name("copier"), "copy", "--defaults", *data, template, project],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (project / "pyproject.toml").exists()
    message = result.stderr.split("acme-orders is generated. Next", 1)
    assert len(message) == 2, f"no next steps after the copy:\n{result.stderr[-3000:]}"
    commands = [line.split("#")[0].strip() for line in message[1].splitlines()]
    expected = [
        f'cd "{project}"',
        "git init",
        "uv lock",
        "uv sync",
        "cp .env.example .env",
        *(["uv run python -m acme_orders migrate"] if database != "none" else []),
        "uv run python -m acme_orders serve",
        "export ENVIRONMENT=test",
        *([f"export DATABASE_URL={POSTGRES_TEST_URL}"] if database != "none" else []),
        *(["export REDIS_URL=redis://127.0.0.1:6379/0"] if answers["redis"] == "true" else []),
        "uv run pytest",
        "scripts/check",
    ]
    assert [line for line in commands if line in expected] == expected, message[1]
    assert ("migrate" in message[1]) == (database != "none")
    assert ("DATABASE_URL" in message[1]) == (database == "postgresql")
    assert ("REDIS_URL" in message[1]) == (answers["redis"] == "true")
    assert not re.search(r"\{\{|\{%|%\}", message[1])
    for line in commands:  # every project command it names exists in the project
        if found := re.search(r"python -m acme_orders (\S+)", line):
            main = (project / "src" / "acme_orders" / "platform" / "cli.py").read_text()
            assert f'add_parser("{found.group(1)}"' in main, line
        if line.startswith(("cp ", "scripts/")):
            assert (project / line.split()[-2 if line.startswith("cp ") else 0]).exists(), line


def test_standard_library_list_matches_every_offered_python() -> None:
    from .conftest import find_python

    text = (ROOT / "hooks" / "names.jinja").read_text()
    listed = set(text.split('{%- set STDLIB = """', 1)[1].split('"""', 1)[0].split())
    from .matrix import questions

    expected: set[str] = set()
    for version in questions()["python_version"]["choices"]:
        names = subprocess.run(
            [
                str(find_python(version)),
                "-c",
                "import json, sys; print(json.dumps(sorted(sys.stdlib_module_names)))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        expected |= {name for name in json.loads(names) if not name.startswith("_")}
    assert listed == expected
