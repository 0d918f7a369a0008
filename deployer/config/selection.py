"""`--limit` and a playbook's `limit`: which devices a pattern picks, as Ansible's inventory manager picks
hosts (the grammar is in docs/inventory.md; tests/test_inventory_ansible.py checks it against ansible-core).

Ansible's rules: patterns separated by `,` (or by `:` when the whole is no host address); plain ones are
joined first, then each `&pattern` intersects and each `!pattern` removes, whatever their order; a pattern
is a host name, a group (every host it holds), a glob or a `~regex` (`re.match`) on group and host names,
with an optional subscript on what a group pattern picked (`pis[0]`, `pis[1:3]`, `pis[2:]`); `@file` reads
patterns from a file, one a line. Ours on top: `@failed` / `@passed` (and any set the command supplies) are
the devices of the last run, never a file (write `@./failed` for a file of that name); a pattern that picks
nothing is an error that names the nearest devices and groups, where Ansible only warns; the result is in
inventory order.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from deployer.config.fields import did_you_mean
from deployer.config.files import MAX_INVENTORY, read_user_file
from deployer.config.formats.model import split_address
from deployer.config.inventory import Device, Group, Inventory
from deployer.errors import InputError

NAMED_SETS = ("failed", "passed")  # always sets of the last run, never files
_SUBSCRIPT = re.compile(r"(.+)\[(?:(-?[0-9]+)|([0-9]+)([:-])([0-9]*))\]")
_COLON_SPLIT = re.compile(r"(?:[^\s:\[\]]|\[[^\]]*\])+")


def select(
    inventory: Inventory, limit: str | None, *, named_sets: Mapping[str, Sequence[str]] | None = None
) -> tuple[Device, ...]:
    """The devices a `--limit` picks, in inventory order (None: all); the grammar is in docs/inventory.md."""
    if limit is None:
        return inventory.devices
    patterns = _with_files(split_patterns(limit), named_sets or {})
    if not patterns:
        raise InputError(None, "limit", "empty limit: name devices, groups or patterns, or leave it out")
    chosen = _Matcher(inventory, named_sets).evaluate(patterns)
    picked = tuple(d for d in inventory.devices if d.name in chosen)
    if not picked:
        raise InputError(None, "limit", f"{limit!r} leaves no device")
    return picked


def split_patterns(limit: str) -> list[str]:
    """Ansible's split_host_pattern: by `,` if there is one; else by `:` unless the whole is one host address
    (`host:port`, an IPv6 address, a range `pi[1:3]`)."""
    if "," in limit:
        parts = limit.split(",")
    elif split_address(limit) is not None:
        parts = [limit]
    else:
        parts = _COLON_SPLIT.findall(limit)
    return [p.strip() for p in parts if p.strip()]


def _with_files(patterns: list[str], named_sets: Mapping[str, Sequence[str]]) -> list[str]:
    """`@file` replaced by the patterns it holds, one a line (Ansible's `--limit @file`); `@set` stays."""
    out: list[str] = []
    for pattern in patterns:
        name = pattern[1:]
        if not pattern.startswith("@") or name in NAMED_SETS or name in named_sets:
            out.append(pattern)
            continue
        if not os.path.isfile(name):
            known = ", ".join("@" + key for key in sorted(named_sets)) or "none here"
            raise InputError(None, "limit", f"unknown set {pattern!r} (known: {known}), and no file {name!r}")
        data = read_user_file(name, MAX_INVENTORY, "limit file")
        lines = (data or b"").decode("utf-8", errors="replace").split("\n")
        out.extend(line.strip() for line in lines if line.strip())
    return out


class _Matcher:
    """One evaluation of patterns against one inventory, as ansible-core's InventoryManager does it."""

    def __init__(self, inventory: Inventory, named_sets: Mapping[str, Sequence[str]] | None) -> None:
        """`named_sets`: those of the cache's last run (empty: none recorded yet); None: no cache is read."""
        self.inventory, self.named_sets, self.reads_cache = inventory, named_sets or {}, named_sets is not None
        self.hosts = [d.name for d in inventory.devices]
        self.tree = {g.name: g for g in group_tree(inventory)}

    def evaluate(self, patterns: list[str]) -> set[str]:
        plain = [p for p in patterns if p[0] not in "!&"]
        ordered = (plain or ["all"]) + [p for p in patterns if p[0] == "&"] + [p for p in patterns if p[0] == "!"]
        chosen: list[str] = []
        for pattern in ordered:
            that = [pattern] if pattern in self.hosts else self.match_one(pattern)
            if pattern[0] == "!":
                chosen = [h for h in chosen if h not in set(that)]
            elif pattern[0] == "&":
                chosen = [h for h in chosen if h in set(that)]
            else:
                chosen += [h for h in that if h not in chosen]
        return set(chosen)

    def match_one(self, pattern: str) -> list[str]:
        expr = pattern[1:] if pattern[0] in "!&" else pattern
        if not expr:
            raise InputError(None, "limit", "'!' or '&' needs a pattern after it")
        if expr.startswith("@"):
            return self.named_set(expr)
        base, subscript = _split_subscript(expr)
        hosts = self.enumerate(base)
        if hosts and subscript is not None:
            start, end = subscript
            if end:
                hosts = hosts[start : (len(hosts) - 1 if end == -1 else end) + 1]
            elif -len(hosts) <= start < len(hosts):
                hosts = [hosts[start]]
            else:
                problem = f"{expr!r}: {base!r} picks {len(hosts)} device(s), so there is no [{start}]"
                raise InputError(None, "limit", problem)
        if not hosts:
            raise self.nothing(expr, base)
        return hosts

    def enumerate(self, pattern: str) -> list[str]:
        matches = self.matcher(pattern)
        groups = [name for name in self.tree if matches(name)]
        results = [host for name in groups for host in self.group_hosts(name)]
        if not groups or pattern[0] == "~" or any(c in pattern for c in ".?*["):
            results += [host for host in self.hosts if matches(host)]
        return results

    def matcher(self, pattern: str) -> Callable[[str], bool]:
        if pattern[0] != "~":
            return lambda name: fnmatch.fnmatchcase(name, pattern)
        try:
            regex = re.compile(pattern[1:])
            return lambda name: regex.match(name) is not None
        except re.error as exc:
            raise InputError(None, "limit", f"{pattern!r}: not a regular expression ({exc})") from None

    def group_hosts(self, name: str) -> list[str]:
        """A group's hosts in Ansible's order: its own, then its children's, level by level."""
        ordered, level, seen = [name], list(self.tree[name].children), {name}
        while level:
            ordered += level
            seen.update(level)
            level = [c for g in level for c in self.tree[g].children if c not in seen]
        hosts: dict[str, None] = {}
        for group in ordered:
            hosts.update(dict.fromkeys(self.tree[group].members))
        return list(hosts)

    def named_set(self, pattern: str) -> list[str]:
        name = pattern[1:]
        if not self.reads_cache:
            raise InputError(None, "limit", f"{pattern!r} names devices of a cache's last run: this command "
                                            f"reads no cache (push, collect, rollback and cache install do)")
        if name not in self.named_sets:
            known = ", ".join("@" + key for key in sorted(self.named_sets)) or "none: no run on this cache yet"
            raise InputError(None, "limit", f"unknown set {pattern!r} (known: {known})")
        wanted = set(self.named_sets[name])
        picked = [host for host in self.hosts if host in wanted]
        if not picked:
            raise InputError(None, "limit", f"{pattern!r} holds no device of this inventory")
        return picked

    def nothing(self, pattern: str, base: str) -> InputError:
        matches = self.matcher(base)
        empty = [name for name in self.tree if matches(name)]
        if empty:
            problem = f"{pattern!r} matches only groups that hold no device ({_listing(empty)})"
            return InputError(None, "limit", problem)
        groups = [name for name in self.inventory.groups]
        known = f"devices: {_listing(self.hosts)}; groups: {_listing(groups)}"
        hint = did_you_mean(pattern, [*self.hosts, *groups])
        return InputError(None, "limit", f"{pattern!r} matches no device or group{hint} ({known})")


def _split_subscript(pattern: str) -> tuple[str, tuple[int, int | None] | None]:
    """`pis[1]` -> ("pis", (1, None)); `pis[1:3]` -> ("pis", (1, 3)); `pis[2:]` -> ("pis", (2, -1))."""
    if pattern[0] == "~":
        return pattern, None
    match = _SUBSCRIPT.fullmatch(pattern)
    if match is None:
        return pattern, None
    base, index, start, _, end = match.groups()
    if index:
        return base, (int(index), None)
    return base, (int(start), int(end) if end else -1)


def group_tree(inventory: Inventory) -> list[Group]:
    """Every group as Ansible holds them, `all` first: an Ansible inventory's as read; for our YAML, `all` over
    `ungrouped` (the devices in no group) and the top groups."""
    if inventory.tree:
        return list(inventory.tree)
    held = {d for g in inventory.groups.values() for d in g.devices}
    children = {c for g in inventory.groups.values() for c in g.children}
    top = [name for name in inventory.groups if name not in children]
    extra: list[Group] = []
    if "ungrouped" not in inventory.groups:
        loose = tuple(d.name for d in inventory.devices if d.name not in held)
        extra.append(Group("ungrouped", loose, (), loose, {}, inventory.devices[0].where))
        top.insert(0, "ungrouped")
    names = tuple(d.name for d in inventory.devices)
    root = Group("all", (), tuple(top), names, {}, inventory.devices[0].where)
    return [root, *extra, *inventory.groups.values()]


def _listing(names: Iterable[str], most: int = 10) -> str:
    shown = list(names)
    if not shown:
        return "none"
    return ", ".join(shown[:most]) + (", ..." if len(shown) > most else "")
