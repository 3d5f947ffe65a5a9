"""The flag values themselves: a JSON file polled for changes, FEATURE_<NAME> pins over it,
and percentage rollouts that bucket a caller the same way on every evaluation.

An OpenFeature provider, so a hosted flag service can replace it without touching a
handler. README.md ("Feature flags") documents the file format.
"""

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import structlog
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import TargetingKeyMissingError, TypeMismatchError
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    TypeAdapter,
    ValidationError,
)

FLAG_KEY_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"  # FEATURE_NEW_THING pins `new-thing`
BUCKETS = 10_000  # rollout percentages resolve to 0.01 %

log = structlog.get_logger(__name__)


class Rollout(BaseModel):
    """On for `rollout` percent of targeting keys, the same ones on every evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rollout: float = Field(ge=0, le=100, strict=True)


def _rule_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "on-off"
    return "rollout" if isinstance(value, dict | Rollout) else None


# One error per wrong flag, from the one shape it was meant to have.
Rule = Annotated[
    Annotated[StrictBool, Tag("on-off")] | Annotated[Rollout, Tag("rollout")],
    Discriminator(
        _rule_kind,
        custom_error_type="flag_rule",
        custom_error_message='must be true, false or {"rollout": <percent>}',
    ),
]
FLAGS_FILE = TypeAdapter(dict[Annotated[str, Field(pattern=FLAG_KEY_PATTERN)], Rule])


def bucket(flag_key: str, targeting_key: str) -> int:
    """0..9999 for this flag and caller, equal in every process (hash() is salted per process).

    The flag key is part of the hash, so two rollouts at 20 % reach different callers.
    """
    data = f"{flag_key}:{targeting_key}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") % BUCKETS


def in_rollout(flag_key: str, targeting_key: str, percent: float) -> bool:
    """Raising `percent` only adds callers: whoever was on stays on."""
    return bucket(flag_key, targeting_key) < percent * BUCKETS / 100


class FlagsProvider(AbstractProvider):
    """Boolean flags: FEATURE_<NAME> pins first, then the flags file, else the default (off).

    A missing or malformed file counts as empty (every file flag off, the safe side:
    flagged code is the new code), is logged as an error, and is read again once it
    changes. `reload` does blocking I/O; the service calls it from a worker thread.
    """

    def __init__(self, pinned: Mapping[str, bool], path: Path | None = None) -> None:
        super().__init__()
        self.pinned = dict(pinned)
        self.path = path
        self.rules: dict[str, bool | Rollout] = {}
        self._seen: tuple[int, ...] | None = None  # the file's identity when last read

    def get_metadata(self) -> Metadata:
        return Metadata(name="file and environment")

    def reload(self) -> None:
        """Re-read the file if it changed (inode, size or mtime) since the last call."""
        if self.path is None:
            return
        seen = _identity(self.path)
        if seen == self._seen:
            return
        first, self._seen = self._seen is None, seen
        try:
            rules = FLAGS_FILE.validate_json(self.path.read_bytes())
        except OSError as error:
            self._unusable(f"cannot be read ({type(error).__name__})")
            rules = {}
        except ValidationError as error:
            self._unusable(_summary(error))
            rules = {}
        old, self.rules = self.rules, rules
        if first:
            return
        changes = [
            {"flag": key, "old": _plain(old.get(key)), "new": _plain(rules.get(key))}
            for key in sorted(old.keys() | rules.keys())
            if old.get(key) != rules.get(key)
        ]
        if changes:
            log.info("feature flags changed", path=str(self.path), changes=changes)
            self.emit_provider_configuration_changed(
                ProviderEventDetails(flags_changed=[change["flag"] for change in changes])
            )

    def _unusable(self, reason: str) -> None:
        log.error(
            "flags file unusable: its flags are off until it is fixed",
            path=str(self.path),
            reason=reason,
        )

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        if flag_key in self.pinned:
            return _resolved(self.pinned[flag_key], Reason.STATIC, "environment")
        rule = self.rules.get(flag_key)
        if rule is None:
            return FlagResolutionDetails(value=default_value, reason=Reason.DEFAULT)
        if isinstance(rule, bool):
            return _resolved(rule, Reason.STATIC, "file")
        targeting_key = evaluation_context.targeting_key if evaluation_context else None
        if not targeting_key:
            raise TargetingKeyMissingError(f"{flag_key} is a rollout: it needs a targeting key")
        return _resolved(in_rollout(flag_key, targeting_key, rule.rollout), Reason.SPLIT, "file")

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return self._not_boolean(flag_key, default_value)

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return self._not_boolean(flag_key, default_value)

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return self._not_boolean(flag_key, default_value)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Any,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Any]:
        return self._not_boolean(flag_key, default_value)

    def _not_boolean(self, flag_key: str, default_value: Any) -> FlagResolutionDetails[Any]:
        if flag_key in self.pinned or flag_key in self.rules:
            raise TypeMismatchError(f"{flag_key} is a boolean flag")
        return FlagResolutionDetails(value=default_value, reason=Reason.DEFAULT)


def _identity(path: Path) -> tuple[int, ...]:
    """What changes when the file is edited or replaced; () when it cannot be found."""
    try:
        stat = path.stat()
    except OSError:
        return ()
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _summary(error: ValidationError) -> str:
    """Where the file is wrong and why, without its values."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'file'}: {item['msg']}"
        for item in error.errors(include_input=False, include_url=False)
    )


def _plain(rule: bool | Rollout | None) -> bool | dict[str, float] | None:
    return rule.model_dump() if isinstance(rule, Rollout) else rule


def _resolved(value: bool, reason: Reason, source: str) -> FlagResolutionDetails[bool]:
    return FlagResolutionDetails(
        value=value,
        reason=reason,
        variant="on" if value else "off",
        flag_metadata={"source": source},
    )
