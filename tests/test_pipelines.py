"""The generated CI pipelines, and the release they run with `deploy: kubernetes`.

Each distinct pipeline file of the matrix (renders deduplicated by the file's content) is
checked once: GitHub workflows against the GitHub workflow schema and GitLab pipelines
against the GitLab CI schema (check-jsonschema's built-in copies, offline), and the GitHub
workflows with `zizmor --offline` at its default persona and severity, with no
configuration and no ignored finding. Then the release itself, read from the files: the
image is built once by the build job, tagged with the commit and pushed, with write access
to packages on that job only; staging is deployed with `scripts/deploy` from the digest the
build produced; a smoke test calls staging's /readyz; production needs the staging deploy
and the smoke test, waits for a manual approval and deploys the same digest; rollback is
`scripts/rollback`. With `deploy: none` the pipeline is the check and the audit alone, the
check unchanged. The audit, a job of its own, runs pip-audit on `uv export` of the lock
(checked for shape only: it needs the network). Each checker is shown to fail, with the
rule's name, on a planted violation.
"""

import copy
import hashlib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .conftest import plan

CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")
ZIZMOR = Path(sys.executable).with_name("zizmor")
GITHUB_SCHEMA = "vendor.github-workflows"
GITLAB_SCHEMA = "vendor.gitlab-ci"
# `uses: owner/repo@<40 hex>  # v1.2.3`: a commit, and the release it is, for the reader.
PINNED_USES = re.compile(r"^\s*(?:- )?uses: [\w.-]+/[\w./-]+@[0-9a-f]{40}  # v\d+\.\d+\.\d+\s*$")
ON_MAIN = "github.event_name == 'push' && github.ref == 'refs/heads/main'"
DEFAULT_BRANCH = "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH"
CHECK_JOBS = {"check", "audit"}  # every pipeline's; the release jobs come on top
WORKFLOW = re.compile(r"\.github/workflows/[^/]+\.ya?ml")
PUSH_BY_COMMIT = 'docker push "$CI_REGISTRY_IMAGE:$CI_COMMIT_SHA"'
CHECKOUT = re.compile(
    r"uses: actions/checkout@\w+  # v[\d.]+\n\s+with:\n\s+persist-credentials: false[^\n]*"
)


@dataclass
class PipelineFile:
    """One distinct pipeline file and the renders that have it."""

    relative: str
    text: str
    renders: list[str] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    @property
    def data(self) -> dict[str, Any]:
        return yaml.safe_load(self.text)

    @property
    def deploys(self) -> bool:
        values = {answers["deploy"] for answers in self.answers}
        assert len(values) == 1, f"{self.relative} is shared by deploy answers {values}"
        return values.pop() == "kubernetes"


def is_pipeline(relative: str) -> bool:
    return relative == ".gitlab-ci.yml" or bool(WORKFLOW.fullmatch(relative))


_distinct: dict[tuple[str, str], PipelineFile] | None = None


def distinct_pipelines() -> list[PipelineFile]:
    """Every pipeline file of the matrix, once per distinct content."""
    global _distinct  # the renders do not change within a run
    if _distinct is None:
        _distinct = {}
        for rendered in plan().renders:
            for relative in filter(is_pipeline, rendered.files):
                text = (rendered.path / relative).read_text()
                found = _distinct.setdefault((relative, text), PipelineFile(relative, text))
                found.renders.append(rendered.id)
                found.answers.append(rendered.answers)
    return list(_distinct.values())


def github_files() -> list[PipelineFile]:
    return [f for f in distinct_pipelines() if f.relative.startswith(".github/")]


def gitlab_files() -> list[PipelineFile]:
    return [f for f in distinct_pipelines() if f.relative == ".gitlab-ci.yml"]


def written(files: list[PipelineFile], root: Path) -> list[Path]:
    """Each file under a folder of its own, by content, with its own name."""
    paths = []
    for item in files:
        path = root / item.digest / item.relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(item.text)
        paths.append(path)
    return paths


def check_jsonschema(schema: str, paths: list[Path]) -> subprocess.CompletedProcess[str]:
    assert CHECK_JSONSCHEMA.exists(), "`uv sync` installs check-jsonschema (dev group)"
    return subprocess.run(
        [CHECK_JSONSCHEMA, "--builtin-schema", schema, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def zizmor(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    """zizmor at its defaults (regular persona, every severity, every confidence), offline,
    with no configuration: nothing ignored."""
    assert ZIZMOR.exists(), "`uv sync` installs zizmor (dev group)"
    return subprocess.run(
        [ZIZMOR, "--offline", "--no-config", "--no-progress", "--color=never", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )


# --- linters, on every distinct file ---------------------------------------------------------


def test_every_distinct_pipeline_file_validates_against_its_ci_schema(tmp_path: Path) -> None:
    github, gitlab = github_files(), gitlab_files()
    assert {f.relative for f in github} == {
        ".github/workflows/ci.yml",
        ".github/workflows/rollback.yml",
    }
    assert {f.deploys for f in gitlab} == {True, False}
    for schema, files in ((GITHUB_SCHEMA, github), (GITLAB_SCHEMA, gitlab)):
        result = check_jsonschema(schema, written(files, tmp_path / schema))
        assert result.returncode == 0, f"{schema}:\n{result.stdout}{result.stderr}"


def test_zizmor_finds_nothing_in_any_github_workflow(tmp_path: Path) -> None:
    result = zizmor(written(github_files(), tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout, result.stdout


def test_the_linters_fail_on_planted_violations(tmp_path: Path) -> None:
    """An action by tag with persisted credentials, and an untrusted value expanded into a
    shell, are zizmor findings; a misspelt key, and a GitLab job named like a global
    keyword, are schema errors."""
    workflow = next(f for f in github_files() if f.relative.endswith("ci.yml") and f.deploys)
    pinned = CHECKOUT.search(workflow.text)
    assert pinned, "ci.yml checks out with a pinned action and no persisted credentials"
    planted = workflow.text.replace(pinned.group(0), "uses: actions/checkout@v4", 1)
    planted = planted.replace(
        "run: scripts/check",
        'run: echo "${{ github.event.head_commit.message }}" && scripts/check',
        1,
    )
    path = tmp_path / "zizmor" / ".github/workflows/ci.yml"
    path.parent.mkdir(parents=True)
    path.write_text(planted)
    output = zizmor([path]).stdout
    for audit in ("unpinned-uses", "artipacked", "template-injection"):
        assert f"[{audit}]" in output, (audit, output)

    misspelt = tmp_path / "schema" / "ci.yml"
    misspelt.parent.mkdir()
    misspelt.write_text(workflow.text.replace("runs-on:", "run-on:", 1))
    assert check_jsonschema(GITHUB_SCHEMA, [misspelt]).returncode != 0
    pipeline = next(f for f in gitlab_files() if f.deploys)
    renamed = tmp_path / "schema" / ".gitlab-ci.yml"
    renamed.write_text(pipeline.text.replace("\nbuild-image:\n", "\nimage:\n", 1))
    assert check_jsonschema(GITLAB_SCHEMA, [renamed]).returncode != 0


# --- the release, as GitHub Actions runs it --------------------------------------------------


def steps_text(job: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in job.get("steps", []))


def needs(job: dict[str, Any]) -> set[str]:
    value = job.get("needs", [])
    return {value} if isinstance(value, str) else set(value)


def jobs_running(jobs: dict[str, dict[str, Any]], pattern: str) -> list[str]:
    return [name for name, job in jobs.items() if re.search(pattern, steps_text(job))]


def step_env(job: dict[str, Any], pattern: str) -> dict[str, str]:
    """The env of the step whose `run` matches `pattern`."""
    for step in job.get("steps", []):
        if re.search(pattern, step.get("run", "")):
            return step.get("env", {})
    return {}


def github_release_problems(workflow: dict[str, Any], text: str) -> list[str]:
    """The release rules a deploy=kubernetes ci.yml breaks, by name."""
    jobs: dict[str, dict[str, Any]] = workflow["jobs"]
    problems: list[str] = []
    builders = [
        name
        for name, job in jobs.items()
        for step in job.get("steps", [])
        if str(step.get("uses", "")).startswith("docker/build-push-action@")
    ]
    if len(builders) != 1:
        return [f"one build job builds the image: found {builders}"]
    build_name = builders[0]
    build = jobs[build_name]
    build_step = next(s for s in build["steps"] if "build-push-action" in str(s.get("uses")))
    if "check" not in needs(build) or build.get("if") != ON_MAIN:
        problems.append("the image is built after check, on pushes to main only")
    if build_step.get("with", {}).get("push") is not True or "${{ github.sha }}" not in str(
        build_step.get("with", {}).get("tags")
    ):
        problems.append("the image is pushed, tagged with the commit")
    if workflow.get("permissions") != {}:
        problems.append("the workflow grants no permission by default")
    for name, job in jobs.items():
        if "permissions" not in job:
            problems.append(f"every job states its permissions: {name}")
        elif (job["permissions"] or {}).get("packages") == "write" and name != build_name:
            problems.append(f"only the build job can write packages: {name}")
    if (build.get("permissions") or {}).get("packages") != "write":
        problems.append("the build job can push to the registry")
    # The digest: build step output -> a step that makes it an image reference -> job output.
    digest = f"${{{{ steps.{build_step.get('id')}.outputs.digest }}}}"
    reference = next((s for s in build["steps"] if digest in (s.get("env") or {}).values()), None)
    output = f"${{{{ steps.{reference.get('id')}.outputs.image }}}}" if reference else None
    if not reference or "@${DIGEST}" not in reference.get("run", ""):
        problems.append("the image reference is the digest the build produced")
    if output is None or build.get("outputs", {}).get("image") != output:
        problems.append("the build job's output is that image reference")
    image = f"${{{{ needs.{build_name}.outputs.image }}}}"

    deployers = {}
    for environment in ("staging", "production"):
        found = jobs_running(jobs, rf'(?m)^\s*scripts/deploy {environment} "\$IMAGE"\s*$')
        if len(found) != 1:
            problems.append(f"one job deploys {environment} with scripts/deploy")
            continue
        deployers[environment] = name = found[0]
        job = jobs[name]
        if step_env(job, "scripts/deploy").get("IMAGE") != image or build_name not in needs(job):
            problems.append(f"{environment} deploys the image the build job produced")
        if (job.get("environment") or {}).get("name") != environment:
            problems.append(f"{environment} runs in the GitHub environment {environment}")
        if "secrets.KUBECONFIG" not in str(step_env(job, "scripts/deploy")):
            problems.append(f"{environment} reads its kubeconfig from the environment's secret")
    if len(deployers) != 2:
        return problems
    smokes = [
        name
        for name in jobs_running(jobs, r"/readyz")
        if deployers["staging"] in needs(jobs[name])
        and "vars.STAGING_URL" in str(step_env(jobs[name], "/readyz"))
    ]
    if not smokes:
        problems.append("a smoke test calls staging's /readyz after the staging deploy")
    production = jobs[deployers["production"]]
    if deployers["staging"] not in needs(production):
        problems.append("production needs the staging deploy")
    if not set(smokes) & needs(production):
        problems.append("production needs the staging smoke test")
    if "Required reviewers" not in text:
        problems.append("the production approval is documented (Required reviewers)")
    for line in text.splitlines():
        if re.match(r"\s*(- )?uses:", line) and not PINNED_USES.match(line):
            problems.append(f"every action is pinned to a commit, its release named: {line}")
    return problems


def test_the_github_release_is_shaped_as_promised() -> None:
    checked = 0
    for item in github_files():
        data = item.data
        if item.relative.endswith("rollback.yml"):
            assert all(answers["deploy"] == "kubernetes" for answers in item.answers)
            job = next(iter(data["jobs"].values()))
            assert step_env(job, "scripts/rollback").get("TARGET") == "${{ inputs.environment }}"
            assert re.search(r'(?m)^scripts/rollback "\$TARGET"$', steps_text(job))
            assert data[True]["workflow_dispatch"]["inputs"]["environment"]["options"] == [
                "production",
                "staging",
            ]  # `on:` is YAML 1.1's True
            continue
        if not item.deploys:
            assert set(data["jobs"]) == CHECK_JOBS, item.renders[0]
            continue
        problems = github_release_problems(data, item.text)
        assert not problems, f"{item.renders[0]}:\n" + "\n".join(problems)
        checked += 1
    assert checked


# Planted violations: each breaks one rule, which the check names.
GITHUB_PLANTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "production needs the staging smoke test": lambda w: w["jobs"]["production"].update(
        needs=["build-image", "staging"]
    ),
    "production deploys the image the build job produced": lambda w: w["jobs"]["production"][
        "steps"
    ][-1]["env"].update(IMAGE="ghcr.io/acme/acme-orders:latest"),
    "production runs in the GitHub environment production": lambda w: w["jobs"]["production"].pop(
        "environment"
    ),
    "only the build job can write packages": lambda w: w["jobs"]["staging"]["permissions"].update(
        packages="write"
    ),
    "the image reference is the digest the build produced": lambda w: w["jobs"]["build-image"][
        "steps"
    ][-1].update(run='echo "image=${NAME}:latest" >> "$GITHUB_OUTPUT"'),
    "a smoke test calls staging's /readyz": lambda w: w["jobs"].pop("smoke-staging"),
    "the image is built after check, on pushes to main only": lambda w: w["jobs"][
        "build-image"
    ].pop("if"),
}


def test_the_github_release_check_finds_planted_violations() -> None:
    item = next(f for f in github_files() if f.relative.endswith("ci.yml") and f.deploys)
    assert github_release_problems(item.data, item.text) == []
    for rule, plant in GITHUB_PLANTS.items():
        workflow = copy.deepcopy(item.data)
        plant(workflow)
        problems = github_release_problems(workflow, item.text)
        assert any(problem.startswith(rule) for problem in problems), (rule, problems)
    unpinned = item.text.replace(
        re.search(r"uses: azure/setup-kubectl@\S+  # v[\d.]+", item.text).group(0),
        "uses: azure/setup-kubectl@v4",
    )
    problems = github_release_problems(yaml.safe_load(unpinned), unpinned)
    assert any(p.startswith("every action is pinned to a commit") for p in problems), problems


# --- the release, as GitLab CI runs it -------------------------------------------------------


def script(job: dict[str, Any]) -> str:
    return "\n".join([*job.get("before_script", []), *job.get("script", [])])


def need_names(job: dict[str, Any]) -> set[str]:
    return {n if isinstance(n, str) else n["job"] for n in job.get("needs", [])}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """GitLab's `extends`: mappings merge key by key, anything else is replaced."""
    result = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def resolved(pipeline: dict[str, Any], name: str) -> dict[str, Any]:
    job = pipeline[name]
    parents = job.get("extends", [])
    base: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        base = merged(base, resolved(pipeline, parent))
    return merged(base, {k: v for k, v in job.items() if k != "extends"})


def gitlab_jobs(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The jobs a pipeline runs (not the hidden templates), with `extends` applied."""
    jobs = {
        name: resolved(pipeline, name)
        for name, job in pipeline.items()
        if isinstance(job, dict) and not name.startswith(".") and name not in GITLAB_KEYWORDS
    }
    return {name: job for name, job in jobs.items() if "script" in job}


GITLAB_KEYWORDS = {"workflow", "default", "variables", "include", "stages", "image", "services"}


def gitlab_release_problems(pipeline: dict[str, Any]) -> list[str]:
    jobs = gitlab_jobs(pipeline)
    problems: list[str] = []
    builders = [name for name, job in jobs.items() if PUSH_BY_COMMIT in script(job)]
    if len(builders) != 1:
        return [f"one build job pushes the image tagged with the commit: found {builders}"]
    build_name = builders[0]
    build = jobs[build_name]
    dotenv = build.get("artifacts", {}).get("reports", {}).get("dotenv")
    if not dotenv or not re.search(
        rf'echo "RELEASE_IMAGE=\$CI_REGISTRY_IMAGE@\$DIGEST" > {re.escape(str(dotenv))}',
        script(build),
    ):
        problems.append("the build job hands on RELEASE_IMAGE, the pushed digest, as dotenv")
    stages = pipeline.get("stages", [])
    order = ["check", build["stage"]]
    deployers = {}
    for environment in ("staging", "production"):
        found = [
            n
            for n, j in jobs.items()
            if re.search(rf'(?m)^scripts/deploy {environment} "\$RELEASE_IMAGE"$', script(j))
        ]
        if len(found) != 1:
            problems.append(f"one job deploys {environment} with scripts/deploy")
            continue
        deployers[environment] = name = found[0]
        job = jobs[name]
        order.append(job["stage"])
        if build_name not in need_names(job):
            problems.append(f"{environment} deploys the image the build job produced")
        if (job.get("environment") or {}).get("name") != environment:
            problems.append(f"{environment} runs in the GitLab environment {environment}")
    if [s for s in stages if s in order] != list(dict.fromkeys(order)):
        problems.append("stages run check, build, staging, production in that order")
    for name, job in jobs.items():
        checks = name in CHECK_JOBS and job.get("stage") == "check"
        if not checks and (job.get("rules") or [{}])[0].get("if") != DEFAULT_BRANCH:
            problems.append(f"release jobs run on the default branch only: {name}")
    if len(deployers) != 2:
        return problems
    smokes = [
        n
        for n, j in jobs.items()
        if "/readyz" in script(j)
        and deployers["staging"] in need_names(j)
        and (j.get("variables") or {}).get("BASE_URL") == "$STAGING_URL"
    ]
    if not smokes:
        problems.append("a smoke test calls staging's /readyz after the staging deploy")
    production = jobs[deployers["production"]]
    if deployers["staging"] not in need_names(production):
        problems.append("production needs the staging deploy")
    if not set(smokes) & need_names(production):
        problems.append("production needs the staging smoke test")
    rule = (production.get("rules") or [{}])[0]
    if rule.get("when") != "manual" or rule.get("allow_failure") is True:
        problems.append("production waits for a manual run, blocking the pipeline")
    if not any(re.search(r"(?m)^scripts/rollback production$", script(j)) for j in jobs.values()):
        problems.append("a manual job rolls production back with scripts/rollback")
    return problems


def test_the_gitlab_release_is_shaped_as_promised() -> None:
    checked = 0
    for item in gitlab_files():
        data = item.data
        if not item.deploys:
            assert data["stages"] == ["check"], item.renders[0]
            assert set(gitlab_jobs(data)) == CHECK_JOBS, item.renders[0]
            continue
        problems = gitlab_release_problems(data)
        assert not problems, f"{item.renders[0]}:\n" + "\n".join(problems)
        checked += 1
    assert checked


GITLAB_PLANTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "production needs the staging smoke test": lambda p: p["deploy-production"].update(
        needs=["build-image", "deploy-staging"]
    ),
    "production waits for a manual run": lambda p: p["deploy-production"]["rules"][0].pop("when"),
    "production deploys the image the build job produced": lambda p: p["deploy-production"].update(
        needs=["deploy-staging", "smoke-staging"]
    ),
    "the build job hands on RELEASE_IMAGE": lambda p: p["build-image"].pop("artifacts"),
    "a smoke test calls staging's /readyz": lambda p: p.pop("smoke-staging"),
    "release jobs run on the default branch only": lambda p: p["deploy-staging"].pop("rules"),
    "a manual job rolls production back": lambda p: p.pop("rollback-production"),
}


def test_the_gitlab_release_check_finds_planted_violations() -> None:
    item = next(f for f in gitlab_files() if f.deploys)
    assert gitlab_release_problems(item.data) == []
    for rule, plant in GITLAB_PLANTS.items():
        pipeline = copy.deepcopy(item.data)
        plant(pipeline)
        problems = gitlab_release_problems(pipeline)
        assert any(problem.startswith(rule) for problem in problems), (rule, problems)


def test_without_kubernetes_the_check_job_is_unchanged() -> None:
    """deploy=none keeps today's pipelines: the check job is the same either way."""
    by_answers: dict[tuple, dict[str, dict[str, Any]]] = {}
    for rendered in plan().renders:
        others = tuple(sorted((k, str(v)) for k, v in rendered.answers.items() if k != "deploy"))
        for relative in (".github/workflows/ci.yml", ".gitlab-ci.yml"):
            if relative in rendered.files:
                check = yaml.safe_load((rendered.path / relative).read_text())
                check = check["jobs"]["check"] if "jobs" in check else check["check"]
                by_answers.setdefault(others, {})[rendered.answers["deploy"]] = check
    pairs = [found for found in by_answers.values() if len(found) == 2]
    assert pairs
    for found in pairs:
        assert found["kubernetes"] == found["none"]


# --- dependency updates ----------------------------------------------------------------------

UPDATE_CONFIGS = {".github/dependabot.yml": "vendor.dependabot", "renovate.json": "vendor.renovate"}


def test_dependency_update_configs_validate_and_follow_the_ci_answer(tmp_path: Path) -> None:
    """Dependabot with GitHub, Renovate with GitLab, each valid against its schema (each
    distinct file once), and a misspelt key refused."""
    seen: dict[str, set[str]] = {name: set() for name in UPDATE_CONFIGS}
    distinct: dict[str, dict[bytes, Path]] = {name: {} for name in UPDATE_CONFIGS}
    for rendered in plan().renders:
        for relative in UPDATE_CONFIGS:
            if (rendered.path / relative).exists():
                seen[relative].add(rendered.answers["ci"])
                content = (rendered.path / relative).read_bytes()
                distinct[relative].setdefault(content, rendered.path / relative)
    assert seen == {".github/dependabot.yml": {"github"}, "renovate.json": {"gitlab"}}
    for relative, schema in UPDATE_CONFIGS.items():
        paths = list(distinct[relative].values())
        result = check_jsonschema(schema, paths)
        assert result.returncode == 0, f"{relative}:\n{result.stdout}{result.stderr}"
        broken = tmp_path / Path(relative).name
        text = paths[0].read_text()
        broken.write_text(  # a misspelt key (Dependabot), a count that is no number (Renovate)
            text.replace("interval:", "intervall:").replace(": 5,", ': "five",')
        )
        assert check_jsonschema(schema, [broken]).returncode != 0, f"{relative}: typo accepted"


# --- the vulnerability audit -------------------------------------------------------------------
# pip-audit needs its advisory services, which this machine cannot reach: the suite checks the
# job's shape and never runs it (nor may scripts/check: a check that needs the network).

PINNED_PIP_AUDIT = re.compile(r"uvx pip-audit==\d+\.\d+\.\d+(?P<args>[^\n]*)")
EXPORT = re.compile(r"uv export(?P<args>[^\n]*)")


def options(arguments: str) -> dict[str, str | None]:
    """`--name value`, `--name=value` and bare `--flag` options, by name (comments dropped)."""
    found: dict[str, str | None] = {}
    tokens = shlex.split(arguments, comments=True)
    for index, token in enumerate(tokens):
        if not token.startswith("-"):
            continue
        name, equals, value = token.partition("=")
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        found[name] = (
            value if equals else (following if following and following[0] != "-" else None)
        )
    return found


def audit_problems(commands: str) -> list[str]:
    """What keeps `commands` (a job's shell, continuations joined) from auditing the lock."""
    text = commands.replace("\\\n", " ")
    export, audit = EXPORT.search(text), PINNED_PIP_AUDIT.search(text)
    if export is None:
        return ["export: no `uv export` of the lock"]
    if audit is None:
        return ["audit: no `uvx pip-audit==X.Y.Z` (pinned)"]
    problems = []
    exported, audited = options(export["args"]), options(audit["args"])
    if "--locked" not in exported and "--frozen" not in exported:
        problems.append("export: not the lock as committed (--locked or --frozen)")
    if exported.get("--format") != "requirements-txt":
        problems.append("export: not --format requirements-txt")
    if "--no-emit-project" not in exported:
        problems.append("export: the project itself is not a locked dependency")
    if "--no-hashes" in exported or "--require-hashes" not in audited:
        problems.append("audit: the hashes of the lock are not required")
    if "--disable-pip" not in audited:
        problems.append("audit: pip would resolve again instead of auditing the lock")
    requirements = exported.get("--output-file") or exported.get("-o")
    if not requirements or (audited.get("--requirement") or audited.get("-r")) != requirements:
        problems.append("audit: does not read the exported file")
    if export.start() > audit.start():
        problems.append("audit: runs before the export")
    return problems


def audit_commands() -> list[tuple[str, str]]:
    """(pipeline file, the audit job's commands) for every distinct CI file."""
    found = []
    for item in github_files():
        if item.relative.endswith("ci.yml"):
            jobs = item.data["jobs"]
            assert "pip-audit" not in steps_text(jobs["check"]), "a job of its own"
            found.append((item.digest, steps_text(jobs["audit"])))
    for item in gitlab_files():
        assert "pip-audit" not in script(item.data["check"]), "a job of its own"
        found.append((item.digest, script(item.data["audit"])))
    return found


def test_the_pipeline_audits_the_locked_dependencies_in_a_job_of_its_own() -> None:
    commands = audit_commands()
    assert len(commands) == len([f for f in distinct_pipelines() if "rollback" not in f.relative])
    for digest, text in commands:
        assert audit_problems(text) == [], (digest, text)
    for rendered in plan().renders:  # it needs the network: never in what `scripts/check` runs
        for relative in ("scripts/check", ".pre-commit-config.yaml"):
            assert "pip-audit" not in (rendered.path / relative).read_text(), relative


AUDIT_PLANTS: dict[str, Callable[[str], str]] = {
    "export: no": lambda text: text.replace("uv export", "uv pip freeze"),
    "audit: no": lambda text: re.sub(r"pip-audit==[\d.]+", "pip-audit", text),
    "export: not the lock": lambda text: text.replace("--locked", ""),
    "export: not --format": lambda text: text.replace("requirements-txt", "pylock.toml"),
    "export: the project": lambda text: text.replace("--no-emit-project", ""),
    "audit: the hashes": lambda text: text.replace("--require-hashes", ""),
    "audit: pip would": lambda text: text.replace("--disable-pip", ""),
    "audit: does not read": lambda text: text.replace("--requirement ", "--requirement other-"),
}


def test_the_audit_check_finds_planted_violations() -> None:
    for digest, text in audit_commands():
        for rule, plant in AUDIT_PLANTS.items():
            planted = plant(text)
            assert planted != text, (rule, digest)
            assert any(p.startswith(rule) for p in audit_problems(planted)), (rule, digest)
