"""Every combination renders without --trust into a clean, lint-free project."""

import ast
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

    platform = project / "src" / "acme_orders" / "platform"
    assert (platform / "db.py").exists() == (answers["database"] != "none")
    assert (platform / "redis_client.py").exists() == answers["redis"]
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
    from .matrix import axes, combo_id, default_answers, is_documentation, questions, resolve

    closed = {
        name
        for name, spec in questions().items()
        if "choices" in spec or spec.get("type") == "bool"
    }
    assert set(axes()) == closed
    documentation = set(plan().documentation)
    defaults = default_answers()
    on_defaults = plan().by_id(combo_id(defaults))
    for name in documentation:  # the rule holds on the renders this plan made
        others = [resolve({name: v}) for v in axes()[name] if v != defaults[name]]
        assert is_documentation(on_defaults, [plan().by_id(combo_id(a)) for a in others]), name
    crossed = math.prod(1 if name in documentation else len(v) for name, v in axes().items())
    extra = sum(len(axes()[name]) - 1 for name in documentation)
    assert len(plan().renders) == crossed + extra


def test_the_documentation_rule_refuses_an_answer_that_changes_the_service() -> None:
    """An answer that changes a service file, or that renders a file its default does not,
    is crossed with everything: only a superset with the same fingerprint passes."""
    from .matrix import is_documentation

    def render(fingerprint: str, *files: str) -> Rendered:
        return Rendered("x", {}, Path("x"), fingerprint, files)

    default = render("f1", "README.md", "deploy/kubernetes/base/deployment.yaml")
    assert is_documentation(default, [render("f1", "README.md")])
    assert not is_documentation(default, [render("f2", "README.md")])
    assert not is_documentation(default, [render("f1", "README.md", "ops/extra.yaml")])


# Code that exists for one answer only, by the answer it belongs to: a render that did not
# choose it has none of it (outside migration history, which must run on what it ran on).
MARKERS: dict[tuple[str, object], list[str]] = {
    ("database", "postgresql"): ["postgres", "asyncpg", "pg_"],
    ("database", "sqlite"): ["sqlite", "pragma"],
    ("database", "none"): [],
    ("redis", True): ["redis"],
    ("redis", False): [],
    ("auth", "jwt"): ["jwt", "jwks", "bearer"],
    ("auth", "api_key"): ["api_key", "x-api-key"],
    ("auth", "none"): ["gateway"],
}
# Code that any database brings, absent without one; and what any credentials bring.
ANY_DATABASE = ["sqlalchemy", "alembic", "database_url", "idempotency", "migrat"]
ANY_CREDENTIALS = ["auth_failure", "locked out"]
SERVICE_MODULES = {"__init__.py", "__main__.py", "app.py", "settings.py"}
DATABASE_SERVICE_MODULES = {"models.py", "notes.py", "migrations"}
PLATFORM_MAX_LINES = 250


def _sources(project: Path) -> dict[str, str]:
    """Application code by path: src/ without migration history."""
    return {
        path.relative_to(project).as_posix(): path.read_text()
        for path in (project / "src").rglob("*.py")
        if "versions" not in path.parts
    }


def test_a_render_has_no_code_for_answers_it_did_not_choose(rendered: Rendered) -> None:
    sources = _sources(rendered.path)
    absent = [
        marker
        for (name, value), markers in MARKERS.items()
        if rendered.answers[name] != value
        for marker in markers
    ]
    if rendered.answers["database"] == "none":
        absent += ANY_DATABASE
    if rendered.answers["auth"] == "none":
        absent += ANY_CREDENTIALS
    chosen = [
        marker
        for (name, value), markers in MARKERS.items()
        if rendered.answers[name] == value
        for marker in markers
    ]
    absent = [marker for marker in absent if not any(marker in kept for kept in chosen)]
    found = {
        (path, marker)
        for path, text in sources.items()
        for marker in absent
        if marker in text.lower()
    }
    assert not found, f"code for answers not chosen: {sorted(found)}"


def test_the_marker_check_finds_planted_leftovers(tmp_path: Path) -> None:
    """The check above can fail: a postgres-only line in a sqlite render is found."""
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "db.py").write_text('if scheme.startswith("postgres"):\n')
    sources = _sources(tmp_path)
    assert any("postgres" in text.lower() for text in sources.values())


def _imports(path: Path, src: Path) -> set[str]:
    """Dotted names of what `path` (a module under `src`) imports from its own package."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    package = parts[:-1]  # what `from .` means, in a module and in an __init__ alike
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            anchor = package[: len(package) - (node.level - 1)]
            target = [*anchor, *(node.module.split(".") if node.module else [])]
        elif isinstance(node, ast.ImportFrom) and node.module:
            target = node.module.split(".")
        else:
            continue
        if target[0] == parts[0]:
            found.add(".".join(target))
            found.update(".".join([*target, alias.name]) for alias in node.names)
    return found


def test_the_tree_shows_the_service_apart_from_the_platform(rendered: Rendered) -> None:
    """The service's own code sits at the package top; the platform in platform/, never
    importing the service, no module of it over PLATFORM_MAX_LINES, and only state.py
    touching the request state."""
    package = rendered.path / "src" / "acme_orders"
    expected = SERVICE_MODULES | {"platform"}
    if rendered.answers["database"] != "none":
        expected |= DATABASE_SERVICE_MODULES
    assert {p.name for p in package.iterdir() if p.name != "__pycache__"} == expected
    platform = package / "platform"
    for module in sorted(platform.glob("*.py")):
        lines = len(module.read_text().splitlines())
        assert lines < PLATFORM_MAX_LINES, f"{module.name}: {lines} lines"
        upward = {
            name
            for name in _imports(module, rendered.path / "src")
            if not name.startswith("acme_orders.platform")
        }
        assert not upward, f"platform/{module.name} imports the service: {sorted(upward)}"
    for module in FOUNDATION:  # what Alembic and the settings load: no web stack
        path = platform / f"{module}.py"
        if path.exists():
            below = {
                name.split(".")[2]
                for name in _imports(path, rendered.path / "src")
                if name.count(".") >= 2
            }
            assert below <= FOUNDATION, f"platform/{module}.py imports {sorted(below - FOUNDATION)}"
            assert "fastapi" not in path.read_text(), f"platform/{module}.py imports FastAPI"
    for path in package.rglob("*.py"):
        if path.name != "state.py":
            assert not STATE_ACCESS.search(path.read_text()), f"{path}: request state read here"


# The bottom layer: settings and tables, and the types they need. models.py and Alembic's
# env.py load these and nothing above them.
FOUNDATION = {
    "principal",
    "settings",
    "setting_types",
    "tracing_settings",
    "server_settings",
    "deploy_rules",
    "config",
    "tables",
    "api_keys",
}
STATE_ACCESS = re.compile(
    r"""request\.state\b|scope\.get\("state"|scope\[\s*"state"|"state",\s*\{"""
)


def test_the_layout_checks_find_planted_violations(tmp_path: Path) -> None:
    """An upward import and a state read outside state.py are both found."""
    platform = tmp_path / "acme_orders" / "platform"
    platform.mkdir(parents=True)
    (platform / "health.py").write_text("from ..notes import router\nfrom . import state\n")
    assert _imports(platform / "health.py", tmp_path) >= {"acme_orders.notes"}
    assert "acme_orders.platform.state" in _imports(platform / "health.py", tmp_path)
    assert STATE_ACCESS.search("principal = request.state.principal")
    assert STATE_ACCESS.search('rid = scope.get("state", {}).get("request_id")')
