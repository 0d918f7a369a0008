"""The model every inventory format produces, and the host-pattern helpers the Ansible formats share.

A format reads its files into `FleetSpec`: hosts in declaration order, each with our device fields already
parsed (`fields`, as the YAML inventory's entries hold them), its free `vars` and where each field came from;
groups in declaration order with their direct hosts and children, and the order their vars apply in.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deployer.config.fields import ALL, NAME
from deployer.errors import InventoryError, Where


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    where: Where  # where the host is first declared
    fields: Mapping[str, Any]  # our device fields, parsed; `host` always set
    vars: Mapping[str, object]  # the free vars (neither ansible_* we map nor deploy_*)
    origins: Mapping[str, str]  # field -> where its value came from ("file:line")


@dataclass(frozen=True, slots=True)
class GroupSpec:
    name: str
    where: Where
    hosts: tuple[str, ...]  # direct members, in the order they were added
    children: tuple[str, ...]  # in the order they were added
    vars: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What a format read. `groups` are in declaration order, `all` and `ungrouped` first (as Ansible keeps
    them; selection patterns depend on it); `vars_order` is the order their vars apply in (depth, priority,
    name), without `all`."""

    file: str
    hosts: tuple[HostSpec, ...]
    groups: tuple[GroupSpec, ...]
    vars_order: tuple[str, ...]
    ssh_config: str | None  # the ssh config to resolve aliases with; None: none


def check_spec_name(name: str, where: Where, kind: str) -> None:
    """A host or group name must be a device name (it becomes a cache folder and a group_vars/ path)."""
    if name in ALL or not NAME.fullmatch(name):
        rule = "up to 255 letters, digits, '.', '_', '-', starting with a letter or digit; 'all' is reserved"
        raise InventoryError(where, None, f"{kind} name {name!r} cannot be a device name here: {rule}")


class RangeError(ValueError):
    """A host range that cannot be expanded (the message says why)."""


MAX_RANGE_HOSTS = 10_000  # names one host line may expand to: a fleet, not a typo's billion


_LABEL_RANGE = r"\[(?:[a-z]:[a-z]|[0-9]+:[0-9]+)(?::[0-9]+)?\]"
_LABEL = rf"(?:\w|{_LABEL_RANGE})(?:[\w_-]|{_LABEL_RANGE})*(?<![_-])"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.I | re.UNICODE)
_BRACKETED_PORT = re.compile(r"\[(.+)\]:([0-9]+)")
_HOST_PORT = re.compile(r"((?:[^:\[\]]|\[[^\]]*\])*):([0-9]+)")


def split_address(text: str) -> tuple[str, int | None] | None:
    """(host, port) of `host`, `host:port` or `[host]:port` (ranges allowed in the host), as Ansible reads a
    host line; None when `text` is no host name or address."""
    port = None
    for pattern in (_BRACKETED_PORT, _HOST_PORT):
        match = pattern.fullmatch(text)
        if match:
            text, port = match.group(1), int(match.group(2))
    if _HOSTNAME.fullmatch(text) or _is_ip(text):
        return text, port
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(re.fullmatch(r"[0-9\[\]:.]+", text) and "[" in text)  # an IPv4 address with a range
    return True


def expand_range(pattern: str) -> list[str]:
    """Host names of `pi[01:20].lab`, `node-[a:f]`, `x[0:9:3]` (several ranges multiply); raises RangeError."""
    names = _expand(pattern)
    if len(names) > MAX_RANGE_HOSTS:
        raise RangeError(f"expands to {len(names)} hosts, over the limit of {MAX_RANGE_HOSTS}")
    return names


def _expand(pattern: str) -> list[str]:
    if "[" not in pattern:
        return [pattern]
    head, bracket, rest = pattern.partition("[")
    inner, closing, tail = rest.partition("]")
    if not closing:
        raise RangeError(f"'[' without ']' in {pattern!r}")
    bounds = inner.split(":")
    if len(bounds) not in (2, 3):
        raise RangeError(f"a host range is [begin:end] or [begin:end:step] (got [{inner}])")
    begin, end = bounds[0] or "0", bounds[1]
    step_text = bounds[2] if len(bounds) == 3 else "1"
    if not end:
        raise RangeError(f"the range [{inner}] has no end")
    if not step_text.isdigit() or int(step_text) < 1:
        raise RangeError(f"the step of [{inner}] must be a whole number >= 1")
    step = int(step_text)
    letters = string.ascii_letters
    if len(begin) == 1 and len(end) == 1 and begin in letters and end in letters:
        if letters.index(begin) > letters.index(end):
            raise RangeError(f"the range [{inner}] ends before it begins")
        items = list(letters[letters.index(begin) : letters.index(end) + 1 : step])
    elif begin.isdigit() and end.isdigit():
        width = len(begin) if begin.startswith("0") and len(begin) > 1 else 0
        if width and len(end) != width:
            raise RangeError(f"the range [{inner}] needs begin and end of equal width ({begin!r}, {end!r})")
        if int(begin) > int(end):
            raise RangeError(f"the range [{inner}] ends before it begins")
        if (int(end) - int(begin)) // step >= MAX_RANGE_HOSTS:
            raise RangeError(f"the range [{inner}] expands to over {MAX_RANGE_HOSTS} hosts")
        items = [str(n).zfill(width) for n in range(int(begin), int(end) + 1, step)]
    else:
        raise RangeError(f"a host range is of numbers or of single letters (got [{inner}])")
    names = []
    for item in items:
        names += _expand(head + item + tail)
        if len(names) > MAX_RANGE_HOSTS:
            raise RangeError(f"expands to over {MAX_RANGE_HOSTS} hosts")
    return names
