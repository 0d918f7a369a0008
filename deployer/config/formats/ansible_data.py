"""Ansible's inventory data as its INI and YAML parsers build it: groups (with `all` and `ungrouped`),
hosts, children and vars, each var kept as a line-tracked YAML node so that our field parsers check it and
name its file:line. Mirrors ansible-core's InventoryData where the outcome is visible (group order, depth,
priority, `ungrouped`), so that selection and vars come out as Ansible's do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from deployer.config.yamlnodes import TAG
from deployer.errors import InventoryError, Where

ALL, UNGROUPED = "all", "ungrouped"


@dataclass(frozen=True, slots=True)
class Value:
    node: Node  # the YAML node (read, or made from an INI value) with its line
    where: Where


@dataclass
class RawGroup:
    name: str
    where: Where
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    vars: dict[str, Value] = field(default_factory=dict)
    depth: int = 0
    priority: int = 1


@dataclass
class RawHost:
    name: str
    where: Where
    vars: dict[str, Value] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)  # direct groups


@dataclass
class AnsibleData:
    """One Ansible inventory (every file of a folder adds to the same data)."""

    groups: dict[str, RawGroup] = field(default_factory=dict)
    hosts: dict[str, RawHost] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.add_group(ALL, Where("<builtin>"))
        self.add_group(UNGROUPED, Where("<builtin>"))
        self.add_child(ALL, UNGROUPED)

    def add_group(self, name: str, where: Where) -> RawGroup:
        if name not in self.groups:
            self.groups[name] = RawGroup(name, where)
        return self.groups[name]

    def add_host(self, name: str, group: str, where: Where, port: int | None = None) -> RawHost:
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = RawHost(name, where)
        if group not in host.groups:
            host.groups.append(group)
            self.groups[group].hosts.append(name)
        if port is not None:
            host.vars["ansible_port"] = Value(node_of(port, where), where)
        return host

    def add_child(self, parent: str, child: str) -> None:
        group, kid = self.groups[parent], self.groups[child]
        if child not in group.children:
            group.children.append(child)
            kid.parents.append(parent)
            self._deepen(kid, group.depth + 1, 0)

    def _deepen(self, group: RawGroup, depth: int, hops: int) -> None:
        if hops > len(self.groups):
            raise InventoryError(group.where, None, f"group cycle through {group.name!r}")
        if depth > group.depth:
            group.depth = depth
            for child in group.children:
                self._deepen(self.groups[child], depth + 1, hops + 1)

    def set_group_var(self, group: str, key: str, value: Value) -> None:
        if key == "ansible_group_priority":
            node = value.node
            text = str(node.value) if isinstance(node, ScalarNode) else ""
            if not text.lstrip("-").isdigit():
                raise InventoryError(value.where, key, f"group {group!r}: expected an integer (got {text!r})")
            self.groups[group].priority = int(text)
        else:
            self.groups[group].vars[key] = value

    def reconcile(self) -> None:
        """Groups no one holds become children of `all`; a host in no group but `all` joins `ungrouped`, one
        in another group leaves it (as Ansible's reconcile_inventory)."""
        for group in list(self.groups.values()):
            if group.name != ALL and not group.parents:
                self.add_child(ALL, group.name)
        ungrouped = self.groups[UNGROUPED]
        for host in self.hosts.values():
            others = [g for g in self.ancestors(host) if g not in (ALL, UNGROUPED)]
            if UNGROUPED in host.groups and others:
                host.groups.remove(UNGROUPED)
                ungrouped.hosts.remove(host.name)
            elif not others and UNGROUPED not in host.groups:
                self.add_host(host.name, UNGROUPED, host.where)

    def ancestors(self, host: RawHost) -> list[str]:
        """Every group holding `host`, directly or through children."""
        seen: dict[str, None] = {}
        todo = list(host.groups)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen[name] = None
                todo.extend(self.groups[name].parents)
        return list(seen)


def node_of(value: object, where: Where) -> Node:
    """A YAML node for a value read from an INI file, marked with its line so that errors name it."""
    mark = Mark(where.file, 0, max(where.line - 1, 0), 0, None, None)  # type: ignore[arg-type]  # no buffer
    if isinstance(value, dict):
        pairs = [(node_of(str(k), where), node_of(v, where)) for k, v in value.items()]
        return MappingNode(TAG + "map", pairs, mark, mark)
    if isinstance(value, (list, tuple, set)):
        return SequenceNode(TAG + "seq", [node_of(v, where) for v in value], mark, mark)
    if value is None:
        return ScalarNode(TAG + "null", "", mark, mark)
    if isinstance(value, bool):
        return ScalarNode(TAG + "bool", "true" if value else "false", mark, mark)
    if isinstance(value, int):
        return ScalarNode(TAG + "int", str(value), mark, mark)
    if isinstance(value, float):
        text = repr(value) if math.isfinite(value) else {"inf": ".inf", "-inf": "-.inf"}.get(repr(value), ".nan")
        return ScalarNode(TAG + "float", text, mark, mark)
    return ScalarNode(TAG + "str", str(value), mark, mark)
