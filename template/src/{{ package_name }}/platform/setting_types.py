"""Value types the settings parse: feature switches, flag names, rate limits.

Apart from settings.py so that it stays the list of settings, and so that ratelimit.py can
parse a limit without importing the settings.
"""

import re
from functools import lru_cache
from typing import Any

from limits import RateLimitItem, parse
from pydantic_core import PydanticCustomError

FEATURE_PREFIX = "FEATURE_"
SWITCH_WORDS = {
    **dict.fromkeys(("true", "1", "on", "yes"), True),
    **dict.fromkeys(("false", "0", "off", "no"), False),
}


def switch(value: Any) -> Any:
    """A FEATURE_<NAME> value: true/1/on/yes or false/0/off/no, any case, and nothing else."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word not in SWITCH_WORDS:
            raise PydanticCustomError("switch", "must be true, 1, on, yes, false, 0, off or no")
        return SWITCH_WORDS[word]
    return value


def feature_name(name: str) -> str:
    if not re.fullmatch(r"[A-Z0-9]+(_[A-Z0-9]+)*", name):
        raise PydanticCustomError(
            "feature_name", "the flag name must be upper-case letters and digits joined by '_'"
        )
    return name


@lru_cache(maxsize=64)
def parse_limit(limit: str) -> RateLimitItem:
    """A rate limit in `limits` notation ("10/minute"), or a ValueError that shows the form."""
    try:
        return parse(limit)
    except ValueError:
        raise ValueError(
            f"{limit!r} is not a rate limit; write it like '10/minute' or '100 per hour'"
        ) from None
