"""The inventory: a YAML file of devices and groups -> frozen `Device` records that remember their file:line.

Pure: it reads the inventory and the ssh config it names, nothing else (no Paramiko, no network). The format
and the precedence rules are in docs/inventory.md; the `--limit` grammar is `selection.py`. Every problem is
an `InventoryError` naming file:line, the device and the field; the schema is closed, so a misspelt key is an
error, not a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from graphlib import CycleError, TopologicalSorter
from types import MappingProxyType
from typing import Any, cast

from yaml.nodes import MappingNode, Node, SequenceNode

from deployer.config import sshconfig
from deployer.config.fields import (
    Parser,
    check_name,
    did_you_mean,
    optional,
    parse_bool,
    parse_fields,
    parse_name,
    parse_path,
    parse_vars,
)
from deployer.config.files import MAX_INVENTORY, read_user_file
from deployer.config.formats.ansible import load_ansible
from deployer.config.formats.detect import FORMATS, detect
from deployer.config.formats.mace_devices import parse_mace
from deployer.config.formats.model import FleetSpec, check_spec_name
from deployer.config.formats.ssh_aliases import load_aliases
from deployer.config.schema import DEVICE, LAYER
from deployer.config.sshconfig import JumpHost
from deployer.config.yamlnodes import (
    TAG,
    Context,
    Document,
    as_mapping,
    compose,
    decode_text,
    is_null,
    line_of,
    mapping_pairs,
    show_node,
    to_plain,
)
from deployer.errors import InputError, InventoryError, Where

MAX_JUMPS = 8  # ProxyJump hops, the jump hosts' own ProxyJump included
LOCAL_HOST = "local"  # `host: local` runs on the controller itself


@dataclass(frozen=True, slots=True)
class OpenCLSelection:
    platform: int | str | None = None  # index, or case-insensitive substring of the platform name
    device: int | str | None = None  # index, or substring of the device name
    device_type: str = "any"  # one of schema.DEVICE_TYPES
    library: str | None = None  # the OpenCL library the agent loads (absolute path or file name); None: the loader

    def as_request(self) -> dict[str, int | str | None]:
        """The `opencl` field of the agent's fingerprint, build and smoke requests (`library` only when set,
        so a board without it keeps its driver stamp)."""
        request: dict[str, int | str | None] = {
            "platform": self.platform, "device": self.device, "device_type": self.device_type}
        if self.library is not None:
            request["library"] = self.library
        return request


@dataclass(frozen=True, slots=True)
class SshOptions:
    known_hosts: str
    host_key_checking: str  # one of schema.HOST_KEY_CHECKING
    options: Mapping[str, str]
    agent: bool = True  # also offer the keys of the SSH agent at SSH_AUTH_SOCK, when one is running
    persist: float = 0.0  # seconds the connection master keeps the connection open unused; 0: none (docs/inventory.md)


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
    origins: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # field -> where it was set
    share_builds: bool = False  # binaries built by a device of the same fingerprint id are trusted (docs/inventory.md)


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    members: tuple[str, ...]  # devices listed under `members`
    children: tuple[str, ...]
    devices: tuple[str, ...]  # members and the devices of all children, in inventory order
    vars: Mapping[str, object]
    where: Where
    share_builds: bool | None = None  # None: the group does not say; its devices get it unless they say


@dataclass(frozen=True, slots=True)
class Inventory:
    path: str
    devices: tuple[Device, ...]
    groups: Mapping[str, Group]  # in vars order: by depth, then name
    tree: tuple[Group, ...] = ()  # Ansible inventories: every group as declared, `all` first (for --limit)
    format: str = "deploy"  # the format it was read from (formats.detect.FORMATS)
    notes: tuple[str, ...] = ()  # what was read but not used (a devices.yml password), for the CLI to show
    ssh_config: str | None = sshconfig.DEFAULT_PATH  # the ssh config its aliases resolved through (None: none)


def load_inventory(path: str | os.PathLike[str], form: str | None = None) -> Inventory:
    """Read and check the inventory at `path`, in any format `--fleet` takes (`form`: one of
    `formats.detect.FORMATS`, None: told by content); raises `InventoryError` and nothing else."""
    file = os.fspath(path)
    if form is not None and form not in FORMATS:
        raise InventoryError(None, "fleet-format", f"unknown format {form!r} (known: {', '.join(FORMATS)})")
    form = form or detect(file)
    if form == "deploy":
        data = read_user_file(file, MAX_INVENTORY, "the inventory", InventoryError)
        if data is None:
            raise InventoryError(Where(file), None, "no such file")
        return parse_inventory(data, file)
    if form.startswith("ansible"):
        return from_spec(load_ansible(file, form.removeprefix("ansible").removeprefix("-") or None))
    if form == "ssh":
        return from_spec(load_aliases(file), "ssh")
    if form == "mace":
        data = read_user_file(file, MAX_INVENTORY, "the inventory", InventoryError)
        if data is None:
            raise InventoryError(Where(file), None, "no such file")
        spec, notes = parse_mace(data, file)
        return replace(from_spec(spec, "mace"), notes=notes)
    raise InventoryError(Where(file), "fleet-format", f"unknown format {form!r}")  # FORMATS are all read above


def parse_inventory(source: str | bytes, path: str | os.PathLike[str] = "<inventory>") -> Inventory:
    """Check inventory text; `path` names it in messages and anchors relative paths in it."""
    file = os.fspath(path)
    ctx = Context(Document(file, os.path.abspath(os.path.dirname(file))))
    text = source if isinstance(source, str) else decode_text(source, file)
    root = compose(text, file)
    if root is None:
        raise InventoryError(Where(file, 1), None, "empty inventory: expected a mapping with 'devices'")
    if not isinstance(root, MappingNode):
        raise ctx.error(root, f"the top level must be a mapping with 'devices' (got {show_node(root)})")
    top = parse_fields(root, ctx, _TOP)
    if "devices" not in top:
        raise ctx.sub("devices").error(root, "missing: list the devices")
    defaults: dict[str, object] = top.get("defaults", {})
    entries: list[_Entry] = top["devices"]
    groups = _groups(top.get("groups"), ctx.sub("groups"), {e.name: e for e in entries})
    config = _ssh_config(root, top, ctx) if any(e.host != LOCAL_HOST for e in entries) else None
    at = _node_of(root, "defaults", ctx)
    below = {key: f"{file}:{line_of(k)}" for key, (k, _) in as_mapping(at, ctx).items()} if at is not None else {}
    devices = _with_jumps(tuple(_device(e, defaults, groups, config, below) for e in entries), config)
    ssh_path = cast(str | None, top.get("ssh_config", sshconfig.DEFAULT_PATH))
    return Inventory(file, devices, MappingProxyType(groups), ssh_config=ssh_path)


def from_spec(spec: FleetSpec, form: str = "ansible") -> Inventory:
    """The inventory a format read into a `FleetSpec`: its hosts as devices (fields as our YAML's entries
    hold them), its groups with their vars in the spec's order; names checked as ours are."""
    entries = []
    for host in spec.hosts:
        check_spec_name(host.name, host.where, "host")
        entries.append(_Entry(host.name, host.where, dict(host.fields), host.origins))
    rank = {host.name: index for index, host in enumerate(spec.hosts)}
    raw = {g.name: g for g in spec.groups}
    holds: dict[str, set[str]] = {}

    def held(name: str, depth: int) -> set[str]:
        if name not in holds:
            if depth > len(raw):
                raise InventoryError(raw[name].where, None, f"group cycle through {name!r}")
            holds[name] = set(raw[name].hosts).union(*(held(c, depth + 1) for c in raw[name].children))
        return holds[name]

    tree = []
    for group in spec.groups:
        if group.name != "all":
            check_spec_name(group.name, group.where, "group")
        members = tuple(sorted(held(group.name, 0), key=rank.__getitem__))
        tree.append(Group(group.name, group.hosts, group.children, members, group.vars, group.where))
    by_name = {g.name: g for g in tree}
    groups = {name: by_name[name] for name in spec.vars_order}
    config = None
    if spec.ssh_config is not None and any(e.host != LOCAL_HOST for e in entries):
        try:
            config = sshconfig.load_ssh_config(spec.ssh_config)
        except InputError as exc:
            raise InventoryError(Where(spec.file), "ssh_config", str(exc)) from exc
    devices = []
    for entry, host in zip(entries, spec.hosts, strict=True):
        device = _device(entry, {}, groups, config)
        var_origins = {key: value for key, value in host.origins.items() if key.startswith("vars.")}
        devices.append(replace(device, vars=host.vars, origins=MappingProxyType({**device.origins, **var_origins})))
    jumped = _with_jumps(tuple(devices), config)
    return Inventory(spec.file, jumped, MappingProxyType(groups), tuple(tree), form, ssh_config=spec.ssh_config)


def describe(device: Device) -> dict[str, object]:
    """A JSON-able view of a device, in record order; `env` values are masked (they may hold tokens)."""
    view = cast(dict[str, object], to_plain(device))
    view["env"] = {key: "***" for key in device.env}
    return view

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
        "opencl": {"platform": None, "device": None, "device_type": "any", "library": None},
        "ssh": {"known_hosts": os.path.expanduser("~/.ssh/known_hosts"), "host_key_checking": "strict",
                "agent": True, "persist": 0.0},
        "timeouts": {"connect": 10.0, "command": 600.0, "device": None},
    }

# --- devices ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    where: Where
    fields: dict[str, Any]  # what the device sets itself, parsed
    origins: Mapping[str, str] = field(default_factory=dict)  # field -> "file:line" it was set at

    @property
    def host(self) -> str:
        return cast(str, self.fields["host"])


def _devices(node: Node, ctx: Context) -> list[_Entry]:
    """`devices:` as a list of mappings with `name`, or a mapping of name -> fields."""
    items: list[tuple[str, Node, Node, tuple[str, ...]]]
    if isinstance(node, SequenceNode) and node.tag == TAG + "seq":
        items = [(_list_name(item, ctx), item, item, ("name",)) for item in node.value]
    else:
        items = [(key, key_node, value, ()) for key, (key_node, value) in mapping_pairs(node, ctx).items()]
    entries: dict[str, _Entry] = {}
    for name, at, value, skip in items:
        check_name(name, at, Context(ctx.doc, "name"), "device")
        device = Context(ctx.doc, "", name)
        if name in entries:
            first = entries[name].where.line
            raise device.sub("name").error(at, f"duplicate device name (first at line {first})")
        fields = parse_fields(value, device, DEVICE, skip)
        if "host" not in fields:
            raise device.sub("host").error(at, "missing: give an address, an ssh config alias or 'local'")
        origins = {key: f"{ctx.doc.file}:{line_of(k)}" for key, (k, _) in as_mapping(value, device).items()}
        entries[name] = _Entry(name, Where(ctx.doc.file, line_of(at)), fields, origins)
    if not entries:
        raise ctx.error(node, "no devices listed")
    return list(entries.values())


def _list_name(item: Node, ctx: Context) -> str:
    """The `name` of a device in the list form, read before the rest so that errors can name the device."""
    if not isinstance(item, MappingNode):
        raise ctx.error(item, f"expected a mapping (got {show_node(item)})")
    own = (v for k, v in item.value if k.tag == TAG + "str" and k.value == "name")
    node = next(own, None) or mapping_pairs(item, ctx).get("name", (None, None))[1]  # from a merge key, or none
    if node is None:
        raise Context(ctx.doc, "name").error(item, "missing: each device in the list needs a name")
    return parse_name(node, Context(ctx.doc, "name"))


def _ssh_config(root: Node, top: Mapping[str, object], ctx: Context) -> sshconfig.SshConfig:
    """The ssh config the inventory names (`ssh_config: null`: none), else `~/.ssh/config` if present."""
    path = cast(str | None, top.get("ssh_config", sshconfig.DEFAULT_PATH))
    if path is None:
        return sshconfig.SshConfig("<none>")
    try:
        return sshconfig.load_ssh_config(path)
    except InputError as exc:
        at = _node_of(root, "ssh_config", ctx) or root
        raise InventoryError(Where(ctx.doc.file, line_of(at)), "ssh_config", str(exc)) from exc


def _node_of(root: Node, key: str, ctx: Context) -> Node | None:
    pair = mapping_pairs(root, ctx).get(key)
    return None if pair is None else pair[1]


def _device(
    entry: _Entry, defaults: Mapping[str, Any], groups: Mapping[str, Group], config: sshconfig.SshConfig | None,
    below: Mapping[str, str] | None = None,
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
        opencl=OpenCLSelection(opencl["platform"], opencl["device"], opencl["device_type"], opencl["library"]),
        ssh=SshOptions(
            ssh["known_hosts"], ssh["host_key_checking"], MappingProxyType(ssh.get("options", {})), ssh["agent"],
            ssh["persist"],
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
        origins=_origins(entry, below or {}, _ssh_layer(seen), config),
        share_builds=_share_builds(entry, defaults, [groups[g] for g in member_of]),
    )


def _share_builds(entry: _Entry, defaults: Mapping[str, Any], groups: Sequence[Group]) -> bool:
    """The device's own `share_builds`, else the last group holding it that sets it (vars order: a child group
    over its parents), else `defaults`, else off."""
    if "share_builds" in entry.fields:
        return bool(entry.fields["share_builds"])
    said = [g.share_builds for g in groups if g.share_builds is not None]
    return bool(said[-1]) if said else bool(defaults.get("share_builds", False))


ORIGIN_FIELDS = ("host", "port", "user", "identity_file", "proxy_jump", "python", "remote_dir", "connect_retries",
                 "opencl", "ssh", "timeouts", "env", "labels")


def _origins(entry: _Entry, below: Mapping[str, str], ssh_layer: Mapping[str, object],
             config: sshconfig.SshConfig | None) -> Mapping[str, str]:
    """Where each field's value came from: the device's line, `defaults`' line, the ssh config's Host block
    (`hostname` for `host`), or the built-in default."""
    out = {}
    for key in ORIGIN_FIELDS:
        from_config = config is not None and ssh_layer.get("hostname" if key == "host" else key) not in (None, {})
        if key in entry.origins and not (key == "host" and from_config):
            out[key] = entry.origins[key]
        elif key in below:
            out[key] = f"{below[key]} (defaults)"
        elif from_config and config is not None:
            out[key] = f"{config.path} (Host {entry.host})"
        else:
            out[key] = "default"
    return MappingProxyType(out)


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
        "hostname": seen.hostname,
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
    share_builds: bool | None = None


def _groups(node: Node | None, ctx: Context, devices: Mapping[str, _Entry]) -> dict[str, Group]:
    """Groups checked (members are devices, children groups, no cycle), in vars order: depth, then name."""
    raw = {
        name: _raw_group(name, key_node, value, ctx)
        for name, (key_node, value) in ({} if node is None else as_mapping(node, ctx)).items()
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


def _raw_group(name: str, key_node: Node, value: Node, ctx: Context) -> _RawGroup:
    check_name(name, key_node, ctx, "group")
    here = ctx.sub(name)
    fields = parse_fields(value, here, _GROUP)
    members, children = fields.get("members", []), fields.get("children", [])
    return _RawGroup(name, key_node, members, children, fields.get("vars", {}), fields.get("share_builds"))


def _name_list(node: Node, ctx: Context) -> list[tuple[str, Node]]:
    if is_null(node):
        return []
    if not isinstance(node, SequenceNode) or node.tag != TAG + "seq":
        raise ctx.error(node, f"expected a list of names (got {show_node(node)})")
    return [(parse_name(item, ctx), item) for item in node.value]

_GROUP: dict[str, Parser] = {"members": _name_list, "children": _name_list, "vars": parse_vars,
                             "share_builds": parse_bool}


def _check_group(
    group: _RawGroup, groups: Mapping[str, _RawGroup], devices: Mapping[str, _Entry], ctx: Context
) -> None:
    here = ctx.sub(group.name)
    if group.name in devices:
        line = devices[group.name].where.line
        raise here.error(group.node, f"a device has this name too (line {line}): rename one")
    for member, node in group.members:
        if member not in devices:
            raise here.sub("members").error(node, f"{member!r} is not a device{did_you_mean(member, devices)}")
    for child, node in group.children:
        if child in devices:
            raise here.sub("children").error(node, f"{child!r} is a device, not a group: put it in members")
        if child not in groups:
            raise here.sub("children").error(node, f"{child!r} is not a group{did_you_mean(child, groups)}")


def _cycle_error(cycle: list[str], groups: Mapping[str, _RawGroup], ctx: Context) -> InventoryError:
    parent, child = cycle[0], cycle[1]  # graphlib lists each node before the one it precedes
    node = next(n for name, n in groups[parent].children if name == child)
    return ctx.sub(parent).sub("children").error(node, f"group cycle: {' -> '.join(cycle)}")


def _group(raw: _RawGroup, devices: list[str], ctx: Context) -> Group:
    members = tuple(dict.fromkeys(m for m, _ in raw.members))
    children = tuple(dict.fromkeys(c for c, _ in raw.children))
    where = Where(ctx.doc.file, line_of(raw.node))
    return Group(raw.name, members, children, tuple(devices), raw.vars, where, raw.share_builds)

# --- top level and --limit --------------------------------------------------------------------------------

_TOP: dict[str, Parser] = {
    "defaults": lambda node, ctx: parse_fields(node, ctx, LAYER),
    "devices": _devices,
    "groups": lambda node, ctx: node,  # checked after the devices, by `_groups`
    "ssh_config": optional(parse_path),
}
