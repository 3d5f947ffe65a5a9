"""Bad answers are refused with a message that says what is wrong and what is allowed."""

import json
import subprocess
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
