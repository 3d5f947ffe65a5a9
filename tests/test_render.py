"""Every combination renders without --trust into a clean, lint-free project."""

import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from .conftest import plan
from .matrix import Rendered

JINJA_MARKER = re.compile(r"(?<!\$)\{\{|\{%|%\}|\{#|#\}")
RUFF = Path(sys.executable).with_name("ruff")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "rendered" in metafunc.fixturenames:
        renders = plan().renders
        metafunc.parametrize("rendered", renders, ids=[r.id for r in renders])


@pytest.mark.stage_rendered
def test_renders_clean_and_lints(rendered: Rendered) -> None:
    project, answers = rendered.path, rendered.answers
    for relative in rendered.files:
        path = project / relative
        assert not JINJA_MARKER.search(relative), f"Jinja left in a file name: {relative}"
        assert not relative.endswith(".jinja"), relative
        text = path.read_text()
        assert not JINJA_MARKER.search(text), f"Jinja left in {relative}"
        if path.suffix == ".toml":
            tomllib.loads(text)
        if path.suffix in {".yml", ".yaml"}:
            list(yaml.safe_load_all(text))
        if path.suffix == ".py":
            compile(text, relative, "exec")
        if path.suffix == ".md":  # whitespace control must not glue a heading to text
            assert not re.search(r"[^\n#]#{2,} ", text.replace("```", "")), (
                f"broken heading: {relative}"
            )
    for command in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        result = subprocess.run([RUFF, *command], cwd=project, capture_output=True, text=True)
        assert result.returncode == 0, f"ruff {command[0]}:\n{result.stdout}{result.stderr}"

    package = project / "src" / "acme_orders"
    assert (package / "db.py").exists() == (answers["database"] != "none")
    assert (package / "redis_client.py").exists() == answers["redis"]
    dependencies = tomllib.loads((project / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    names = {re.split(r"[=\[<>]", dep)[0] for dep in dependencies}
    assert ("sqlalchemy" in names) == (answers["database"] != "none")
    assert ("asyncpg" in names) == (answers["database"] == "postgresql")
    assert ("aiosqlite" in names) == (answers["database"] == "sqlite")
    assert ("redis" in names) == answers["redis"]
    assert all("==" in dep for dep in dependencies), "every direct dependency is pinned"

    assert (project / ".github/workflows/ci.yml").exists() == (answers["ci"] == "github")
    assert (project / ".gitlab-ci.yml").exists() == (answers["ci"] == "gitlab")
    readme = (project / "README.md").read_text()
    if answers["database"] != "none":  # following the README must never serve an empty schema
        assert "python -m acme_orders migrate" in readme.split("## Configure it")[0]
    version = answers["python_version"]
    assert (project / ".python-version").read_text().strip() == version
    assert f"ARG PYTHON_VERSION={version}\n" in (project / "Dockerfile").read_text()
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"].startswith(f">={version},")
    if answers["ci"] == "github":
        workflow = yaml.safe_load((project / ".github/workflows/ci.yml").read_text())
        assert workflow["jobs"]["check"]["strategy"]["matrix"]["python-version"] == [version]
    if answers["ci"] == "gitlab":
        pipeline = yaml.safe_load((project / ".gitlab-ci.yml").read_text())
        assert pipeline["check"]["image"].startswith(f"python:{version}-")


def test_every_answer_value_is_installed_tested_and_booted_somewhere() -> None:
    from .conftest import one_per_source, source_digest
    from .matrix import axes

    representatives = plan().representatives()  # installed and booted
    for name, values in axes().items():
        if name in plan().documentation:  # documents only: nothing of it is installed
            continue
        for value in values:
            assert any(r.answers[name] == value for r in representatives), (name, value)
    # Own suites and behaviour tests: every distinct source once, every interpreter used.
    sources = one_per_source(representatives)
    assert {source_digest(r) for r in sources} == {source_digest(r) for r in representatives}
    assert len(sources) == len({source_digest(r) for r in sources})
    versions = {r.answers["python_version"] for r in sources}
    assert versions == set(axes()["python_version"])


def test_matrix_covers_every_closed_question() -> None:
    from .matrix import axes, documentation_candidates, questions

    closed = {
        name
        for name, spec in questions().items()
        if "choices" in spec or spec.get("type") == "bool"
    }
    assert set(axes()) == closed
    documentation = set(plan().documentation)
    assert documentation <= set(documentation_candidates())
    crossed = math.prod(1 if name in documentation else len(v) for name, v in axes().items())
    extra = sum(len(axes()[name]) - 1 for name in documentation)
    assert len(plan().renders) == crossed + extra
