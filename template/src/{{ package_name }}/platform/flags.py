"""Feature flags through OpenFeature, from a JSON file and FEATURE_<NAME> variables.

Handlers ask for a flag with `Annotated[bool, flag("new-thing")]` and never learn where
its value came from (flag_provider.py). Flags are off unless set. The file is polled in
the background and re-read when it changes: flipping a flag needs no restart, and
evaluating one reads no file.
"""

import asyncio
import re
import uuid
from typing import Any

import structlog
from fastapi import Depends, Request
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.evaluation_context import EvaluationContext
from openfeature.provider.no_op_provider import NoOpProvider

from . import state
from .flag_provider import FLAG_KEY_PATTERN, FlagsProvider
from .settings import PlatformSettings

log = structlog.get_logger(__name__)


class FeatureFlags:
    """One app's flags: a provider bound to an OpenFeature domain of its own, and its watcher.

    OpenFeature's provider registry is global to the process. Binding each app to its own
    domain, never the default provider, keeps two apps in one process (as in the tests)
    from replacing or closing each other's flags.
    """

    def __init__(self, provider: FlagsProvider, reload_interval: float) -> None:
        self.provider = provider
        self.domain = f"{__name__}:{uuid.uuid4().hex}"
        self.client: OpenFeatureClient = api.get_client(self.domain)
        self._reload_interval = reload_interval
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.provider.reload)
        api.set_provider_and_wait(self.provider, self.domain)
        if self.provider.path is not None:
            self._watcher = asyncio.create_task(self._watch(), name="flags file watcher")
        log.info(
            "feature flags ready",
            path=str(self.provider.path) if self.provider.path else None,
            from_file=sorted(self.provider.rules),
            pinned=sorted(self.provider.pinned),
        )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._reload_interval)
            try:
                await asyncio.to_thread(self.provider.reload)
            except Exception:
                # A bug in one reload must not stop the next ones.
                log.exception("flags reload failed", path=str(self.provider.path))

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher])
        # Unbinds the domain; the registry then shuts the provider down.
        api.set_provider(NoOpProvider(), self.domain)

    async def is_on(self, key: str, targeting_key: str | None) -> bool:
        context = EvaluationContext(targeting_key=targeting_key)
        return await self.client.get_boolean_value_async(key, False, context)


async def open_flags(settings: PlatformSettings) -> FeatureFlags:
    flags = FeatureFlags(
        FlagsProvider(settings.features, settings.flags_file), settings.flags_reload_interval
    )
    await flags.start()
    return flags


def targeting_key(request: Request) -> str | None:
    """Who a rollout buckets: the authenticated principal, else the client's address
    (also when every caller shares one principal).

    Behind a proxy listed in FORWARDED_ALLOW_IPS the address is the X-Forwarded-For
    client, and callers behind one NAT share a variant. Without an address (a Unix
    socket) rollouts stay off for the caller.
    """
    principal = state.principal(request.scope)
    if principal is not None and principal.identifies_caller:
        return principal.subject
    return request.client.host if request.client else None


def flag(key: str) -> Any:
    """A dependency: `on: Annotated[bool, flag("new-thing")]` is the flag for this caller."""
    if not re.fullmatch(FLAG_KEY_PATTERN, key):
        raise ValueError(f"flag key {key!r} must be lowercase words joined by '-'")

    async def evaluate(request: Request) -> bool:
        resources = state.get_resources(request)
        on = await resources.flags.is_on(key, targeting_key(request))
        if resources.metrics is not None:
            resources.metrics.add(resources.metrics.flag_evaluations, key, "on" if on else "off")
        return on

    return Depends(evaluate)
