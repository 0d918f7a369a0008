"""The inventory: a YAML file of devices and groups -> frozen `Device` records that remember their file:line.

Pure: it reads the inventory and the ssh config it names, nothing else (no Paramiko, no network). The format,
the precedence rules and the `--limit` grammar are in docs/inventory.md. Every problem is an `InventoryError`
naming file:line, the device and the field; the schema is closed, so a misspelt key is an error, not a no-op.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from deployer import sshconfig
from deployer.errors import InputError, InventoryError, Where
from deployer.sshconfig import JumpHost

__all__ = [
    "DEVICE_TYPES", "HOST_KEY_CHECKING", "LOCAL_HOST", "Device", "Group", "Inventory", "OpenCLSelection",
    "JumpHost", "SshOptions", "Timeouts", "describe", "load_inventory", "override", "parse_inventory", "select",
]  # fmt: skip

DEVICE_TYPES = ("gpu", "cpu", "accelerator", "any")
MAX_CONNECT_RETRIES = 10
MAX_JUMPS = 8  # ProxyJump hops, the jump hosts' own ProxyJump included
HOST_KEY_CHECKING = ("strict", "accept-new")
LOCAL_HOST = "local"  # `host: local` runs on the controller itself
ALL = ("all", "*")  # --limit patterns meaning every device; `all` is no device or group name

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")  # a device name becomes a folder name
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # what PyYAML counts as a line break
_MAX_DEPTH = 64
_TAG = "tag:yaml.org,2002:"
_STR_TAGS = frozenset({_TAG + "str", _TAG + "timestamp", _TAG + "value"})  # dates stay text, as written
_PLAIN_TAGS = _STR_TAGS | {_TAG + t for t in ("null", "bool", "int", "float", "seq", "map", "merge")}
_CONSTRUCTOR = SafeConstructor()

Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class OpenCLSelection:
    platform: int | str | None = None  # index, or case-insensitive substring of the platform name
    device: int | str | None = None  # index, or substring of the device name
    device_type: str = "any"  # one of DEVICE_TYPES

    def as_request(self) -> dict[str, int | str | None]:
        """The `opencl` field of the agent's fingerprint, build and smoke requests."""
        return {"platform": self.platform, "device": self.device, "device_type": self.device_type}


@dataclass(frozen=True, slots=True)
class SshOptions:
    known_hosts: str
    host_key_checking: str  # one of HOST_KEY_CHECKING
    options: Mapping[str, str]
    agent: bool = True  # also offer the keys of the SSH agent at SSH_AUTH_SOCK, when one is running


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float  # seconds
    command: float
    device: float | None = None  # the whole run of one device; None: no limit


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    host: str  # address to connect to: the ssh config's HostName when `host` is an alias
    port: int
    user: str
    identity_file: str | None  # None: the SSH agent and default keys
    python: str
    remote_dir: str  # as written; `~` is expanded on the device
    opencl: OpenCLSelection
    ssh: SshOptions
    timeouts: Timeouts
    env: Mapping[str, str] = field(repr=False)  # may hold tokens: kept out of repr
    labels: Mapping[str, str]
    vars: Mapping[str, object]
    groups: tuple[str, ...]  # every group holding it, directly or through children, in vars order
    where: Where
    proxy_jump: str | None  # as written; `jumps` is what it resolved to
    is_local: bool
    connect_retries: int = 2  # further connect attempts after a transient failure (refused, reset, timeout)
    jumps: tuple[JumpHost, ...] = ()  # the ProxyJump hops, first reached first


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    members: tuple[str, ...]  # devices listed under `members`
    children: tuple[str, ...]
    devices: tuple[str, ...]  # members and the devices of all children, in inventory order
    vars: Mapping[str, object]
    where: Where


@dataclass(frozen=True, slots=True)
class Inventory:
    path: str
    devices: tuple[Device, ...]
    groups: Mapping[str, Group]  # in vars order: by depth, then name


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read and check the inventory at `path`; raises `InventoryError` and nothing else."""
    file = os.fspath(path)
    try:
        data = Path(file).read_bytes()
    except FileNotFoundError:
        raise InventoryError(Where(file), None, "no such file") from None
    except OSError as exc:
        raise InventoryError(Where(file), None, f"cannot read ({exc.strerror or exc})") from exc
    return parse_inventory(data, file)


def parse_inventory(source: str | bytes, path: str | os.PathLike[str] = "<inventory>") -> Inventory:
    """Check inventory text; `path` names it in messages and anchors relative paths in it."""
    file = os.fspath(path)
    ctx = _Ctx(_Doc(file, os.path.abspath(os.path.dirname(file))))
    text = source if isinstance(source, str) else _decode(source, file)
    root = _compose(text, file)
    if root is None:
        raise InventoryError(Where(file, 1), None, "empty inventory: expected a mapping with 'devices'")
    if not isinstance(root, MappingNode):
        raise ctx.error(root, f"the top level must be a mapping with 'devices' (got {_shown(root)})")
    top = _fields(root, ctx, _TOP)
    if "devices" not in top:
        raise ctx.sub("devices").error(root, "missing: list the devices")
    defaults: dict[str, object] = top.get("defaults", {})
    entries: list[_Entry] = top["devices"]
    groups = _groups(top.get("groups"), ctx.sub("groups"), {e.name: e for e in entries})
    config = _ssh_config(root, top, ctx) if any(e.host != LOCAL_HOST for e in entries) else None
    devices = _with_jumps(tuple(_device(e, defaults, groups, config) for e in entries), config)
    return Inventory(file, devices, MappingProxyType(groups))


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


def describe(device: Device) -> dict[str, object]:
    """A JSON-able view of a device, in record order; `env` values are masked (they may hold tokens)."""
    view = cast(dict[str, object], _plain(device))
    view["env"] = {key: "***" for key in device.env}
    return view


# --- reading YAML into nodes ----------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Composes nodes (with line marks), refusing nesting deeper than PyYAML's recursive composer can take."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                mark = self.current_event.start_mark  # the event of this node, peeked by the caller
                raise yaml.MarkedYAMLError(problem=f"nested over {_MAX_DEPTH} levels deep", problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _decode(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = _line_at(data[: exc.start].decode("utf-8", errors="replace"), exc.start)
        raise InventoryError(Where(file, line), None, f"not UTF-8 text (byte {exc.start})") from None


def _compose(text: str, file: str) -> Node | None:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # checks every character first
        return loader.get_single_node()
    except ReaderError as exc:
        where = Where(file, _line_at(text, int(exc.position)))
        raise InventoryError(where, None, f"character {exc.character!r} is not allowed in YAML") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = "; ".join(p for p in (exc.context, exc.problem) if p) or "not valid YAML"
        where = Where(file, mark.line + 1 if mark else 1)
        raise InventoryError(where, None, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:  # PyYAML raises only marked errors past the reader; kept as a net
        raise InventoryError(Where(file, 1), None, f"invalid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _line_at(text: str, index: int) -> int:
    return len(_BREAK.findall(text, 0, index)) + 1


@dataclass(frozen=True, slots=True)
class _Doc:
    file: str
    base_dir: str  # relative paths in the inventory start here
    pairs: dict[int, dict[str, tuple[Node, Node]]] = field(default_factory=dict)  # by id(node): aliases
    frozen: dict[int, tuple[object, int]] = field(default_factory=dict)  # nodes are shared: work stays linear


@dataclass(frozen=True, slots=True)
class _Ctx:
    """Where a node sits: the document, the dotted field name and the device, for messages."""

    doc: _Doc
    field: str = ""
    device: str | None = None

    def sub(self, name: str) -> _Ctx:
        return _Ctx(self.doc, f"{self.field}.{name}" if self.field else name, self.device)

    def error(self, node: Node, problem: str) -> InventoryError:
        where = Where(self.doc.file, _line(node))
        return InventoryError(where, self.field or None, problem, device=self.device)


def _line(node: Node) -> int:
    return node.start_mark.line + 1 if node.start_mark is not None else 1


def _shown(node: Node) -> str:
    if node.tag not in _PLAIN_TAGS:
        return f"a value tagged {node.tag}"
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    text = str(node.value)
    if node.tag == _TAG + "null":
        return "nothing" if not text else text
    short = text if len(text) <= 40 else text[:37] + "..."
    return repr(short) if node.tag in _STR_TAGS else short


def _pairs(node: Node, ctx: _Ctx, depth: int = 0) -> dict[str, tuple[Node, Node]]:
    """A mapping's entries by key, YAML merge keys (`<<`) applied; a duplicate key is an error."""
    if id(node) in ctx.doc.pairs:
        return ctx.doc.pairs[id(node)]
    if depth > _MAX_DEPTH:
        raise ctx.error(node, "merge keys nested too deep (a recursive alias?)")
    if not isinstance(node, MappingNode) or node.tag != _TAG + "map":
        raise ctx.error(node, f"expected a mapping (got {_shown(node)})")
    own: dict[str, tuple[Node, Node]] = {}
    merged: dict[str, tuple[Node, Node]] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _TAG + "merge":
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                for key, pair in _pairs(source, ctx, depth + 1).items():
                    merged.setdefault(key, pair)  # the first mapping merged wins, as YAML says
            continue
        if not isinstance(key_node, ScalarNode):
            raise ctx.error(key_node, f"a key must be plain text (got {_shown(key_node)})")
        key = str(key_node.value)
        if key in own:
            raise ctx.sub(key).error(key_node, f"duplicate key (first at line {_line(own[key][0])})")
        own[key] = (key_node, value_node)
    result = own | {key: pair for key, pair in merged.items() if key not in own}
    ctx.doc.pairs[id(node)] = result
    return result


def _mapping(node: Node, ctx: _Ctx) -> dict[str, tuple[Node, Node]]:
    """Like `_pairs`, with an empty value (`key:` and nothing) read as an empty mapping."""
    return {} if _is_null(node) else _pairs(node, ctx)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + "null"


def _scalar(node: Node, ctx: _Ctx) -> Scalar:
    if not isinstance(node, ScalarNode):
        raise ctx.error(node, f"expected a single value (got {_shown(node)})")
    tag = node.tag
    if tag in _STR_TAGS:
        return str(node.value)
    if tag == _TAG + "null":
        return None
    try:  # an explicit tag (`!!int abc`) can hold text its constructor rejects
        if tag == _TAG + "bool":
            return SafeConstructor.bool_values[str(node.value).lower()]
        if tag == _TAG + "int":
            return _CONSTRUCTOR.construct_yaml_int(node)
        if tag == _TAG + "float":
            return _CONSTRUCTOR.construct_yaml_float(node)
    except (KeyError, ValueError, IndexError):
        raise ctx.error(node, f"{_shown(node)} is not a valid {tag.rsplit(':', 1)[-1]}") from None
    raise ctx.error(node, f"unsupported YAML tag {tag!r}: write plain text, a number, a list or a mapping")


def _freeze(node: Node, ctx: _Ctx, depth: int = 0) -> tuple[object, int]:
    """A free value (`vars`) made immutable (mappings -> MappingProxyType, lists -> tuples), and its height.

    Shared nodes (aliases) are frozen once; the height bounds the nesting they can build, which `describe`
    and JSON walk recursively.
    """
    if id(node) in ctx.doc.frozen:
        return ctx.doc.frozen[id(node)]
    if depth > _MAX_DEPTH:
        raise ctx.error(node, f"nested over {_MAX_DEPTH} levels deep (a recursive alias?)")
    value: object
    if isinstance(node, SequenceNode) and node.tag == _TAG + "seq":
        items = [_freeze(item, ctx, depth + 1) for item in node.value]
        value = tuple(item for item, _ in items)
    elif isinstance(node, (MappingNode, SequenceNode)):
        pairs = {key: _freeze(v, ctx.sub(key), depth + 1) for key, (_, v) in _pairs(node, ctx, depth).items()}
        items = list(pairs.values())
        value = MappingProxyType({key: item for key, (item, _) in pairs.items()})
    else:
        items, value = [], _scalar(node, ctx)
    height = 1 + max((h for _, h in items), default=0)
    if height > _MAX_DEPTH:
        raise ctx.error(node, f"nested over {_MAX_DEPTH} levels deep (through aliases)")
    ctx.doc.frozen[id(node)] = (value, height)
    return value, height


def _plain(value: object) -> object:
    """Records, mappings and tuples as JSON-able dicts and lists; a `Where` as its `file:line` text."""
    if isinstance(value, Where):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


# --- fields -----------------------------------------------------------------------------------------------

_Parser = Callable[[Node, _Ctx], object]


def _fields(
    node: Node, ctx: _Ctx, schema: Mapping[str, _Parser], skip: Collection[str] = ()
) -> dict[str, Any]:
    """Parse a mapping against a closed schema: an unknown key is an error naming the closest valid one."""
    out: dict[str, Any] = {}
    for key, (key_node, value_node) in _mapping(node, ctx).items():
        parser = schema.get(key)
        if key in skip:
            continue
        if parser is None:
            raise ctx.sub(key).error(key_node, _unknown(key, [*skip, *schema]))
        out[key] = parser(value_node, ctx.sub(key))
    return out


def _unknown(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"unknown field; did you mean {close[0]!r}?"
    return f"unknown field (valid: {', '.join(valid)})"


def _text(node: Node, ctx: _Ctx) -> str:
    value = _scalar(node, ctx)
    if not isinstance(value, str) or not value or _CONTROL.search(value):
        raise ctx.error(node, f"expected non-empty text on one line (got {_shown(node)})")
    return value


def _word(node: Node, ctx: _Ctx) -> str:
    value = _text(node, ctx)
    if any(char.isspace() for char in value):
        raise ctx.error(node, f"expected one word, no spaces (got {_shown(node)})")
    return value


def _name(node: Node, ctx: _Ctx) -> str:
    """A device or group name: text as written (quoted or not), checked later by `_check_name`."""
    if not isinstance(node, ScalarNode) or _is_null(node):
        raise ctx.error(node, f"expected a name (got {_shown(node)})")
    return str(node.value)


def _check_name(name: str, node: Node, ctx: _Ctx, kind: str) -> None:
    if name in ALL:
        raise ctx.error(node, f"{name!r} means every device in --limit: pick another {kind} name")
    if not _NAME.fullmatch(name):
        rule = "up to 255 letters, digits, '.', '_', '-', starting with a letter or digit"
        raise ctx.error(node, f"invalid {kind} name {name!r}: {rule}")


def _port(node: Node, ctx: _Ctx) -> int:
    value = _scalar(node, ctx)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ctx.error(node, f"expected an integer 1-65535 (got {_shown(node)})")
    return value


def _seconds(node: Node, ctx: _Ctx) -> float:
    value = _scalar(node, ctx)
    if isinstance(value, (bool, str)) or value is None or not math.isfinite(value) or value <= 0:
        raise ctx.error(node, f"expected a number of seconds > 0 (got {_shown(node)})")
    return float(value)


def _retries(node: Node, ctx: _Ctx) -> int:
    value = _scalar(node, ctx)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CONNECT_RETRIES:
        raise ctx.error(node, f"expected an integer 0-{MAX_CONNECT_RETRIES} (got {_shown(node)})")
    return value


def _bool(node: Node, ctx: _Ctx) -> bool:
    value = _scalar(node, ctx)
    if not isinstance(value, bool):
        raise ctx.error(node, f"expected true or false (got {_shown(node)})")
    return value


def _jump(node: Node, ctx: _Ctx) -> str:
    """`proxy_jump`: checked here for its form; resolved once every device is known (`_with_jumps`)."""
    value = _word(node, ctx)
    try:
        sshconfig.parse_jump(value)
    except ValueError as exc:
        raise ctx.error(node, str(exc)) from None
    return value


def _path(node: Node, ctx: _Ctx) -> str:
    """A controller path: `~` is the controller user's home; relative to the inventory's folder."""
    return os.path.join(ctx.doc.base_dir, os.path.expanduser(_text(node, ctx)))


def _optional(parser: _Parser) -> _Parser:
    return lambda node, ctx: None if _is_null(node) else parser(node, ctx)


def _choice(*choices: str) -> _Parser:
    def parse(node: Node, ctx: _Ctx) -> str:
        value = _scalar(node, ctx)
        if not isinstance(value, str) or value not in choices:
            close = difflib.get_close_matches(str(value).lower(), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ctx.error(node, f"expected one of {', '.join(choices)} (got {_shown(node)}){hint}")
        return value

    return parse


def _index_or_text(node: Node, ctx: _Ctx) -> int | str | None:
    value = _scalar(node, ctx)
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ctx.error(node, f"expected an index >= 0, a name substring or nothing (got {_shown(node)})")


def _text_map(key_re: re.Pattern[str] | None, what: str) -> _Parser:
    """A mapping of text to text; `key_re` restricts its keys."""

    def parse(node: Node, ctx: _Ctx) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, (key_node, value_node) in _mapping(node, ctx).items():
            if not key or (key_re is not None and not key_re.fullmatch(key)):
                raise ctx.error(key_node, f"{key!r} is not {what}")
            value = _scalar(value_node, ctx.sub(key))
            if not isinstance(value, str):
                raise ctx.sub(key).error(value_node, f"expected text (got {_shown(value_node)}): quote it")
            out[key] = value
        return out

    return parse


def _vars(node: Node, ctx: _Ctx) -> Mapping[str, object]:
    if _is_null(node):
        return MappingProxyType({})
    _pairs(node, ctx)  # a mapping, not a list or a value
    return cast(Mapping[str, object], _freeze(node, ctx)[0])


def _section(schema: Mapping[str, _Parser]) -> _Parser:
    return lambda node, ctx: _fields(node, ctx, schema)


_OPENCL: dict[str, _Parser] = {
    "platform": _index_or_text,
    "device": _index_or_text,
    "device_type": _choice(*DEVICE_TYPES),
}
_SSH: dict[str, _Parser] = {
    "known_hosts": _path,
    "host_key_checking": _choice(*HOST_KEY_CHECKING),
    "options": _text_map(None, "an option name"),
    "agent": _bool,
}
_TIMEOUTS: dict[str, _Parser] = {"connect": _seconds, "command": _seconds, "device": _optional(_seconds)}
_LAYER: dict[str, _Parser] = {  # what `defaults` and each device may set
    "user": _word,
    "port": _port,
    "python": _text,
    "remote_dir": _text,
    "identity_file": _optional(_path),
    "proxy_jump": _optional(_jump),
    "connect_retries": _retries,
    "opencl": _section(_OPENCL),
    "ssh": _section(_SSH),
    "timeouts": _section(_TIMEOUTS),
    "env": _text_map(_ENV_KEY, "a variable name ([A-Za-z_][A-Za-z0-9_]*)"),
    "labels": _text_map(None, "a label name"),
    "vars": _vars,
}
_DEVICE: dict[str, _Parser] = {"host": _word, **_LAYER}
_FROM_STRICT_HOST_KEY_CHECKING = {"yes": "strict", "accept-new": "accept-new"}  # no/off/ask: never weaker


def _builtin() -> dict[str, object]:
    """The values below the ssh config, `defaults` and each device (`user`: the local login name)."""
    return {
        "port": 22,
        "python": "python3",
        "remote_dir": "~/.deployer",
        "identity_file": None,
        "proxy_jump": None,
        "connect_retries": 2,
        "opencl": {"platform": None, "device": None, "device_type": "any"},
        "ssh": {"known_hosts": os.path.expanduser("~/.ssh/known_hosts"), "host_key_checking": "strict",
                "agent": True},
        "timeouts": {"connect": 10.0, "command": 600.0, "device": None},
    }


# --- devices ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    where: Where
    fields: dict[str, Any]  # what the device sets itself, parsed

    @property
    def host(self) -> str:
        return cast(str, self.fields["host"])


def _devices(node: Node, ctx: _Ctx) -> list[_Entry]:
    """`devices:` as a list of mappings with `name`, or a mapping of name -> fields."""
    items: list[tuple[str, Node, Node, tuple[str, ...]]]
    if isinstance(node, SequenceNode) and node.tag == _TAG + "seq":
        items = [(_list_name(item, ctx), item, item, ("name",)) for item in node.value]
    else:
        items = [(key, key_node, value, ()) for key, (key_node, value) in _pairs(node, ctx).items()]
    entries: dict[str, _Entry] = {}
    for name, at, value, skip in items:
        _check_name(name, at, _Ctx(ctx.doc, "name"), "device")
        device = _Ctx(ctx.doc, "", name)
        if name in entries:
            first = entries[name].where.line
            raise device.sub("name").error(at, f"duplicate device name (first at line {first})")
        fields = _fields(value, device, _DEVICE, skip)
        if "host" not in fields:
            raise device.sub("host").error(at, "missing: give an address, an ssh config alias or 'local'")
        entries[name] = _Entry(name, Where(ctx.doc.file, _line(at)), fields)
    if not entries:
        raise ctx.error(node, "no devices listed")
    return list(entries.values())


def _list_name(item: Node, ctx: _Ctx) -> str:
    """The `name` of a device in the list form, read before the rest so that errors can name the device."""
    if not isinstance(item, MappingNode):
        raise ctx.error(item, f"expected a mapping (got {_shown(item)})")
    own = (v for k, v in item.value if k.tag == _TAG + "str" and k.value == "name")
    node = next(own, None) or _pairs(item, ctx).get("name", (None, None))[1]  # from a merge key, or none
    if node is None:
        raise _Ctx(ctx.doc, "name").error(item, "missing: each device in the list needs a name")
    return _name(node, _Ctx(ctx.doc, "name"))


def _ssh_config(root: Node, top: Mapping[str, object], ctx: _Ctx) -> sshconfig.SshConfig:
    """The ssh config the inventory names (`ssh_config: null`: none), else `~/.ssh/config` if present."""
    path = cast(str | None, top.get("ssh_config", sshconfig.DEFAULT_PATH))
    if path is None:
        return sshconfig.SshConfig("<none>")
    try:
        return sshconfig.load_ssh_config(path)
    except InputError as exc:
        at = _node_of(root, "ssh_config", ctx) or root
        raise InventoryError(Where(ctx.doc.file, _line(at)), "ssh_config", str(exc)) from exc


def _node_of(root: Node, key: str, ctx: _Ctx) -> Node | None:
    pair = _pairs(root, ctx).get(key)
    return None if pair is None else pair[1]


def _device(
    entry: _Entry, defaults: Mapping[str, Any], groups: Mapping[str, Group], config: sshconfig.SshConfig | None
) -> Device:
    is_local = entry.host == LOCAL_HOST
    seen = _resolve(config, entry) if config is not None and not is_local else None
    merged = _overlay(_builtin(), _ssh_layer(seen), defaults, entry.fields)  # `vars` is replaced, not merged
    member_of = tuple(name for name, group in groups.items() if entry.name in group.devices)
    values = {**defaults.get("vars", {})}
    for group in member_of:
        values.update(groups[group].vars)
    values.update(entry.fields.get("vars", {}))
    opencl, ssh, timeouts = merged["opencl"], merged["ssh"], merged["timeouts"]
    return Device(
        name=entry.name,
        host=(seen.hostname or entry.host) if seen is not None else entry.host,
        port=merged["port"],
        user=merged.get("user") or _local_user(entry),
        identity_file=merged["identity_file"],
        python=merged["python"],
        remote_dir=merged["remote_dir"],
        opencl=OpenCLSelection(opencl["platform"], opencl["device"], opencl["device_type"]),
        ssh=SshOptions(
            ssh["known_hosts"], ssh["host_key_checking"], MappingProxyType(ssh.get("options", {})), ssh["agent"]
        ),
        timeouts=Timeouts(timeouts["connect"], timeouts["command"], timeouts["device"]),
        env=MappingProxyType(merged.get("env", {})),
        labels=MappingProxyType(merged.get("labels", {})),
        vars=MappingProxyType(values),
        groups=member_of,
        where=entry.where,
        proxy_jump=merged["proxy_jump"],
        is_local=is_local,
        connect_retries=merged["connect_retries"],
    )


def _with_jumps(devices: tuple[Device, ...], config: sshconfig.SshConfig | None) -> tuple[Device, ...]:
    """Each device with its ProxyJump hops resolved: a hop named like a device of this inventory is that
    device (its address, port, user, key); any other name goes through the ssh config, as OpenSSH does."""
    by_name = {d.name: d for d in devices}

    def chain(spec: str, device: Device, depth: int) -> list[JumpHost]:
        hops: list[JumpHost] = []
        for index, (user, name, port) in enumerate(sshconfig.parse_jump(spec)):
            shown = f"[{name}]" if ":" in name and port else name  # an IPv6 address with a port
            written = f"{user + '@' if user else ''}{shown}{f':{port}' if port else ''}"
            other = by_name.get(name)
            if other is not None and other.is_local:
                raise ValueError(f"jump host {name!r} is the controller itself ('host: local')")
            if other is not None:
                hop = JumpHost(written, other.host, port or other.port, user or other.user, other.identity_file)
                own = other.proxy_jump
            else:
                seen = config.resolve(name) if config is not None else sshconfig.SshHostConfig(name)
                hop = JumpHost(written, seen.hostname or name, port or seen.port or 22,
                               user or seen.user or sshconfig.local_user(), seen.identity_file or device.identity_file)
                own = seen.proxy_jump
            if index == 0 and own:  # the first hop is reached through its own ProxyJump, as `ssh -J` does
                if depth >= MAX_JUMPS:
                    raise ValueError(f"more than {MAX_JUMPS} jump hosts (a ProxyJump cycle?)")
                hops += chain(own, device, depth + 1)
            hops.append(hop)
        if len(hops) > MAX_JUMPS:
            raise ValueError(f"more than {MAX_JUMPS} jump hosts")
        return hops

    out = []
    for device in devices:
        if device.proxy_jump and not device.is_local:
            try:
                device = replace(device, jumps=tuple(chain(device.proxy_jump, device, 0)))
            except (ValueError, InputError) as exc:
                problem = exc.problem if isinstance(exc, InputError) else str(exc)
                raise InventoryError(device.where, "proxy_jump", f"{problem} (got {device.proxy_jump!r})",
                                     device=device.name) from None
        out.append(device)
    return tuple(out)


def override(device: Device, *, connect_retries: int | None = None, deadline: float | None = None) -> Device:
    """The device with the command line's `--retries` / `--deadline` in place of its inventory values."""
    if connect_retries is not None:
        device = replace(device, connect_retries=connect_retries)
    if deadline is not None:
        device = replace(device, timeouts=replace(device.timeouts, device=deadline if deadline > 0 else None))
    return device


def _resolve(config: sshconfig.SshConfig, entry: _Entry) -> sshconfig.SshHostConfig:
    try:
        return config.resolve(entry.host)
    except InputError as exc:
        raise InventoryError(entry.where, "host", f"in ssh config: {exc}", device=entry.name) from exc


def _local_user(entry: _Entry) -> str:
    try:
        return sshconfig.local_user()
    except InputError as exc:
        raise InventoryError(entry.where, "user", exc.problem, device=entry.name) from exc


def _ssh_layer(seen: sshconfig.SshHostConfig | None) -> dict[str, object]:
    """What the ssh config fills in: below `defaults` and the device, above the built-in values."""
    if seen is None:
        return {}
    ssh = {
        "known_hosts": seen.user_known_hosts_file,
        "host_key_checking": _FROM_STRICT_HOST_KEY_CHECKING.get(seen.strict_host_key_checking or ""),
    }
    layer = {
        "user": seen.user,
        "port": seen.port,
        "identity_file": seen.identity_file,
        "proxy_jump": seen.proxy_jump,
        "ssh": {key: value for key, value in ssh.items() if value is not None},
    }
    return {key: value for key, value in layer.items() if value is not None}


def _overlay(*layers: Mapping[str, object]) -> dict[str, Any]:
    """Later layers win; nested mappings (`opencl`, `ssh`, `env`, ...) merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            below = out.get(key)
            if isinstance(below, dict) and isinstance(value, dict):
                value = _overlay(below, value)
            out[key] = value
    return out


# --- groups -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RawGroup:
    name: str
    node: Node
    members: list[tuple[str, Node]]
    children: list[tuple[str, Node]]
    vars: Mapping[str, object]


def _groups(node: Node | None, ctx: _Ctx, devices: Mapping[str, _Entry]) -> dict[str, Group]:
    """Groups checked (members are devices, children groups, no cycle), in vars order: depth, then name."""
    raw = {
        name: _raw_group(name, key_node, value, ctx)
        for name, (key_node, value) in ({} if node is None else _mapping(node, ctx)).items()
    }
    for group in raw.values():
        _check_group(group, raw, devices, ctx)
    parents: dict[str, set[str]] = {name: set() for name in raw}
    for group in raw.values():
        for child, _ in group.children:
            parents[child].add(group.name)
    try:
        topological = list(TopologicalSorter(parents).static_order())  # parents before children
    except CycleError as exc:
        raise _cycle_error(cast(list[str], exc.args[1]), raw, ctx) from None
    depth: dict[str, int] = {}
    for name in topological:
        depth[name] = max((depth[parent] + 1 for parent in parents[name]), default=0)
    order = sorted(raw, key=lambda name: (depth[name], name))
    holds: dict[str, set[str]] = {}
    for name in reversed(order):  # children before their parents
        group = raw[name]
        holds[name] = {m for m, _ in group.members}.union(*(holds[c] for c, _ in group.children))
    rank = {name: index for index, name in enumerate(devices)}
    return {name: _group(raw[name], sorted(holds[name], key=rank.__getitem__), ctx) for name in order}


def _raw_group(name: str, key_node: Node, value: Node, ctx: _Ctx) -> _RawGroup:
    _check_name(name, key_node, ctx, "group")
    here = ctx.sub(name)
    fields = _fields(value, here, _GROUP)
    members, children = fields.get("members", []), fields.get("children", [])
    return _RawGroup(name, key_node, members, children, fields.get("vars", {}))


def _name_list(node: Node, ctx: _Ctx) -> list[tuple[str, Node]]:
    if _is_null(node):
        return []
    if not isinstance(node, SequenceNode) or node.tag != _TAG + "seq":
        raise ctx.error(node, f"expected a list of names (got {_shown(node)})")
    return [(_name(item, ctx), item) for item in node.value]


_GROUP: dict[str, _Parser] = {"members": _name_list, "children": _name_list, "vars": _vars}


def _check_group(
    group: _RawGroup, groups: Mapping[str, _RawGroup], devices: Mapping[str, _Entry], ctx: _Ctx
) -> None:
    here = ctx.sub(group.name)
    if group.name in devices:
        line = devices[group.name].where.line
        raise here.error(group.node, f"a device has this name too (line {line}): rename one")
    for member, node in group.members:
        if member not in devices:
            raise here.sub("members").error(node, f"{member!r} is not a device{_hint(member, devices)}")
    for child, node in group.children:
        if child in devices:
            raise here.sub("children").error(node, f"{child!r} is a device, not a group: put it in members")
        if child not in groups:
            raise here.sub("children").error(node, f"{child!r} is not a group{_hint(child, groups)}")


def _cycle_error(cycle: list[str], groups: Mapping[str, _RawGroup], ctx: _Ctx) -> InventoryError:
    parent, child = cycle[0], cycle[1]  # graphlib lists each node before the one it precedes
    node = next(n for name, n in groups[parent].children if name == child)
    return ctx.sub(parent).sub("children").error(node, f"group cycle: {' -> '.join(cycle)}")


def _group(raw: _RawGroup, devices: list[str], ctx: _Ctx) -> Group:
    members = tuple(dict.fromkeys(m for m, _ in raw.members))
    children = tuple(dict.fromkeys(c for c, _ in raw.children))
    where = Where(ctx.doc.file, _line(raw.node))
    return Group(raw.name, members, children, tuple(devices), raw.vars, where)


def _hint(name: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# --- top level and --limit --------------------------------------------------------------------------------

_TOP: dict[str, _Parser] = {
    "defaults": lambda node, ctx: _fields(node, ctx, _LAYER),
    "devices": _devices,
    "groups": lambda node, ctx: node,  # checked after the devices, by `_groups`
    "ssh_config": _optional(_path),
}


def _names(inventory: Inventory) -> set[str]:
    return {device.name for device in inventory.devices}


def _match(inventory: Inventory, pattern: str, named_sets: Mapping[str, Sequence[str]] | None) -> set[str]:
    """Device names one --limit pattern picks; a pattern that picks none is an error (a typo, surely)."""
    if not pattern:
        raise InputError(None, "limit", "'!' or '&' needs a pattern after it")
    if pattern.startswith("@"):
        return _named_set(inventory, pattern, named_sets or {})
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
        hint = _hint(pattern, names | set(inventory.groups))
        raise InputError(None, "limit", f"{pattern!r} matches no device or group{hint} ({known})")
    return picked


def _named_set(inventory: Inventory, pattern: str, named_sets: Mapping[str, Sequence[str]]) -> set[str]:
    name = pattern[1:]
    if name not in named_sets:
        known = ", ".join("@" + key for key in sorted(named_sets)) or "none here"
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
