"""Monitoring: a real Prometheus scrapes a rendered service running two workers and counts
exactly what was sent; every render's alert rules pass `promtool check rules` and their own
unit tests, one file per alert with a series that fires it and one that must not; the
dashboard shows the alerts' signals, and its queries and the rules run on the real server.

promtool and prometheus are Debian's `prometheus` package (.ci/run installs it); a missing
binary fails, never skips.
"""

import contextlib
import hashlib
import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
import yaml

from .conftest import Project, plan
from .matrix import Rendered
from .service import free_port, running
from .test_data_layer import migrate

APP = "acme-orders"
NS = "acme_orders"
# Metric names in PromQL: a name followed by its selector or range, or a recorded name.
METRIC = re.compile(r"\b([a-zA-Z_][a-zA-Z0-9_]*(?::[a-zA-Z0-9_]+)*)\s*(?=\{|\[)|\b(\w+:\w+:\w+)\b")


def require(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: .ci/run installs Debian's prometheus")


def monitoring_digest(rendered: Rendered) -> str:
    digest = hashlib.sha256()
    for path in sorted((rendered.path / "monitoring").rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(rendered.path).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def distinct_monitoring() -> list[Rendered]:
    """One render per distinct monitoring/ directory."""
    found: dict[str, Rendered] = {}
    for rendered in plan().renders:
        found.setdefault(monitoring_digest(rendered), rendered)
    return list(found.values())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "monitoring" in metafunc.fixturenames:
        renders = distinct_monitoring()
        metafunc.parametrize("monitoring", renders, ids=[r.id for r in renders])


def alerts(rules: dict) -> dict[str, dict]:
    return {
        rule["alert"]: rule
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def metric_names(expr: str) -> set[str]:
    names = {a or b for a, b in METRIC.findall(expr)}
    return names - {"by", "without", "on", "ignoring", "rate", "sum", "min", "max", "absent"}


def signals(expr: str, records: dict[str, str]) -> set[str]:
    """The metrics `expr` reads, through the recording rules it uses."""
    names = metric_names(expr)
    for name in names & records.keys():
        names = (names - {name}) | signals(records[name], records)
    return names


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_alert_rules_pass_promtool_and_each_alert_has_its_own_tests(
    monitoring: Rendered,
) -> None:
    require("promtool")
    directory = monitoring.path / "monitoring"
    checked = promtool("check", "rules", "alerts.yml", cwd=directory)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = sorted(p.relative_to(directory).as_posix() for p in directory.glob("tests/*.yml"))
    tested = promtool("test", "rules", *tests, cwd=directory)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    loaded = yaml.safe_load((directory / "alerts.yml").read_text())
    rules = alerts(loaded)
    records = {
        rule["record"]: rule["expr"]
        for group in loaded["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    expected = {"ErrorBudgetBurnFast", "ErrorBudgetBurnSlow", "LatencyP99High"}
    expected |= {"ReadinessFailing", "RateLimitRefusalsSpiking", "TargetDown", "TargetMissing"}
    if monitoring.answers["database"] != "none":
        expected.add("DBPoolSaturated")
    assert set(rules) == expected
    for name in rules:
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=.)(?=[A-Z][a-z])", "_", name).lower()
        path = directory / "tests" / f"{snake}.test.yml"
        assert path.exists(), f"{name}: no {path.name}"
        cases = [
            case
            for test in yaml.safe_load(path.read_text())["tests"]
            for case in test["alert_rule_test"]
        ]
        assert {case["alertname"] for case in cases} == {name}, path.name
        assert any(case["exp_alerts"] for case in cases), f"{path.name}: nothing fires {name}"
        assert any(not case["exp_alerts"] for case in cases), f"{path.name}: nothing must not"
    dashboard = json.loads((directory / "dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    shown = set().union(*(signals(expr, records) for expr in dashboard_exprs(dashboard)))
    for name, rule in rules.items():
        missing = signals(rule["expr"], records) - shown
        assert not missing, f"{name} alerts on {missing}, which the dashboard does not show"


def test_a_planted_wrong_threshold_fails_the_alert_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: a p99 threshold of 5 s instead of 0.5 s is caught by name."""
    require("promtool")
    directory = tmp_path / "monitoring"
    shutil.copytree(distinct_monitoring()[0].path / "monitoring", directory)
    rules = directory / "alerts.yml"
    source = rules.read_text()
    assert source.count(") > 0.5\n") == 1
    rules.write_text(source.replace(") > 0.5\n", ") > 5\n"))
    assert promtool("check", "rules", "alerts.yml", cwd=directory).returncode == 0
    tested = promtool("test", "rules", "tests/latency_p99_high.test.yml", cwd=directory)
    assert tested.returncode != 0
    assert "alertname: LatencyP99High" in tested.stdout + tested.stderr


# --- a real Prometheus scraping a real server ------------------------------------------------


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict]:
        answer = httpx2.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10)
        body = answer.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@contextlib.contextmanager
def prometheus(tmp: Path, target: str, rules: Path) -> Iterator[Prometheus]:
    """Prometheus scraping `target` every second as job APP, with `rules` loaded."""
    require("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": APP, "static_configs": [{"targets": [target]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp / "prometheus.log").open("w") as log:
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(port)
    try:
        assert until(lambda: ready(server.base), timeout=30), (tmp / "prometheus.log").read_text()
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def ready(base: str) -> bool:
    try:
        return httpx2.get(f"{base}/-/ready", timeout=1).status_code == 200
    except httpx2.TransportError:
        return False


def until(condition: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.default_answers
def test_prometheus_counts_every_request_of_both_workers(variant: Project, tmp_path: Path) -> None:
    assert migrate(variant).returncode == 0
    metrics_port = free_port()
    env = {
        **variant.env,
        "WORKERS": "2",
        "METRICS_PORT": str(metrics_port),
        "TMPDIR": str(tmp_path),  # where the workers' metric files go
        "RATE_LIMIT_ENABLED": "true",
        "RATE_LIMIT_DEFAULT": "100000/minute",
        "AUTH_FAILURE_RATE_LIMIT": "1/minute",
    }
    rules = variant.path / "monitoring" / "alerts.yml"
    expected = {
        f'sum(http_requests_total{{job="{APP}", route="/healthz", status="2xx"}})': 60,
        f'sum(http_requests_total{{job="{APP}", route="/notes", status="2xx"}})': 20,
        f'sum(http_request_duration_seconds_count{{job="{APP}", route="/notes"}})': 20,
        f'sum({NS}_feature_flag_evaluations_total{{flag="notes-word-count"}})': 20,
        f'sum({NS}_authentication_failures_total{{reason="malformed"}})': 3,
        f'sum({NS}_rate_limit_refusals_total{{policy="auth-failures"}})': 2,
        f'sum({NS}_outbound_requests_total{{host="127.0.0.1", outcome="2xx"}})': 1,
        f'{NS}_readiness_check_passing{{check="database:responsive"}}': 1,
        f"sum({NS}_db_pool_size)": 10,  # DB_POOL_SIZE, 5, in each of the two workers
        f"count({NS}_build_info)": 1,
        f'up{{job="{APP}"}}': 1,
    }
    with (
        running(variant.python, variant.path, env, output=tmp_path / "server.log") as (base, _),
        prometheus(tmp_path, f"127.0.0.1:{metrics_port}", rules) as server,
    ):
        files = next(tmp_path.glob("metrics-*"))
        assert until(lambda: len(list(files.glob("gauge_livesum_*.db"))) == 2, 60), "2 workers"
        send(base, variant.headers, metrics_port)
        found: dict[str, float | None] = {}

        def counted() -> bool:
            found.update((expr, server.value(expr)) for expr in expected)
            return found == expected

        assert until(counted, 60), {e: (found[e], n) for e, n in expected.items() if found[e] != n}
        # The rules loaded and evaluated, the dashboard's queries run, and every metric they
        # name exists on the real server.
        groups = httpx2.get(f"{server.base}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert {rule["health"] for group in groups for rule in group["rules"]} == {"ok"}
        dashboard = json.loads((variant.path / "monitoring" / "dashboard.json").read_text())
        exprs = [
            expr.replace("$job", APP).replace("$__rate_interval", "1m")
            for expr in dashboard_exprs(dashboard)
        ]
        for expr in exprs:
            server.query(expr)
        exprs += [rule["expr"] for rule in alerts(yaml.safe_load(rules.read_text())).values()]
        names = httpx2.get(f"{server.base}/api/v1/label/__name__/values", timeout=5).json()
        recorded = {rule["name"] for group in groups for rule in group["rules"]}
        unknown = set().union(*map(metric_names, exprs)) - set(names["data"]) - recorded
        assert not unknown, f"queries name metrics the service does not expose: {unknown}"


def send(base: str, headers: dict[str, str], metrics_port: int) -> None:
    """What `expected` counts: 60 probes on new connections (both workers serve them), 20
    note lists, 3 bad tokens on one connection (one worker: the 2nd and 3rd are throttled),
    one outbound call (to the metrics listener), one readiness probe."""

    def probe(_: int) -> int:
        return httpx2.get(f"{base}/healthz", timeout=10).status_code

    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(probe, range(60))) == {200}
    with httpx2.Client(base_url=base, headers=headers, timeout=10) as client:
        for _ in range(20):
            assert client.get("/notes", params={"limit": 10}).status_code == 200
        upstream = f"http://127.0.0.1:{metrics_port}/metrics"
        assert client.get("/_test/upstream", params={"url": upstream}).status_code == 200
    with httpx2.Client(base_url=base, timeout=10) as client:
        refused = [
            client.get("/notes", headers={"Authorization": "Bearer not-a-token"}).status_code
            for _ in range(3)
        ]
        assert refused == [401, 429, 429]
        assert client.get("/readyz").status_code == 200
