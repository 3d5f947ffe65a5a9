"""Loading the settings: the environment over `.env.<ENVIRONMENT>` over `.env`, checked
as a whole. Every problem is reported at once and by environment variable name, so a
misconfigured deploy stops before it binds a port instead of failing at first use.
"""

import os
from typing import Any

from dotenv import dotenv_values
from pydantic import ValidationError

from .setting_types import FEATURE_PREFIX
from .settings import PlatformSettings


class ConfigurationError(Exception):
    """Settings could not be loaded; `str()` names every offending environment variable."""

    def __init__(self, error: ValidationError) -> None:
        self.problems = _describe(error)
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [
            f"Configuration error: {len(self.problems)} problem(s); the service was not started."
        ]
        lines += [f"  {var}: {reason}" for var, reason in self.problems]
        lines.append("Set them in the environment or a .env file; .env.example documents each.")
        return "\n".join(lines)


def _describe(error: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for item in error.errors(include_input=False, include_url=False):
        if item["type"] == "unsafe_for_deploy":
            problems.extend(item["ctx"]["problems"])
            continue
        var = _variable(item["loc"])
        reason = "missing (required, no default)" if item["type"] == "missing" else item["msg"]
        problems.append((var, reason))
    return problems


def _variable(loc: tuple[int | str, ...]) -> str:
    if loc[:1] == ("features",) and len(loc) > 1:
        return f"{FEATURE_PREFIX}{loc[1]}"
    return str(loc[0]).upper() if loc else "SETTINGS"


def _feature_variables(env_files: tuple[str, ...]) -> dict[str, str]:
    """FEATURE_<NAME> values by NAME: the `.env` files, then the process environment over them."""
    found: dict[str, str | None] = {}
    for path in env_files:
        found.update(dotenv_values(path))
    found.update(os.environ)
    return {
        name.removeprefix(FEATURE_PREFIX): value
        for name, value in found.items()
        if name.startswith(FEATURE_PREFIX) and value is not None
    }


def load_settings(cls: type[PlatformSettings], **overrides: Any) -> PlatformSettings:
    """Build `cls` from the environment and the `.env` files of its ENVIRONMENT.

    Raises ConfigurationError, never a bare ValidationError.
    """
    environment = os.environ.get("ENVIRONMENT") or dotenv_values(".env").get("ENVIRONMENT")
    env_files = (".env", f".env.{environment}") if environment else (".env",)
    try:
        features = _feature_variables(env_files)
        return cls(_env_file=env_files, **{"features": features, **overrides})  # type: ignore[call-arg]
    except ValidationError as error:
        raise ConfigurationError(error) from None


def export(name: str, value: str) -> None:
    """Set `name` in this process's environment, inherited by the processes it starts: for a
    library configured only that way (prometheus_client's multiprocess directory)."""
    os.environ[name] = value
