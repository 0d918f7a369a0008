"""`--limit`: which devices of an inventory a pattern list picks (the grammar is in docs/inventory.md).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence

from deployer.config.fields import ALL, did_you_mean
from deployer.config.inventory import Device, Inventory
from deployer.errors import InputError


def select(
    inventory: Inventory, limit: str | None, *, named_sets: Mapping[str, Sequence[str]] | None = None
) -> tuple[Device, ...]:
    """The devices a `--limit` picks, in inventory order (None: all); the grammar is in docs/inventory.md."""
    if limit is None:
        return inventory.devices
    patterns = [p.strip() for p in re.split(r"[,:]", limit) if p.strip()]
    if not patterns:
        raise InputError(None, "limit", "empty limit: name devices, groups or patterns, or leave it out")
    plus = [p for p in patterns if not p.startswith(("!", "&"))]
    chosen: set[str] = set() if plus else _names(inventory)
    for pattern in plus:
        chosen |= _match(inventory, pattern, named_sets)
    for pattern in patterns:
        if pattern.startswith("&"):
            chosen &= _match(inventory, pattern[1:], named_sets)
        elif pattern.startswith("!"):
            chosen -= _match(inventory, pattern[1:], named_sets)
    picked = tuple(d for d in inventory.devices if d.name in chosen)
    if not picked:
        raise InputError(None, "limit", f"{limit!r} leaves no device")
    return picked


def _names(inventory: Inventory) -> set[str]:
    return {device.name for device in inventory.devices}


def _match(inventory: Inventory, pattern: str, named_sets: Mapping[str, Sequence[str]] | None) -> set[str]:
    """Device names one --limit pattern picks; a pattern that picks none is an error (a typo, surely)."""
    if not pattern:
        raise InputError(None, "limit", "'!' or '&' needs a pattern after it")
    if pattern.startswith("@"):
        return _named_set(inventory, pattern, named_sets)
    if pattern in ALL:
        return _names(inventory)
    names = _names(inventory)
    if pattern in names:
        return {pattern}
    if pattern in inventory.groups:
        return set(inventory.groups[pattern].devices)
    picked: set[str] = set()
    if any(char in pattern for char in "*?["):  # a glob, on device names and group names
        picked = {name for name in names if fnmatch.fnmatchcase(name, pattern)}
        for group in inventory.groups.values():
            if fnmatch.fnmatchcase(group.name, pattern):
                picked.update(group.devices)
    if not picked:
        devices = _listing(d.name for d in inventory.devices)
        known = f"devices: {devices}; groups: {_listing(inventory.groups)}"
        hint = did_you_mean(pattern, names | set(inventory.groups))
        raise InputError(None, "limit", f"{pattern!r} matches no device or group{hint} ({known})")
    return picked


def _named_set(inventory: Inventory, pattern: str, named_sets: Mapping[str, Sequence[str]] | None) -> set[str]:
    """`named_sets`: those of the cache's last run (empty: none recorded yet); None: the command reads no cache."""
    name = pattern[1:]
    if named_sets is None:
        raise InputError(None, "limit", f"{pattern!r} names devices of a cache's last run: this command "
                                        f"reads no cache (push, collect, rollback and cache install do)")
    if name not in named_sets:
        known = ", ".join("@" + key for key in sorted(named_sets)) or "none: no run on this cache yet"
        raise InputError(None, "limit", f"unknown set {pattern!r} (known: {known})")
    picked = set(named_sets[name]) & _names(inventory)
    if not picked:
        raise InputError(None, "limit", f"{pattern!r} holds no device of this inventory")
    return picked


def _listing(names: Iterable[str], most: int = 10) -> str:
    shown = list(names)
    if not shown:
        return "none"
    return ", ".join(shown[:most]) + (", ..." if len(shown) > most else "")
