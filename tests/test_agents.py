"""AI-assistant instructions: written for the answers given, one text everywhere, and every
command they list works, so the instructions cannot rot.

Every name AGENTS.md shows in backticks exists in the render it came with: Python names,
dotted names and calls (defined or imported at module level in `src/<package>/`, read with
`ast`, never imported; a call to the package's own function must bind to its signature),
`settings.<name>` and setting variables (`DATABASE_URL`: a field of `Settings`), files and
folders, and `python -m <package> <command>`. Checked on every distinct AGENTS.md of the
matrix, and shown to fail on a planted wrong name.

The "Commands" block of AGENTS.md depends on the answers only through `database` (no
`migrate` without one); every render's block is checked to be the block of its database's
variant, and the commands are run, in order, on one installed variant per database value,
in a fresh copy that is a git repository, with a fresh database (those variants also take
each auth answer and each python version): install, migrate, serve
(it must listen, then stop cleanly on SIGTERM), the tests, lint and `scripts/check`.
"""

import ast
import builtins
import fnmatch
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
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
    tests_passed_on_this_tree = False
    for line in commands(project):
        if re.search(r" serve\b", line.split("#")[0]):
            serve(project, env, line)
            continue
        line_env = env
        if line.startswith("scripts/check") and tests_passed_on_this_tree:
            # Its last hook runs the same `uv run pytest` that just passed on this same tree:
            # every other hook runs here, and test_rules.py runs the whole check unskipped.
            line_env = {**env, "SKIP": "tests"}
        result = lifecycle.run(project, line_env, line)
        tests_passed_on_this_tree |= line.startswith("uv run pytest") and result.returncode == 0
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


# --- every name and path AGENTS.md shows exists in the render ---------------------------------

CODE_FENCE = re.compile(r"^```.*?^```$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`]+)`")
PLACEHOLDER = re.compile(r"<[A-Za-z_][\w-]*>")  # `settings.<name>`, `.env.<ENVIRONMENT>`
HOLE = "_placeholder_"
VARIABLE = re.compile(r"(?P<name>[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*)(?P<glob>_\*)?(?:=\S*)?")
HEADER = re.compile(r"[A-Z][A-Za-z]*(?:-[A-Z][A-Za-z]*)+")  # `Idempotency-Key`: not Python
RUFF_RULE = re.compile(r"[A-Z]{1,4}\d{2,4}")
COMMAND = re.compile(r"(?:uv run )?python -m (?P<module>\S+)(?: (?P<command>[a-z][\w-]*))?")
PATH = re.compile(r"[\w.<>*/-]+")
FILE_SUFFIXES = (
    *(".py", ".md", ".mdc", ".toml", ".yaml", ".yml", ".ini", ".cfg", ".json"),
    *(".example", ".baseline", ".lock", ".mako"),
)
# Never in a fresh render: made by the "Commands" block (uv.lock, .venv, .env), the user's
# git-ignored test settings, and the suffix of what `copier update` rejects.
NOT_RENDERED = frozenset({"uv.lock", ".venv", ".env", ".env.test", ".rej"})
# Named only to be forbidden; nobody's in src/.
FOREIGN_WORDS = frozenset({"create_all", "localhost"})
# What a handler holds without importing it: `request` (Starlette's), `settings` (a
# `Settings`) and `principal` (a `CurrentPrincipal`); attributes under them are checked.
REQUEST_ATTRIBUTES = frozenset({"app", "client", "headers", "method", "scope", "state", "url"})
BUILTINS = frozenset(dir(builtins)) | {"__name__", "__file__"}


@dataclass
class Sources:
    """What `src/<package>/` defines, read with `ast` (nothing is imported)."""

    package: str
    modules: dict[str, set[str]] = field(default_factory=dict)  # module -> its top-level names
    external: set[str] = field(default_factory=set)  # bound by importing from outside
    external_roots: set[str] = field(default_factory=set)  # `fastapi` of `from fastapi import`
    members: set[str] = field(default_factory=set)  # class members, self.x, state["x"] keys
    functions: dict[str, list[ast.arguments]] = field(default_factory=dict)
    settings_fields: set[str] = field(default_factory=set)
    variable_prefixes: set[str] = field(default_factory=set)  # FEATURE_ of FEATURE_<NAME>
    commands: set[str] = field(default_factory=set)  # `python -m <package> <command>`
    strings: set[str] = field(default_factory=set)  # every string constant: routes are there

    @property
    def names(self) -> set[str]:
        return set().union(*self.modules.values())


def top_level(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """Module-level statements, including those under a module-level if/try/with."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.Try | ast.With):
            nested = [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            for handler in getattr(node, "handlers", []):
                nested += handler.body
            yield from top_level(nested)


def bound_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [name for element in target.elts for name in bound_names(element)]
    return []


def read_sources(project: Path) -> Sources:
    packages = [p.parent for p in (project / "src").glob("*/__init__.py")]
    assert len(packages) == 1, f"one package under src/, found {packages}"
    root = packages[0]
    sources = Sources(package=root.name)
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        parts = [part for part in relative.parts if part != "__init__"]
        tree = ast.parse(path.read_text(), str(path))
        names = sources.modules.setdefault(parts[-1] if parts else root.name, set())
        names.update(relative.parts[:-1])  # a package's submodules are its attributes
        for node in top_level(tree.body):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
                sources.functions.setdefault(node.name, []).append(node.args)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        sources.members.add(item.name)
                    elif isinstance(item, ast.AnnAssign | ast.Assign):
                        targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                        found = [n for target in targets for n in bound_names(target)]
                        sources.members.update(found)
                        if node.name == "Settings" and isinstance(item, ast.AnnAssign):
                            sources.settings_fields.update(found)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for name in (n for target in targets for n in bound_names(target)):
                    names.add(name)
                    value = node.value
                    if name.endswith("_PREFIX") and isinstance(value, ast.Constant):
                        sources.variable_prefixes.add(str(value.value))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    names.add(bound)
                    sources.external.add(bound)
                    sources.external_roots.add(alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                outside = node.level == 0 and node.module.split(".")[0] != sources.package
                for alias in node.names:
                    names.add(alias.asname or alias.name)
                    if outside:
                        sources.external.add(alias.asname or alias.name)
                if outside:
                    sources.external_roots.add(node.module.split(".")[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                sources.strings.add(node.value)
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Attribute):
                    sources.members.add(target.attr)  # self.x = ..., app.state.x = ...
                elif isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
                    sources.members.add(str(target.slice.value))  # state["x"] = ...
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_parser"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                sources.commands.add(str(node.args[0].value))
    return sources


def binding_error(signature: ast.arguments, call: ast.Call) -> str | None:
    """Why `call` would not bind to `signature` (None if it would), like Python's TypeError."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(
        k.arg is None for k in call.keywords
    ):
        return None
    positional = [a.arg for a in [*signature.posonlyargs, *signature.args]]
    required = positional[: len(positional) - len(signature.defaults)]
    given = {k.arg for k in call.keywords}
    if len(call.args) > len(positional) and signature.vararg is None:
        return f"takes at most {len(positional)} positional arguments, given {len(call.args)}"
    keyword_only = {a.arg for a in signature.kwonlyargs}
    unknown = given - set(positional[len(signature.posonlyargs) :]) - keyword_only
    if unknown and signature.kwarg is None:
        return f"has no parameter {', '.join(sorted(unknown))}"
    missing = [n for n in required[len(call.args) :] if n not in given] + [
        a.arg
        for a, default in zip(signature.kwonlyargs, signature.kw_defaults, strict=True)
        if default is None and a.arg not in given
    ]
    if missing:
        return f"needs {', '.join(missing)}"
    return None


class NameChecker(ast.NodeVisitor):
    """Every name an expression loads must exist in the sources; calls to the package's own
    functions must bind. Plain lowercase names passed as arguments are the example's own
    variables (`request(method, url)`); `f()` and `f(...)` name a function, not a call."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.problems: list[str] = []

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.check(node.id, [])

    def visit_Attribute(self, node: ast.Attribute) -> None:
        attributes: list[str] = []
        inner: ast.expr = node
        while isinstance(inner, ast.Attribute):
            attributes.insert(0, inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name):
            self.check(inner.id, attributes)
        else:
            self.visit(inner)
            self.check_members(ast.unparse(node), attributes)

    def visit_Call(self, node: ast.Call) -> None:
        self.visit(node.func)
        for argument in [*node.args, *(k.value for k in node.keywords)]:
            if not (isinstance(argument, ast.Name) and argument.id.islower()):
                self.visit(argument)
        elided = not node.keywords and (
            not node.args or (len(node.args) == 1 and _is_ellipsis(node.args[0]))
        )
        name = None
        if isinstance(node.func, ast.Name):
            name = node.func.id
        elif (
            isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in self.sources.modules
        ):
            name = node.func.attr
        signatures = self.sources.functions.get(name or "", [])
        if signatures and not elided:
            errors = [binding_error(signature, node) for signature in signatures]
            if all(errors):
                self.problems.append(f"`{ast.unparse(node)}`: {name}() {errors[0]}")

    def check(self, root: str, attributes: list[str]) -> None:
        sources, dotted = self.sources, ".".join([root, *attributes])
        if root == HOLE:
            return
        if root == "settings":  # the Settings instance a handler or factory holds
            if attributes and attributes[0] not in sources.settings_fields | {HOLE}:
                self.problems.append(f"`{dotted}`: Settings has no field {attributes[0]}")
        elif root == "request":
            if attributes and attributes[0] not in REQUEST_ATTRIBUTES:
                self.problems.append(f"`{dotted}`: a Request has no {attributes[0]}")
            elif "state" in attributes:  # request.state.x, request.app.state.x: the app's
                self.check_members(dotted, attributes[attributes.index("state") + 1 :])
        elif root == "principal":
            self.check_members(dotted, attributes)
        elif root in sources.modules and root not in sources.external:
            if attributes and attributes[0] not in sources.modules[root]:
                self.problems.append(f"`{dotted}`: {root}.py has no {attributes[0]}")
            else:
                self.check_members(dotted, attributes[1:])
        elif root in sources.external | sources.external_roots or root in sys.stdlib_module_names:
            return  # a library's: its attributes are the library's business
        elif root in sources.names:
            self.check_members(dotted, attributes)
        elif root not in BUILTINS and root not in FOREIGN_WORDS:
            self.problems.append(f"`{dotted}`: {root} is not defined in src/{sources.package}/")

    def check_members(self, dotted: str, attributes: list[str]) -> None:
        known = self.sources.members | self.sources.names | {HOLE}
        if missing := [name for name in attributes if name not in known]:
            self.problems.append(f"`{dotted}`: nothing in src/ defines {missing[0]}")


def _is_ellipsis(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is Ellipsis


def python_expression(span: str) -> ast.AST | None:
    """The span as Python, or None when it is prose, a keyword or a shell word."""
    text = PLACEHOLDER.sub(HOLE, span).removeprefix("@").strip()
    annotated = re.fullmatch(r"\w+: (.+)", text)  # `on: Annotated[bool, flag("x")]`
    keyword = re.fullmatch(r"\w+=(.+)", text)  # `extra="forbid"`
    for candidate in (text, annotated and annotated.group(1), keyword and keyword.group(1)):
        if candidate:
            try:
                return ast.parse(candidate, mode="eval")
            except SyntaxError:
                continue
    return None


def span_problems(span: str, sources: Sources, files: frozenset[str]) -> list[str]:
    span = " ".join(span.split())
    if command := COMMAND.fullmatch(span):
        module, name = command.group("module"), command.group("command")
        if module != sources.package:
            return [f"`{span}`: the package is {sources.package}"]
        if name and name not in sources.commands:
            return [f"`{span}`: no command {name} (there are {sorted(sources.commands)})"]
        return []
    if RUFF_RULE.fullmatch(span) or HEADER.fullmatch(span) or span in sources.commands:
        return []
    if span.startswith("/"):  # a route: `/healthz`
        route = span.split("?")[0]
        return [] if route in sources.strings else [f"`{span}`: no route {route} in src/"]
    if variable := VARIABLE.fullmatch(span):
        name = variable.group("name")
        if variable.group("glob"):  # `OUTBOUND_*`: settings with this prefix
            if any(f.startswith(f"{name.lower()}_") for f in sources.settings_fields):
                return []
        elif name.lower() in sources.settings_fields or name in sources.names:
            return []
        if any(name.startswith(prefix) for prefix in sources.variable_prefixes):
            return []  # FEATURE_NEW_THING
        return [f"`{span}`: no setting {name.lower()} in Settings"]
    if PATH.fullmatch(span) and (
        "/" in span or span.startswith(".") or span.endswith(FILE_SUFFIXES)
    ):
        return [] if path_exists(span, sources.package, files) else [f"`{span}`: no such path"]
    tree = python_expression(span)
    if tree is None:
        return []
    checker = NameChecker(sources)
    checker.visit(tree)
    return checker.problems


def path_exists(span: str, package: str, files: frozenset[str]) -> bool:
    if span in NOT_RENDERED:
        return True
    pattern = PLACEHOLDER.sub("*", span).rstrip("/")
    for candidate in (pattern, f"src/{package}/{pattern}"):
        for name in files:
            if fnmatch.fnmatchcase(name, candidate) or name.startswith(f"{candidate}/"):
                return True
    return False


def agents_md_problems(text: str, sources: Sources, files: Iterable[str]) -> list[str]:
    """Every backticked name, path, setting and command of `text` that the render lacks."""
    prose = CODE_FENCE.sub("", text)
    listed = frozenset(files)
    problems: list[str] = []
    for span in dict.fromkeys(match.group(1) for match in CODE_SPAN.finditer(prose)):
        problems += span_problems(span, sources, listed)
    return problems


def test_every_name_and_path_in_agents_md_exists_in_the_render() -> None:
    sources: dict[str, Sources] = {}
    checked: set[tuple[str, str, tuple[str, ...]]] = set()
    problems: dict[str, list[str]] = {}
    for rendered in plan().renders:
        text = (rendered.path / "AGENTS.md").read_text()
        key = (text, rendered.fingerprint, rendered.files)
        if key in checked:
            continue
        checked.add(key)
        if rendered.fingerprint not in sources:
            sources[rendered.fingerprint] = read_sources(rendered.path)
        found = agents_md_problems(text, sources[rendered.fingerprint], rendered.files)
        for problem in found:
            problems.setdefault(problem, []).append(rendered.id)
    assert len(checked) > 1
    assert not problems, "AGENTS.md names what the render lacks:\n" + "\n".join(
        f"{problem}  (in {len(ids)} renders, e.g. {ids[0]})" for problem, ids in problems.items()
    )


PLANTED = {
    "`@exempt`": "exempt is not defined",
    '`@rate_limit("10/minute")`': "rate_limit() needs name",
    '`rate_limit("10/minute", per="user")`': "has no parameter per",
    "`settings.rate_limit_per_user`": "Settings has no field rate_limit_per_user",
    "`request.state.http_client.get(url)`": "nothing in src/ defines http_client",
    "`auth.require_scope`": "auth.py has no require_scope",
    "`RATE_LIMIT_PER_USER`": "no setting rate_limit_per_user",
    "`src/acme_orders/routers/`": "`src/acme_orders/routers/`: no such path",
    "`tests/test_orders.py`": "`tests/test_orders.py`: no such path",
    "`python -m acme_orders upgrade`": "no command upgrade",
}


def test_the_name_check_finds_planted_wrong_names() -> None:
    rendered = plan().by_id(plan().groups[next(iter(plan().groups))][0])
    sources, text = read_sources(rendered.path), (rendered.path / "AGENTS.md").read_text()
    assert agents_md_problems(text, sources, rendered.files) == []
    planted = text + "\n".join(f"- Use {span} here." for span in PLANTED) + "\n"
    problems = agents_md_problems(planted, sources, rendered.files)
    for span, message in PLANTED.items():
        assert any(message in problem for problem in problems), (span, message, problems)
    assert len(problems) == len(PLANTED), problems
