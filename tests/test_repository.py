"""The template repository keeps its promises: README commands, question table, pins."""

import re
import tomllib

from .matrix import ROOT, default_answers, questions

README = (ROOT / "README.md").read_text()
TEST_COMMAND = "uv run pytest"


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one() -> None:
    head = README[:1200]
    assert "copier copy --trust gh:org/prodready myapp" in head
    assert "copier copy --trust /path/to/prodready myapp" in head
    assert TEST_COMMAND in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(TEST_COMMAND)}$", ci, re.MULTILINE)


def test_readme_has_a_row_for_every_question_with_its_choices_and_default() -> None:
    rows = {
        m.group(1): line
        for line in README.splitlines()
        if (m := re.match(r"\| `([a-z_]+)` \|", line))
    }
    for name, spec in questions().items():
        assert name in rows, f"README question table lacks {name}"
        choices = spec.get("choices")
        values = (choices.values() if isinstance(choices, dict) else choices) or []
        for value in values:
            assert f"`{value}`" in rows[name], f"README row for {name} lacks {value}"
        if isinstance(spec.get("default"), list):  # a multiselect: every default choice
            assert all(f"`{value}`" in rows[name].split("|")[3] for value in spec["default"])
        elif isinstance(spec.get("default"), bool):
            assert ("yes" if spec["default"] else "no") in rows[name].split("|")[3]
        elif choices:  # a default may depend on earlier answers: its value on theirs
            assert f"`{default_answers()[name]}`" in rows[name].split("|")[3]


def test_renders_are_linted_with_the_ruff_the_projects_pin() -> None:
    def ruff_pin(text: str) -> str:
        return re.search(r'"ruff==([^"]+)"', text).group(1)

    generated = (ROOT / "template" / "pyproject.toml.jinja").read_text()
    own = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    assert f"ruff=={ruff_pin(generated)}" in own
