"""The test matrix, derived from copier.yml, and the rendered projects it implies.

Rule (printed in the summary):
- Every combination of every question that has a closed set of answers
  (choices; yes/no; for a multiselect: none, each alone, all) is rendered and linted.
  Free-text questions take their default; their validators are tested separately.
- Except documentation axes: a question whose default answer, on the default answers of
  the others, renders every file that each of its other answers renders, and the same
  fingerprint (it only adds files the service never runs: `assistants`, whose default is
  every assistant; `deploy`, whose default adds deploy/ and the deploy scripts). It takes
  its default in every combination, so every file it can add is rendered and linted
  everywhere; each other answer is rendered once more, on the default answers. This is
  checked on every plan, so a question that starts changing service files, or whose
  default stops rendering a superset, is crossed with everything again.
- A default may depend on earlier answers (copier renders it): `deploy` is `none` with
  database=sqlite, which it refuses. Each combination takes the default its answers give.
- Rendered projects are grouped by a fingerprint of everything that can change
  how the service installs, runs or tests: all files except the answers file,
  CI configuration, Markdown, assistant rules and the Kubernetes deploy files (deploy/,
  scripts/deploy, scripts/rollback). One project per group is installed, runs its own
  test suite and is booted; the others are byte-identical where it matters.
- The representative of each group is picked so that, across all groups, every
  value of every answer is on a project that is installed, tested and booted.
"""

import hashlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD = Path(os.environ.get("PRODREADY_BUILD_DIR") or ROOT / ".cache")  # renders, reused
PROJECT_DIR_NAME = "acme-orders"  # the destination folder, so project_name defaults to it
FINGERPRINT_EXCLUDES = (
    ".copier-answers.yml",
    ".github/",
    ".gitlab-ci.yml",
    "renovate.json",
    ".cursor/",
    "deploy/",
    "scripts/deploy",
    "scripts/rollback",
    "monitoring/",
)
FINGERPRINT_EXCLUDED_SUFFIXES = (".md", ".mdc")


def questions() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((ROOT / "copier.yml").read_text())
    return {name: spec for name, spec in config.items() if not name.startswith("_")}


def answer_values(spec: dict[str, Any]) -> list[Any] | None:
    """The answers a question is tested with, or None for free text (default only)."""
    choices = spec.get("choices")
    if choices is not None:
        values = list(choices.values()) if isinstance(choices, dict) else list(choices)
        if spec.get("multiselect"):
            return [[], *([value] for value in values), values]
        return values
    if spec.get("type") == "bool":
        return [False, True]
    return None


def axes() -> dict[str, list[Any]]:
    return {
        name: values
        for name, spec in questions().items()
        if (values := answer_values(spec)) is not None
    }


def default_value(name: str, answers: dict[str, Any]) -> Any:
    """A question's default, rendered with the answers before it as copier does."""
    default = questions()[name].get("default")
    if isinstance(default, str) and "{{" in default:
        template = jinja2.Environment().from_string(default)  # noqa: S701 - not HTML
        return template.render(**answers)
    return default


def resolve(fixed: dict[str, Any]) -> dict[str, Any]:
    """Answers to every axis: `fixed` where given, else the default the answers before give."""
    answers: dict[str, Any] = {}
    for name in axes():
        answers[name] = fixed[name] if name in fixed else default_value(name, answers)
    return answers


def default_answers() -> dict[str, Any]:
    return resolve({})


def probes() -> dict[str, list[dict[str, Any]]]:
    """For each axis, its answers on the default answers of the others, its default first:
    what decides whether it is a documentation axis (see the rule above)."""
    defaults = default_answers()
    return {
        name: [defaults] + [resolve({name: v}) for v in values if v != defaults[name]]
        for name, values in axes().items()
    }


def is_documentation(default: "Rendered", others: list["Rendered"]) -> bool:
    """The default renders every file the other answers render, with the same fingerprint."""
    return all(
        set(other.files) <= set(default.files) and other.fingerprint == default.fingerprint
        for other in others
    )


def combinations(documentation: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The full cross product, except that documentation axes take their default there and
    each of their other values is added once, on the default answers."""
    defaults = default_answers()
    crossed = {name: values for name, values in axes().items() if name not in documentation}
    names, values = zip(*crossed.items(), strict=True)
    combos = [resolve(dict(zip(names, combo, strict=True))) for combo in itertools.product(*values)]
    for name in sorted(documentation):
        combos += [resolve({name: v}) for v in axes()[name] if v != defaults[name]]
    return combos


def combo_id(answers: dict[str, Any]) -> str:
    parts = []
    for name, value in answers.items():
        if isinstance(value, bool):
            parts.append(f"{name}={'yes' if value else 'no'}")
        elif isinstance(value, list):
            parts.append(f"{name}={'+'.join(value) or 'none'}")
        else:
            parts.append(f"{name}={value}")
    return ",".join(parts)


def template_files() -> list[Path]:
    """The files copier would see: tracked plus untracked-but-not-ignored, as on disk."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sorted(
        ROOT / name.decode() for name in listing if name and (ROOT / name.decode()).is_file()
    )


def template_digest() -> str:
    """What the renders depend on: the template, and how this module renders and records it."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in template_files():
        relative = path.relative_to(ROOT).as_posix()
        if relative == "copier.yml" or relative.startswith(("template/", "hooks/")):
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def snapshot_template(destination: Path) -> Path:
    """Copy the template as files, without .git: copier then renders the working tree
    as it is, without cloning and committing it once per combination."""
    for path in template_files():
        relative = path.relative_to(ROOT)
        if relative.parts[0] in {"template", "hooks"} or relative.name == "copier.yml":
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return destination


def fingerprint(project: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(project.rglob("*")):
        relative = path.relative_to(project).as_posix()
        if not path.is_file() or relative.startswith(FINGERPRINT_EXCLUDES):
            continue
        if "__pycache__" in path.parts:
            continue
        if relative.endswith(FINGERPRINT_EXCLUDED_SUFFIXES):
            continue
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Rendered:
    id: str
    answers: dict[str, Any]
    path: Path
    fingerprint: str
    files: tuple[str, ...]  # as rendered; installs and test runs add more beside them


@dataclass(frozen=True)
class Plan:
    digest: str
    renders: list[Rendered]
    groups: dict[str, list[str]]  # fingerprint -> combination ids, representative first
    documentation: tuple[str, ...] = ()  # axes not crossed with the others (see the rule)

    def by_id(self, combo: str) -> Rendered:
        return next(render for render in self.renders if render.id == combo)

    def representatives(self) -> list[Rendered]:
        return [self.by_id(ids[0]) for ids in self.groups.values()]


def render(source: Path, destination: Path, answers: dict[str, Any]) -> Path:
    from copier import run_copy

    project = destination / PROJECT_DIR_NAME
    destination.mkdir(parents=True, exist_ok=True)
    with without_git_file_mode_sync(destination), jinja_compiled_once():
        run_copy(
            str(source),
            str(project),
            data=answers,
            defaults=True,
            unsafe=False,  # the template must render without --trust
            quiet=True,
            overwrite=True,
        )
    return project


@contextmanager
def without_git_file_mode_sync(destination: Path) -> Iterator[None]:
    """copier asks git, once per file it writes, whether the destination's repository has
    `core.fileMode=false`, so as to carry executable bits into its index; only then does it
    do anything. Where the answer is no (checked here, once), the question cost a git process
    per file: 140 a render, 23 000 for the matrix, about half of the plan's CPU."""
    from copier._main import Worker

    found = subprocess.run(
        ["git", "-C", str(destination), "config", "--type=bool", "--get", "core.fileMode"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.stdout.strip() == "false":
        yield
        return
    original = Worker._sync_git_index_executable_bit
    Worker._sync_git_index_executable_bit = lambda *_args, **_kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Worker._sync_git_index_executable_bit = original  # type: ignore[method-assign]


_compiled: dict[tuple[Any, ...], Any] = {}


@contextmanager
def jinja_compiled_once() -> Iterator[None]:
    """copier builds a new Jinja environment per render, so every file and path template
    was parsed and compiled again for each of the matrix's renders: about 1 200 compilations,
    70% of a render's CPU. Within one process, a template compiled by an environment with
    the same syntax and the same extensions, filters and tests compiles to the same code:
    reuse it. Renders stay byte-identical; only the compiling is skipped."""
    original = jinja2.Environment.compile

    def compile_once(
        env: jinja2.Environment,
        source: Any,
        name: str | None = None,
        filename: str | None = None,
        raw: bool = False,
        defer_init: bool = False,
    ) -> Any:
        if not isinstance(source, str):  # a parsed node tree: nothing to key on
            return original(env, source, name, filename, raw, defer_init)
        key = (
            source,
            name,
            filename,
            raw,
            defer_init,
            type(env),
            env.block_start_string,
            env.block_end_string,
            env.variable_start_string,
            env.variable_end_string,
            env.comment_start_string,
            env.comment_end_string,
            env.line_statement_prefix,
            env.line_comment_prefix,
            env.trim_blocks,
            env.lstrip_blocks,
            env.newline_sequence,
            env.keep_trailing_newline,
            env.optimized,
            env.is_async,
            tuple(sorted(env.extensions)),
            frozenset(env.filters),
            frozenset(env.tests),
        )
        if key not in _compiled:
            _compiled[key] = original(env, source, name, filename, raw, defer_init)
        return _compiled[key]

    jinja2.Environment.compile = compile_once  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        jinja2.Environment.compile = original  # type: ignore[method-assign]


def render_one(root: Path, source: Path, answers: dict[str, Any]) -> Rendered:
    ident = combo_id(answers)
    slot = hashlib.sha256(ident.encode()).hexdigest()[:10]
    project = render(source, root / slot, answers)
    files = tuple(
        p.relative_to(project).as_posix() for p in sorted(project.rglob("*")) if p.is_file()
    )
    return Rendered(ident, answers, project, fingerprint(project), files)


def render_all(root: Path, source: Path, combos: list[dict[str, Any]]) -> list[Rendered]:
    """Rendering is CPU-bound Jinja: one process per core."""
    if len(combos) < 2:
        return [render_one(root, source, answers) for answers in combos]
    with ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, len(combos))) as pool:
        count = len(combos)
        return list(pool.map(render_one, [root] * count, [source] * count, combos, chunksize=4))


def _pairs(rendered: Rendered) -> set[tuple[str, str]]:
    return {(name, json.dumps(value)) for name, value in rendered.answers.items()}


def choose_representatives(renders: list[Rendered]) -> dict[str, list[str]]:
    """Group by fingerprint; put first in each group the member that covers the most
    (question, value) pairs not yet covered by an earlier group's representative."""
    groups: dict[str, list[Rendered]] = {}
    for rendered in renders:
        groups.setdefault(rendered.fingerprint, []).append(rendered)
    covered: set[tuple[str, str]] = set()
    ordered: dict[str, list[str]] = {}
    for key, members in groups.items():
        best = max(members, key=lambda member: len(_pairs(member) - covered))
        covered |= _pairs(best)
        ordered[key] = [best.id] + [member.id for member in members if member is not best]
    return ordered


def build_plan() -> Plan:
    """Render every combination once per template version; reuse the result after."""
    from filelock import FileLock

    digest = template_digest()
    base = BUILD / "renders"
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / ".lock")):
        root = base / digest
        manifest = root / "plan.json"
        if not manifest.exists():
            for stale in base.iterdir():
                if stale.is_dir():
                    shutil.rmtree(stale)
            source = snapshot_template(root / "template-snapshot")
            by_axis = probes()
            unique = {combo_id(a): a for answers in by_axis.values() for a in answers}
            done = {r.id: r for r in render_all(root, source, list(unique.values()))}
            documentation = frozenset(
                name
                for name, answers in by_axis.items()
                if is_documentation(
                    done[combo_id(answers[0])], [done[combo_id(a)] for a in answers[1:]]
                )
            )
            combos = combinations(documentation)
            todo = [answers for answers in combos if combo_id(answers) not in done]
            done.update((r.id, r) for r in render_all(root, source, todo))
            renders = [done[combo_id(answers)] for answers in combos]
            groups = choose_representatives(renders)
            manifest.write_text(
                json.dumps(
                    {
                        "renders": [{**asdict(r), "path": str(r.path)} for r in renders],
                        "groups": groups,
                        "documentation": sorted(documentation),
                    },
                    indent=1,
                )
            )
        data = json.loads(manifest.read_text())
    renders = [
        Rendered(
            item["id"],
            item["answers"],
            Path(item["path"]),
            item["fingerprint"],
            tuple(item["files"]),
        )
        for item in data["renders"]
    ]
    return Plan(digest, renders, data["groups"], tuple(data["documentation"]))
