"""The Kubernetes deploy (`deploy=kubernetes`), proven without a cluster.

- Every distinct set of manifests (renders differ in them by database, redis and auth only;
  each set is checked once): both overlays build with `kubectl kustomize`, every object
  validates offline against the Kubernetes KUBERNETES_VERSION schemas (`kubernetes-validate`,
  strict: no unknown field), the project's own check (`deploy/kubernetes/check_manifests.py`)
  passes on the built objects and from its command line, staging runs fewer replicas than
  production, shellcheck passes the scripts, and `DRY_RUN=1 scripts/deploy` prints the
  migration Job before the Deployment, both on the given image, objects that pass the check.
- Each rule of the check fails, by its name and nothing else, on a planted violation in the
  built objects; and a violation planted in an overlay's file fails its command line.
- `scripts/deploy` and `scripts/rollback` against a `kubectl` that records its calls (the
  one stand-in here: there is no cluster): the order of the steps, no rollout after a failed
  migration, and every bad argument refused with a usage error before kubectl is touched.
- `deploy=none` renders none of it, and the question does not multiply the renders.
"""

import ast
import copy
import hashlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .conftest import plan
from .matrix import Rendered, axes

KUBERNETES_VERSION = "1.32.0"
KUBECTL = shutil.which("kubectl")
SHELLCHECK = Path(sys.executable).with_name("shellcheck")
APP = "acme-orders"
ENVIRONMENTS = ("staging", "production")
DEPLOY_FILES = ("deploy/", "scripts/deploy", "scripts/rollback")
DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGE = f"registry.example.org/team/{APP}@{DIGEST}"
# The answers whose manifests every rule applies to: a database (the Job, the budget), JWT.
PLANTED_ON = {"database": "postgresql", "redis": False, "auth": "jwt"}


def manifest_sets() -> list[Rendered]:
    """One render per distinct content of deploy/ and the deploy scripts."""
    found: dict[str, Rendered] = {}
    for rendered in plan().renders:
        if rendered.answers["deploy"] != "kubernetes":
            continue
        digest = hashlib.sha256()
        for relative in rendered.files:
            if relative.startswith(DEPLOY_FILES):
                digest.update(relative.encode() + b"\0" + (rendered.path / relative).read_bytes())
        found.setdefault(digest.hexdigest(), rendered)
    return list(found.values())


def set_id(rendered: Rendered) -> str:
    answers = rendered.answers
    return f"{answers['database']}-{'redis' if answers['redis'] else 'memory'}-{answers['auth']}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "manifests" in metafunc.fixturenames:
        sets = manifest_sets()
        metafunc.parametrize("manifests", sets, ids=[set_id(r) for r in sets])


def kubectl() -> str:
    if KUBECTL is None:
        pytest.fail("kubectl is needed (1.27 or later; .ci/run checks for it): never skipped")
    return KUBECTL


def build(project: Path, environment: str) -> list[dict[str, Any]]:
    overlay = project / "deploy" / "kubernetes" / "overlays" / environment
    result = subprocess.run(
        [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [item for item in yaml.safe_load_all(result.stdout) if item]


def checker(project: Path) -> ModuleType:
    """The project's deploy/kubernetes/check_manifests.py, imported from its render."""
    path = project / "deploy" / "kubernetes" / "check_manifests.py"
    name = "check_manifests_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_script(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(project / "scripts" / args[0]), *args[1:]],
        cwd=project,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [item for item in objects if item["kind"] == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


# --- every distinct set of manifests -----------------------------------------------------


def test_every_overlay_builds_validates_and_keeps_its_rules(manifests: Rendered) -> None:
    project = manifests.path
    module = checker(project)
    hpa_bounds = {}
    for environment in ENVIRONMENTS:
        objects = build(project, environment)
        for item in objects:  # raises kubernetes_validate.ValidationError, naming the field
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
        assert module.check(objects, environment) == []
        hpa = by_kind(objects, "HorizontalPodAutoscaler")["spec"]
        hpa_bounds[environment] = (hpa["minReplicas"], hpa["maxReplicas"])
        jobs = [item for item in objects if item["kind"] == "Job"]
        assert len(jobs) == (manifests.answers["database"] != "none")
    assert hpa_bounds["staging"] < hpa_bounds["production"], "staging runs fewer replicas"
    assert hpa_bounds["production"][0] >= 2

    result = subprocess.run(
        [sys.executable, "deploy/kubernetes/check_manifests.py"],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for environment in ENVIRONMENTS:
        assert f"overlays/{environment}: every rule holds" in result.stdout

    lint = subprocess.run(
        [SHELLCHECK, "scripts/deploy", "scripts/rollback"],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout


def test_a_dry_run_deploy_prints_the_job_first_on_the_given_image(manifests: Rendered) -> None:
    project = manifests.path
    result = run_script(project, "deploy", "staging", IMAGE, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    objects = [item for item in yaml.safe_load_all(result.stdout) if item]
    kinds = [item["kind"] for item in objects]
    assert kinds[-1] == "Deployment", "the rollout is the last step"
    if manifests.answers["database"] != "none":
        assert kinds[-2] == "Job", "the migration runs before the rollout"
    containers = [
        container
        for item in objects
        if item["kind"] in {"Deployment", "Job"}
        for container in item["spec"]["template"]["spec"]["containers"]
    ]
    assert {c["image"] for c in containers} == {IMAGE}
    assert checker(project).check(objects, "staging") == []
    built = sorted(str(item["metadata"]) for item in build(project, "staging"))
    assert sorted(str(item["metadata"]) for item in objects) == built, "every object, once"


# What the Secret would hold: values the service accepts in production (real-looking hosts,
# strong passwords), so that only the ConfigMap can make it refuse to start.
STAND_IN_SECRETS = {
    "DATABASE_URL": "postgresql://app:Zq8t4RwEv2LkP7mXa9@db.internal:5432/app",
    "REDIS_URL": "redis://:Zq8t4RwEv2LkP7mXa9@redis.internal:6379/0",
    "JWT_ISSUER": "https://idp.internal/realms/acme",
    "JWT_AUDIENCE": APP,
    "JWT_JWKS_URL": "https://idp.internal/realms/acme/protocol/openid-connect/certs",
    "API_KEYS": f"billing:{hashlib.sha256(b'stand-in key').hexdigest()}:notes:write",
}


def services_for_sets() -> list[Any]:
    """Each manifest set with an installed variant of the same database, redis and auth (the
    answers that shape both); on that variant's xdist worker, where it is installed anyway."""
    shaping = ("database", "redis", "auth")
    params = []
    for manifests in manifest_sets():
        variant = next(
            r
            for r in plan().representatives()
            if all(r.answers[name] == manifests.answers[name] for name in shaping)
        )
        params.append(
            pytest.param(
                manifests,
                variant,
                id=set_id(manifests),
                marks=pytest.mark.xdist_group(variant.fingerprint),
            )
        )
    return params


@pytest.mark.parametrize(("deployed", "variant"), services_for_sets())
def test_the_service_starts_on_the_production_configmap(
    deployed: Rendered, variant: Rendered
) -> None:
    """The service's own configuration check (`check-config`: every setting, and what
    production refuses) passes on the production overlay's ConfigMap and the Secret's keys,
    once its one placeholder, the example host name in ALLOWED_HOSTS, is replaced; with the
    placeholder left in, the service refuses to start and names that setting alone."""
    from .conftest import install

    install(variant)
    objects = build(deployed.path, "production")
    config = find(objects, "ConfigMap", f"{APP}-config")["data"]
    keys = checker(deployed.path).SECRET_KEYS
    shipped = {"PATH": os.environ["PATH"], **config, **{k: STAND_IN_SECRETS[k] for k in keys}}
    python = variant.path / ".venv" / "bin" / "python"

    def check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), "-m", "acme_orders", "check-config"],
            cwd=variant.path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    placeholder = check_config(shipped)
    assert placeholder.returncode == 78, placeholder.stdout + placeholder.stderr
    assert "1 problem(s)" in placeholder.stderr
    assert "ALLOWED_HOSTS" in placeholder.stderr
    env = {**shipped, "ALLOWED_HOSTS": f"{APP}.acme.internal"}
    result = check_config(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration valid" in result.stdout + result.stderr
    assert config["ENVIRONMENT"] == "production"
    # The check can fail: one of the refusals it stands for, planted, stops the service.
    planted = check_config({**env, "FORWARDED_ALLOW_IPS": "*"})
    assert planted.returncode == 78, planted.stdout + planted.stderr
    assert "FORWARDED_ALLOW_IPS" in planted.stderr


# --- each rule fails on a planted violation ----------------------------------------------


def planted_render() -> Rendered:
    return next(
        r
        for r in manifest_sets()
        if all(r.answers[name] == value for name, value in PLANTED_ON.items())
    )


def find(objects: list[dict[str, Any]], kind: str, prefix: str = APP) -> dict[str, Any]:
    return next(
        o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)
    )


def pod(objects: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    return find(objects, kind)["spec"]["template"]["spec"]


def server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return pod(objects)["containers"][0]


def settings(objects: list[dict[str, Any]]) -> dict[str, str]:
    return find(objects, "ConfigMap", f"{APP}-config")["data"]


def set_images(objects: list[dict[str, Any]], image: str) -> None:
    for kind in ("Deployment", "Job"):
        for container in pod(objects, kind)["containers"]:
            container["image"] = image


def egress_ports(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return find(objects, "NetworkPolicy")["spec"]["egress"]


Plant = Callable[[list[dict[str, Any]]], object]
PLANTS: dict[str, tuple[str, Plant]] = {
    "ENVIRONMENT=development": ("environment", lambda o: settings(o).update(ENVIRONMENT="test")),
    "an object in another namespace": (
        "environment",
        lambda o: find(o, "Service")["metadata"].update(namespace="default"),
    ),
    "a Service without its component label": (
        "labels",
        lambda o: find(o, "Service")["metadata"]["labels"].pop("app.kubernetes.io/component"),
    ),
    "image :latest": (
        "image-pinned",
        lambda o: set_images(o, f"registry.example.org/{APP}:latest"),
    ),
    "image without a tag": ("image-pinned", lambda o: set_images(o, f"registry.example.org/{APP}")),
    "maxUnavailable 1": (
        "rolling-update",
        lambda o: find(o, "Deployment")["spec"]["strategy"]["rollingUpdate"].update(
            maxUnavailable=1
        ),
    ),
    "Recreate strategy": (
        "rolling-update",
        lambda o: find(o, "Deployment")["spec"].update(strategy={"type": "Recreate"}),
    ),
    "liveness probe on /readyz": (
        "probes",
        lambda o: server(o)["livenessProbe"]["httpGet"].update(path="/readyz"),
    ),
    "no startup probe": ("probes", lambda o: server(o).pop("startupProbe")),
    "readiness timeout within the service's own": (
        "probe-timeouts",
        lambda o: server(o)["readinessProbe"].update(timeoutSeconds=2),
    ),
    "grace period within the drain": (
        "grace-period",
        lambda o: pod(o).update(terminationGracePeriodSeconds=25),
    ),
    "DRAIN_DELAY left to its default": ("grace-period", lambda o: settings(o).pop("DRAIN_DELAY")),
    "no memory limit on the Job": (
        "resources",
        lambda o: pod(o, "Job")["containers"][0]["resources"]["limits"].pop("memory"),
    ),
    "root user": ("non-root", lambda o: pod(o)["securityContext"].update(runAsUser=0)),
    "container may run as root": (
        "non-root",
        lambda o: server(o)["securityContext"].update(runAsNonRoot=False),
    ),
    "writable root filesystem": (
        "read-only-root",
        lambda o: server(o)["securityContext"].update(readOnlyRootFilesystem=False),
    ),
    "no /tmp on the Job": (
        "read-only-root",
        lambda o: pod(o, "Job")["containers"][0].pop("volumeMounts"),
    ),
    "privilege escalation": (
        "no-privilege-escalation",
        lambda o: server(o)["securityContext"].update(allowPrivilegeEscalation=True),
    ),
    "a capability added": (
        "capabilities",
        lambda o: server(o)["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
    ),
    "seccomp unconfined": (
        "seccomp",
        lambda o: pod(o, "Job")["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    ),
    "token mounted": (
        "service-account",
        lambda o: pod(o).update(automountServiceAccountToken=True),
    ),
    "default service account": (
        "service-account",
        lambda o: pod(o, "Job").pop("serviceAccountName"),
    ),
    "settings not from the ConfigMap": (
        "settings-from-configmap",
        lambda o: pod(o, "Job")["containers"][0].pop("envFrom"),
    ),
    "DATABASE_URL written in the manifest": (
        "secrets-by-reference",
        lambda o: server(o)["env"].__setitem__(
            0, {"name": "DATABASE_URL", "value": "postgresql://app:q8Zt4RwEv2LkP7mX@db:5432/app"}
        ),
    ),
    "a Secret object": (
        "secrets-by-reference",
        lambda o: o.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": f"{APP}-secrets",
                    "namespace": f"{APP}-production",
                    "labels": find(o, "Service")["metadata"]["labels"],
                },
            }
        ),
    ),
    "a password in the ConfigMap": (
        "secrets-by-reference",
        lambda o: settings(o).update({"SMTP_PASSWORD": "q8Zt4RwEv2LkP7mX"}),
    ),
    "WORKERS=2 with counters in memory": (
        "deploy-rules",
        lambda o: settings(o).update(WORKERS="2"),
    ),
    "FORWARDED_ALLOW_IPS=*": (
        "deploy-rules",
        lambda o: settings(o).update(FORWARDED_ALLOW_IPS="*"),
    ),
    "CORS_ORIGINS=*": ("deploy-rules", lambda o: settings(o).update(CORS_ORIGINS="*")),
    "ALLOWED_HOSTS=*": ("deploy-rules", lambda o: settings(o).update(ALLOWED_HOSTS="*")),
    "no ALLOWED_HOSTS": ("deploy-rules", lambda o: settings(o).pop("ALLOWED_HOSTS")),
    "DEBUG=true": ("deploy-rules", lambda o: settings(o).update(DEBUG="true")),
    "twenty replicas on the default pools": (
        "connection-budget",
        lambda o: find(o, "HorizontalPodAutoscaler")["spec"].update(maxReplicas=20),
    ),
    "one production replica": (
        "replicas",
        lambda o: find(o, "HorizontalPodAutoscaler")["spec"].update(minReplicas=1),
    ),
    "replicas set on the Deployment": (
        "replicas",
        lambda o: find(o, "Deployment")["spec"].update(replicas=3),
    ),
    "Service selecting other pods": (
        "service",
        lambda o: find(o, "Service")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "worker"}
        ),
    ),
    "budget allowing no eviction": (
        "pod-disruption-budget",
        lambda o: find(o, "PodDisruptionBudget")["spec"].update(maxUnavailable=0),
    ),
    "ingress from everywhere": (
        "network-policy",
        lambda o: find(o, "NetworkPolicy")["spec"]["ingress"][0].pop("from"),
    ),
    "metrics open to the ingress controller": (
        "network-policy",
        lambda o: find(o, "NetworkPolicy")["spec"]["ingress"][1]["from"][0]["namespaceSelector"][
            "matchLabels"
        ].update({"kubernetes.io/metadata.name": "ingress-nginx"}),
    ),
    "no METRICS_PORT": ("metrics", lambda o: settings(o).pop("METRICS_PORT")),
    "pods not annotated for scraping": (
        "metrics",
        lambda o: find(o, "Deployment")["spec"]["template"]["metadata"].pop("annotations"),
    ),
    "egress to SMTP": (
        "network-policy",
        lambda o: egress_ports(o).append({"ports": [{"protocol": "TCP", "port": 25}]}),
    ),
    "no egress to PostgreSQL": (
        "network-policy",
        lambda o: egress_ports(o).remove(
            next(rule for rule in egress_ports(o) if rule["ports"][0]["port"] == 5432)
        ),
    ),
    "migration retried ten times": (
        "migration-job",
        lambda o: find(o, "Job")["spec"].update(backoffLimit=10),
    ),
    "migration without a deadline": (
        "migration-job",
        lambda o: find(o, "Job")["spec"].pop("activeDeadlineSeconds"),
    ),
    "migration from another image": (
        "migration-job",
        lambda o: pod(o, "Job")["containers"][0].update(image=f"registry.example.org/{APP}:v0"),
    ),
}


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return build(planted_render().path, "production")


def test_every_rule_has_a_planted_violation() -> None:
    rules = set(checker(planted_render().path).RULES)
    assert {rule for rule, _ in PLANTS.values()} == rules


@pytest.mark.parametrize("plant", PLANTS)
def test_the_check_names_the_rule_a_planted_violation_breaks(
    production: list[dict[str, Any]], plant: str
) -> None:
    rule, violate = PLANTS[plant]
    objects = copy.deepcopy(production)
    violate(objects)
    problems = checker(planted_render().path).check(objects, "production")
    assert {name for name, _ in problems} == {rule}, problems


def test_the_schema_validation_refuses_a_misspelt_field(
    production: list[dict[str, Any]],
) -> None:
    deployment = copy.deepcopy(find(production, "Deployment"))
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_check_agrees_with_the_service_and_its_image(manifests: Rendered) -> None:
    """The pods' user is the image's, and a setting the ConfigMap leaves unset is judged at
    the service's own default."""
    module = checker(manifests.path)
    dockerfile = (manifests.path / "Dockerfile").read_text()
    assert f"\nUSER {module.USER_ID}:{module.USER_ID}\n" in dockerfile
    settings_py = manifests.path / "src" / "acme_orders" / "platform" / "settings.py"
    defaults = {}
    for node in ast.walk(ast.parse(settings_py.read_text())):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            value = node.value
            if isinstance(value, ast.Call):  # Field(default=...)
                value = next((k.value for k in value.keywords if k.arg == "default"), None)
            if isinstance(value, ast.Constant):
                defaults[node.target.id.upper()] = value.value
    for name, default in module.DEFAULTS.items():
        assert name in defaults, f"{name}: no such setting in platform/settings.py"
        service = str(defaults[name]).lower()
        assert default == service or float(default) == float(service), (name, default, service)


def test_a_violation_in_an_overlay_fails_the_command_line(tmp_path: Path) -> None:
    project = tmp_path / APP
    shutil.copytree(planted_render().path / "deploy", project / "deploy")
    replicas = project / "deploy/kubernetes/overlays/production/replicas.yaml"
    replicas.write_text(replicas.read_text().replace("minReplicas: 2", "minReplicas: 1"))
    result = subprocess.run(
        [sys.executable, "deploy/kubernetes/check_manifests.py"],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "overlays/production: replicas: production runs minReplicas 1" in result.stdout
    assert "overlays/staging: every rule holds" in result.stdout
    listed = subprocess.run(
        [sys.executable, "deploy/kubernetes/check_manifests.py", "--rules"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rules = checker(planted_render().path).RULES
    assert [line.split(":")[0] for line in listed.splitlines()] == list(rules)


# --- the scripts, against a kubectl that records its calls ------------------------------

FAKE_KUBECTL = """#!/usr/bin/env bash
# Records each call; builds with the real kubectl; answers `get job` with $JOB_STATE.
printf '%s\\n' "$*" >> "$CALLS"
for arg; do
    if [ -f "$arg" ]; then cp "$arg" "$CALLS.$(wc -l < "$CALLS")"; fi
done
case "$1" in
    kustomize) exec "$REAL_KUBECTL" "$@" ;;
    get) echo "$JOB_STATE" ;;
    logs) echo "migration output" ;;
    rollout) [ "$2" != status ] || exit "${ROLLOUT_STATUS:-0}" ;;
esac
"""


@pytest.fixture
def fake_kubectl(tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "kubectl"
    script.write_text(FAKE_KUBECTL)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"KUBECTL": str(script), "CALLS": str(tmp_path / "calls"), "REAL_KUBECTL": kubectl()}


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def applied(env: dict[str, str], number: int) -> list[str]:
    """The kinds in the file passed to call `number` (1-based)."""
    text = Path(f"{env['CALLS']}.{number}").read_text()
    return [item["kind"] for item in yaml.safe_load_all(text) if item]


JOB_STATE_PATH = 'jsonpath={.status.conditions[?(@.status=="True")].type}'


def test_deploy_migrates_then_rolls_out(fake_kubectl: dict[str, str]) -> None:
    project = planted_render().path
    result = run_script(
        project, "deploy", "production", IMAGE, JOB_STATE="Complete", **fake_kubectl
    )
    assert result.returncode == 0, result.stderr
    steps = calls(fake_kubectl)
    namespace = f"{APP}-production"
    assert [step.split(" /")[0].split(" -f")[0] for step in steps] == [
        "kustomize",
        "apply",
        f"delete job {APP}-migrate -n {namespace} --ignore-not-found --wait=true",
        "apply",
        f"get job {APP}-migrate -n {namespace} -o {JOB_STATE_PATH}",
        "apply",
        f"rollout status deployment/{APP} -n {namespace} --timeout=600s",
    ]
    assert not {"Job", "Deployment"} & set(applied(fake_kubectl, 2))
    assert applied(fake_kubectl, 4) == ["Job"]
    assert applied(fake_kubectl, 6) == ["Deployment"]


def test_deploy_stops_before_the_rollout_when_the_migration_fails(
    fake_kubectl: dict[str, str],
) -> None:
    project = planted_render().path
    result = run_script(project, "deploy", "staging", IMAGE, JOB_STATE="Failed", **fake_kubectl)
    assert result.returncode == 1
    assert "the migration failed: nothing was rolled out" in result.stderr
    assert "migration output" in result.stderr
    steps = calls(fake_kubectl)
    assert not any(step.startswith("rollout") for step in steps)
    files = [n for n, step in enumerate(steps, 1) if step.startswith("apply")]
    assert all("Deployment" not in applied(fake_kubectl, n) for n in files)


def test_a_failed_rollout_points_to_the_rollback(fake_kubectl: dict[str, str]) -> None:
    project = planted_render().path
    result = run_script(
        project,
        "deploy",
        "staging",
        IMAGE,
        JOB_STATE="Complete",
        ROLLOUT_STATUS="1",
        **fake_kubectl,
    )
    assert result.returncode == 1
    assert "scripts/rollback staging returns to the previous version" in result.stderr


REFUSED = {
    "no arguments": ((), "expected ENVIRONMENT and IMAGE"),
    "unknown environment": (("qa", IMAGE), "ENVIRONMENT must be staging or production"),
    "latest": (("staging", f"registry.example.org/{APP}:latest"), "is latest"),
    "no tag": (("staging", f"registry.example.org/{APP}"), "has no tag or digest"),
    "no tag, registry port": (("staging", f"registry:5000/{APP}"), "has no tag or digest"),
    "short digest": (("staging", f"registry.example.org/{APP}@sha256:0123"), "is not a digest"),
    "bad tag": (("staging", f"registry.example.org/{APP}:-x"), "is not a valid tag"),
    "bad name": (("staging", "Registry/App:v1"), "is not an image name"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_deploy_refuses_bad_arguments_before_touching_kubectl(
    fake_kubectl: dict[str, str], case: str
) -> None:
    arguments, message = REFUSED[case]
    result = run_script(planted_render().path, "deploy", *arguments, DRY_RUN="1", **fake_kubectl)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert "usage: scripts/deploy" in result.stderr
    assert calls(fake_kubectl) == []


def test_a_tag_with_a_registry_port_is_a_tag() -> None:
    image = f"registry:5000/team/{APP}:3f2c1ab"
    result = run_script(planted_render().path, "deploy", "staging", image, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    assert f"image: {image}\n" in result.stdout


def test_rollback_undoes_the_rollout_and_waits(fake_kubectl: dict[str, str]) -> None:
    project = planted_render().path
    result = run_script(project, "rollback", "production", **fake_kubectl)
    assert result.returncode == 0, result.stderr
    namespace = f"{APP}-production"
    assert calls(fake_kubectl)[:2] == [
        f"rollout undo deployment/{APP} -n {namespace}",
        f"rollout status deployment/{APP} -n {namespace} --timeout=600s",
    ]
    refused = run_script(project, "rollback", "prod", **fake_kubectl)
    assert refused.returncode == 2
    assert "usage: scripts/rollback staging|production" in refused.stderr
    dry = run_script(project, "rollback", "staging", DRY_RUN="1")
    assert dry.stdout.startswith(f"kubectl rollout undo deployment/{APP} -n {APP}-staging\n")


# --- the question ------------------------------------------------------------------------


def test_deploy_none_renders_nothing_of_it_and_costs_one_render() -> None:
    assert "deploy" in plan().documentation, "deploy must not multiply the renders"
    for rendered in plan().renders:
        deployed = rendered.answers["deploy"] == "kubernetes"
        assert any(f.startswith(DEPLOY_FILES) for f in rendered.files) == deployed, rendered.id
        readme = (rendered.path / "README.md").read_text()
        assert ("## Deploy on Kubernetes" in readme) == deployed, rendered.id
        if rendered.answers["database"] == "sqlite":
            assert not deployed, "SQLite cannot be shared by replicas: deploy defaults to none"
    undeployed = [r for r in plan().renders if r.answers["deploy"] == "none"]
    assert len([r for r in undeployed if r.answers["database"] != "sqlite"]) == 1
    assert axes()["deploy"] == ["kubernetes", "none"]
