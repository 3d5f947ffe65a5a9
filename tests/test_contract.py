"""The API contract under a fuzzer: Schemathesis, with every check it has, against the real
server process of each auth and database variant, with a valid credential.

The OpenAPI document must tell the truth: every status and content type an operation
really answers (problem+json errors, the platform's 401/413/429/503...), the rate-limit
headers, an Allow header that lists every method of a path, a schema that accepts exactly
what the service accepts. Rate limits are on (with a default no run reaches) so the
RateLimit headers and the stricter per-route limits answer as in production.
"""

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest

from .conftest import Project
from .service import running
from .test_data_layer import migrate

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_EXAMPLES = 10  # per operation and phase
SEED = 20261206  # the same cases every run: a failure reproduces

# Reusing an Idempotency-Key with another payload is refused with 422, as the IETF draft
# (draft-ietf-httpapi-idempotency-key-header, section 2.7) requires; Schemathesis generates
# the same key for different bodies and counts that 422 as a schema-valid request refused.
# PATCH shares the body fields of POST and keeps the check without this exception.
CONFIG = """
[[operations]]
include-path = "/notes"
include-method = "POST"
[operations.checks.positive_data_acceptance]
expected-statuses = ["2XX", "3XX", 401, 403, 404, 409, 422, 429, "5XX"]
"""


def fuzz(project: Project, base: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    headers = [arg for name, value in project.headers.items() for arg in ("-H", f"{name}: {value}")]
    return subprocess.run(
        [
            str(SCHEMATHESIS),
            "--no-color",
            "--config-file",
            str(config),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            *headers,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.exercises("auth", "database")
def test_schemathesis_finds_no_contract_failure(
    variant: Project, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    env = {
        **variant.env,
        "ENVIRONMENT": "development",  # where the document is served
        "RATE_LIMIT_ENABLED": "true",
        "RATE_LIMIT_DEFAULT": "100000/minute",
    }
    if "DATABASE_URL" in env:
        migrated = migrate(variant, env)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    served = running(
        variant.python, variant.path, env, output=tmp_path / "server.log", module="acme_orders"
    )
    with served as (base, _):
        document = httpx2.get(f"{base}/openapi.json", timeout=10).json()
        if not document["paths"]:
            # Without a database the service has no resource of its own (no notes): only the
            # probes, which the document leaves out. Nothing to fuzz; the document is still
            # the platform's, not FastAPI's defaults.
            assert variant.rendered.answers["database"] == "none"
            assert set(document["components"]["schemas"]) == {"Problem"}
            record_property("schemathesis", "no operation in the document (no database)")
            return
        result = fuzz(variant, base, tmp_path)
    summary = result.stdout[result.stdout.find("FAILURES") :][-6000:]
    assert result.returncode == 0, summary + result.stderr[-2000:]
    generated = re.search(r"(\d+) generated", result.stdout)
    assert generated is not None, result.stdout[-2000:]
    assert int(generated.group(1)) > 0
    # The summary prints these (conftest.py): cases per variant, across xdist workers.
    record_property("schemathesis", f"{generated.group(1)} cases, 0 failures")
