"""Ages on the command line (`deploy history prune --older-than 30d`): a number and one unit letter."""

from __future__ import annotations

import math
import re

from deployer.errors import InputError

UNITS: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
FLAG = "--older-than"


def parse_age(text: str, *, flag: str = FLAG) -> float:
    """Seconds in `text`: '90d', '12h', '1.5w', '45m', '30s'. The unit is required: a bare '30' could mean
    days or seconds, and a prune that guesses wrong deletes the history. Zero is refused for the same reason."""
    found = _AGE.fullmatch(text.strip().lower())
    if found is None:
        raise InputError(None, flag, f"expected a number and a unit (s, m, h, d or w), like 30d (got {text!r})")
    seconds = float(found.group(1)) * UNITS[found.group(2)]
    if seconds <= 0 or not math.isfinite(seconds):
        raise InputError(None, flag, f"expected an age above zero, like 30d (got {text!r})")
    return seconds
