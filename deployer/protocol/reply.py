"""A reply from a device, read as untrusted: `Fields` reads a record of it field by field, each with its type
and its bounds or format checked, and device-sent text is made safe to show."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deployer.errors import AgentError

SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_TEXT = 4096  # a name, key or path a board sends
MAX_ITEMS = 100_000  # entries in one reply's list
MAX_ERROR = 1 << 16  # an error message a board sends about one item (cut shorter to show)
MAX_MS = 1e9  # a duration a board reports (ms); anything longer is a lie


@dataclass(frozen=True, slots=True)
class Reply:
    fields: Mapping[str, Any]
    payload: bytes


def show(value: object) -> str:
    """A short, printable rendering of a device-sent value."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """A record of a board's reply, read field by field with its type and bounds checked; an error is an
    `AgentError` of kind bad_reply naming the record (`where`) and the field."""

    def __init__(self, record: object, where: str) -> None:
        if not isinstance(record, Mapping):
            raise AgentError(f"{where}: expected an object, got {show(record)}", kind="bad_reply")
        self.record: Mapping[str, Any] = record
        self.where = where

    def _bad(self, key: str, what: str) -> AgentError:
        return AgentError(f"{self.where} field {key!r}: {what}, got {show(self.record.get(key))}", kind="bad_reply")

    def text(self, key: str, limit: int = MAX_TEXT) -> str:
        value = self.record.get(key)
        if not isinstance(value, str) or len(value) > limit:
            raise self._bad(key, f"expected a string of at most {limit} characters")
        return value

    def optional_text(self, key: str, limit: int = MAX_TEXT) -> str | None:
        return None if self.record.get(key) is None else self.text(key, limit)

    def sha256(self, key: str) -> str:
        value = self.record.get(key)
        if not isinstance(value, str) or not SHA256.fullmatch(value):
            raise self._bad(key, "expected a sha256 (64 lowercase hex digits)")
        return value

    def integer(self, key: str, low: int = 0, high: int = 1 << 62) -> int:
        value = self.record.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self._bad(key, f"expected an integer in {low}..{high}")
        return value

    def optional_integer(self, key: str, low: int = 0, high: int = 1 << 62) -> int | None:
        return None if self.record.get(key) is None else self.integer(key, low, high)

    def optional_ms(self, key: str) -> float | None:
        """A duration in ms, or None when the board did not measure it."""
        value = self.record.get(key)
        if value is None:
            return None
        if not _is_ms(value):
            raise self._bad(key, f"expected a duration in ms (0 to below {MAX_MS:g})")
        return float(value)

    def ms_list(self, key: str, limit: int) -> tuple[float, ...]:
        """At most `limit` durations in ms (a bench item's timings)."""
        value = self.record.get(key)
        if not isinstance(value, list) or len(value) > limit or not all(_is_ms(v) for v in value):
            raise self._bad(key, f"expected a list of at most {limit} durations in ms (0 to below {MAX_MS:g})")
        return tuple(float(v) for v in value)

    def flag(self, key: str) -> bool:
        value = self.record.get(key)
        if not isinstance(value, bool):
            raise self._bad(key, "expected true or false")
        return value

    def items(self, key: str, limit: int = MAX_ITEMS) -> list[Any]:
        value = self.record.get(key)
        if not isinstance(value, list) or len(value) > limit:
            raise self._bad(key, f"expected a list of at most {limit} items")
        return value

    def nested(self, key: str) -> Fields:
        """A record within this one, read the same way (its errors name both)."""
        value = self.record.get(key)
        if not isinstance(value, Mapping):
            raise self._bad(key, "expected an object")
        return Fields(value, f"{self.where} {key}")

    def relative_path(self, key: str) -> str:
        """A plain relative path (no `..`, not absolute, normalised): the controller names files by it."""
        value = self.text(key)
        if not plain_relative(value):
            raise self._bad(key, "expected a plain relative path")
        return value


def _is_ms(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < MAX_MS


def plain_relative(path: str) -> bool:
    return bool(path) and not path.startswith("/") and "\0" not in path and posixpath.normpath(path) == path \
        and ".." not in path.split("/")


def output_sizes(result: Fields, payload_size: int) -> list[int]:
    """The byte sizes a result's `outputs` records announce, each within the reply's payload (the caller checks
    their sum against what is left of it)."""
    where = f"{result.where} output"
    return [Fields(output, where).integer("size", 0, payload_size) for output in result.items("outputs")]
