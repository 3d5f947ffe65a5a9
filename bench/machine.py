"""Where and when a run happened: the machine, its load, the tools, the template revision."""

import datetime
import os
import platform
import subprocess
from pathlib import Path

from .database import server_version
from .project import ROOT

TEMPLATE_PATHS = ("template", "hooks", "copier.yml")


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def describe(load_before: list[float]) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor(),
    )
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_mb": int(meminfo[meminfo.index("MemTotal:") + 1]) // 1024,
        "kernel": platform.release(),
        "hostname": platform.node(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def tool_versions() -> dict[str, str]:
    return {
        "wrk": _output(["wrk", "-v"]).split(" [")[0],
        "postgresql": server_version(),
    }


def template_revision() -> dict:
    """The commit, and whether the template's files differ from it (read-only git calls)."""
    git = ["git", "-C", str(ROOT), "--no-optional-locks"]
    commit = _output([*git, "rev-parse", "HEAD"]).strip()
    changed = _output([*git, "diff", "--name-only", "HEAD", "--", *TEMPLATE_PATHS]).splitlines()
    return {"commit": commit or None, "uncommitted_template_changes": len(changed)}


def _output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return ""
    return done.stdout or done.stderr
