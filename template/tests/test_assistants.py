"""The instructions for AI assistants say one thing: each copy is AGENTS.md's text.

After editing AGENTS.md, copy it over `.github/copilot-instructions.md` and below the
front matter of `.cursor/rules/project.mdc`, where those exist; CLAUDE.md imports it.
"""

from .conftest import PROJECT_ROOT


def test_every_assistant_file_says_what_agents_md_says() -> None:
    source = (PROJECT_ROOT / "AGENTS.md").read_text()
    copilot = PROJECT_ROOT / ".github" / "copilot-instructions.md"
    if copilot.exists():
        assert copilot.read_text() == source, f"{copilot.name} differs from AGENTS.md"
    cursor = PROJECT_ROOT / ".cursor" / "rules" / "project.mdc"
    if cursor.exists():
        _front_matter, _, body = cursor.read_text().partition("\n---\n")
        assert body == source, f"{cursor.name} (below its front matter) differs from AGENTS.md"
    claude = PROJECT_ROOT / "CLAUDE.md"
    if claude.exists():
        assert "@AGENTS.md" in claude.read_text().split(), "CLAUDE.md must import @AGENTS.md"
