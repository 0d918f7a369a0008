"""A board's fingerprint read as untrusted (docs/design.md, section 4).

Its `id` names the local cache's groups, export tarballs and the history's comparable runs, so it is
checked, not believed: the controller recomputes it from the platform and device it describes, as the
agent does, and every string is made printable before anything keeps it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from deployer.errors import AgentError
from deployer.protocol.reply import Fields
from deployer.text import visible

MAX_TEXT = 512


def fingerprint_id(platform_name: str, platform_version: str, device_name: str, driver_version: str) -> str:
    """The agent's `fingerprint_of` id: 16 hex digits of the sha256 of the four strings."""
    ident = "|".join([platform_name, platform_version, device_name, driver_version])
    return hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def parse_fingerprint(raw: Any) -> dict[str, Any]:
    """The fingerprint a board sent, checked (`AgentError`, kind `bad_reply`) and made printable."""
    fields = Fields(raw, "fingerprint")
    platform, device = fields.nested("platform"), fields.nested("device")
    names = [platform.text("name"), platform.text("version"), device.text("name"), device.text("driver_version")]
    fields.flag("cpu_only")
    sent = fields.text("id")
    expected = fingerprint_id(*names)
    if sent != expected:
        raise AgentError(f"the device's fingerprint id {visible(repr(sent), 40)} is not the hash of the platform "
                         f"and device it describes ({expected})", kind="bad_reply")
    clean: dict[str, Any] = _printable_tree(raw)
    return clean


def _printable_tree(value: Any, depth: int = 0) -> Any:
    """A device-sent JSON tree with every string made printable and bounded."""
    if depth > 4:
        return None
    if isinstance(value, str):
        return visible(value, MAX_TEXT)
    if isinstance(value, list):
        return [_printable_tree(v, depth + 1) for v in value[:512]]
    if isinstance(value, Mapping):
        return {visible(str(k), 64): _printable_tree(v, depth + 1) for k, v in list(value.items())[:64]}
    return value
