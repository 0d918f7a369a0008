"""A reply from a device, read as untrusted: typed field access, and device-sent text made safe to show."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deployer.errors import AgentError


@dataclass(frozen=True, slots=True)
class Reply:
    fields: Mapping[str, Any]
    payload: bytes

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        """A field of the expected type, or an `AgentError` naming it."""
        value = self.fields.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            raise AgentError(f"agent reply field {key!r}: expected {_type_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise AgentError(f"agent reply field {key!r}: expected {_type_name(kind)}, got {show(value)}")
        return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def show(value: object) -> str:
    """A short, printable rendering of a device-sent value."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    """`Reply.get` for nested records of a reply."""
    if not isinstance(record, Mapping):
        raise AgentError(f"agent reply: expected an object around {key!r}, got {show(record)}")
    return Reply(record, b"").get(key, kind, optional=optional)
