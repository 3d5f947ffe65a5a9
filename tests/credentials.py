"""Credentials for a generated service's protected routes, following its `auth` answer.

jwt: the service gets a development HS256 secret and tokens come from its own
`python -m acme_orders dev-token` command; api_key: a key whose SHA-256 is listed in
API_KEYS (the documented `name:sha256hex:scopes` format); none: nothing, every
request is the gateway's.
"""

import hashlib
import subprocess
from pathlib import Path

SUBJECT = "prodready-suite"
SCOPES = ("notes:write",)
JWT_ENV = {
    "JWT_ISSUER": "https://issuer.prodready.test/",
    "JWT_AUDIENCE": "acme-orders",
    "JWT_SECRET": "prodready-suite-only-hs256-key-0123456789abcdef",  # pragma: allowlist secret
    "JWT_JWKS_URL": "",
}
API_KEY = "prodready-suite-only-api-key-0123456789abcdef"  # pragma: allowlist secret
REQUIRED = {"jwt": ["JWT_ISSUER", "JWT_AUDIENCE"], "api_key": ["API_KEYS"], "none": []}

_tokens: dict[Path, str] = {}


def service_env(auth: str) -> dict[str, str]:
    """What the service needs to authenticate the suite's requests."""
    if auth == "jwt":
        return dict(JWT_ENV)
    if auth == "api_key":
        digest = hashlib.sha256(API_KEY.encode()).hexdigest()
        return {"API_KEYS": f"{SUBJECT}:{digest}:{' '.join(SCOPES)}"}
    return {}


def required(auth: str) -> list[str]:
    """The settings this `auth` answer adds that have no default."""
    return REQUIRED[auth]


def headers(auth: str, python: Path, cwd: Path, env: dict[str, str]) -> dict[str, str]:
    """Headers that make a request the suite's principal's; a token is minted once per project."""
    if auth == "api_key":
        return {"X-API-Key": API_KEY}
    if auth == "none":
        return {}
    if python not in _tokens:
        scopes = [argument for scope in SCOPES for argument in ("--scope", scope)]
        result = subprocess.run(
            [str(python), "-m", "acme_orders", "dev-token", SUBJECT, *scopes, "--ttl", "21600"],
            cwd=cwd,
            env={**env, **JWT_ENV},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        _tokens[python] = result.stdout.strip()
    return {"Authorization": f"Bearer {_tokens[python]}"}
