"""An Ansible inventory in INI form, read as ansible-core's `ini` plugin reads it: `[group]` sections of host
lines (`name[:port] k=v ...`, ranges expanded), `[group:children]` and `[group:vars]`, `#` and `;` comments.
Values are Python literals where they parse as one (`2222`, `True`, `['a']`), else text, in host lines and in
`:vars` alike. Where Ansible warns or guesses (a section that never closes, a reversed range) we stop with
file:line instead.
"""

from __future__ import annotations

import ast
import re
import shlex
import warnings

from deployer.config.formats.ansible_data import UNGROUPED, AnsibleData, Value, node_of
from deployer.config.formats.model import RangeError, expand_range, split_address
from deployer.errors import InventoryError, Where

_SECTION = re.compile(r"\[([^:\]\s]+)(?::(\w+))?\]\s*(?:#.*)?")
_GROUP_NAME = re.compile(r"([^:\]\s]+)\s*(?:#.*)?")


def looks_like_ini(text: str) -> bool:
    """A section header on a line of its own: what tells INI from YAML at a glance."""
    return any(_SECTION.fullmatch(line.strip()) for line in text.splitlines())


def parse_ini(text: str, file: str, data: AnsibleData) -> None:
    """Add the INI inventory `text` (read from `file`) to `data`; raises InventoryError with file:line."""
    group, state = UNGROUPED, "hosts"
    pending: dict[str, tuple[str, Where, list[str]]] = {}  # group -> (state, where, parents) not yet declared
    for number, raw in enumerate(text.splitlines(), start=1):
        where = Where(file, number)
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and (_SECTION.fullmatch(line) or line.endswith("]")):
            group, state = _section(line, where, data, pending)
            continue
        if line.startswith("[") and "]" not in line:
            raise InventoryError(where, None, f"section header {line[:60]!r} never closes: expected ']'")
        if state == "hosts":
            _host_line(line, where, group, data)
        elif state == "vars":
            key, equals, value = line.partition("=")
            if not equals or not key.strip():
                raise InventoryError(where, None, f"[{group}:vars]: expected key=value (got {line[:60]!r})")
            data.set_group_var(group, key.strip(), _value(value.strip(), where))
        else:
            match = _GROUP_NAME.fullmatch(line)
            if match is None:
                raise InventoryError(where, None, f"[{group}:children]: expected a group name (got {line[:60]!r})")
            child = match.group(1)
            if child in data.groups:
                data.add_child(group, child)
            elif child in pending:
                pending[child][2].append(group)
            else:
                pending[child] = ("children", where, [group])
    for name, (kind, where, parents) in pending.items():
        if kind == "vars":
            raise InventoryError(where, None, f"[{name}:vars] is for a group that is never declared")
        raise InventoryError(where, None, f"[{parents[-1]}:children] names {name!r}, a group that is never declared")


def _section(line: str, where: Where, data: AnsibleData, pending: dict[str, tuple[str, Where, list[str]]]
             ) -> tuple[str, str]:
    match = _SECTION.fullmatch(line)
    if match is None:
        raise InventoryError(where, None, f"invalid section header {line[:60]!r}: expected [group], "
                                          "[group:children] or [group:vars], no spaces")
    name, state = match.group(1), match.group(2) or "hosts"
    if state not in ("hosts", "children", "vars"):
        raise InventoryError(where, None, f"section [{name}:{state}]: unknown kind {state!r} "
                                          "(expected children or vars)")
    if name not in data.groups:
        if state == "vars" and name not in pending:
            pending[name] = ("vars", where, [])
        data.add_group(name, where)
    if name in pending and state != "vars":
        _declare(name, data, pending)
    return name, state


def _declare(name: str, data: AnsibleData, pending: dict[str, tuple[str, Where, list[str]]]) -> None:
    kind, _, parents = pending.pop(name)
    if kind == "children":
        for parent in parents:
            data.add_child(parent, name)


def _host_line(line: str, where: Where, group: str, data: AnsibleData) -> None:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as exc:
        raise InventoryError(where, None, f"cannot read this host line: {exc} (got {line[:60]!r})") from None
    if not tokens:
        return
    pattern = tokens[0]
    if pattern.strip() == "---":
        raise InventoryError(where, None, "'---' in an INI inventory: is this YAML? (try --fleet-format)")
    address = split_address(pattern)
    name, port = address if address is not None else (pattern, None)
    if pattern.endswith(":") and port is None:
        raise InventoryError(where, None, f"host {pattern!r}: a ':' must be followed by a port")
    try:
        names = expand_range(name)
    except RangeError as exc:
        raise InventoryError(where, None, f"host range {name!r}: {exc}") from None
    values: dict[str, Value] = {}
    for token in tokens[1:]:
        key, equals, value = token.partition("=")
        if not equals or not key:
            raise InventoryError(where, None, f"host {names[0]!r}: host var {token!r} needs key=value")
        values[key] = _value(value, where)
    for host in names:
        entry = data.add_host(host, group, where, port)
        entry.vars.update(values)


def _value(text: str, where: Where) -> Value:
    """A Python literal where the text is one (as Ansible's ast.literal_eval), else the text itself."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            value: object = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text
    if value is ... or isinstance(value, (complex, bytes)):
        value = text
    return Value(node_of(value, where), where)
