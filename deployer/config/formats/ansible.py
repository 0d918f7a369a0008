"""An Ansible inventory (a file in INI or YAML form, or a folder of them) with the `group_vars/` and
`host_vars/` beside it, resolved as Ansible resolves a host's variables, and mapped onto our device fields:
`ansible_host`, `ansible_port`, `ansible_user`, `ansible_ssh_private_key_file`, `ansible_python_interpreter`,
`ansible_connection: local`, what maps of `ansible_ssh_common_args`/`ansible_ssh_extra_args`, and our own
settings as `deploy_<field>`. What we cannot honour (passwords, become, vault, dynamic inventories, plugins)
is an error naming the host and the line, never skipped. docs/inventory.md has the table.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from deployer.config.fields import Parser, did_you_mean, parse_path, parse_text, parse_vars, parse_word
from deployer.config.files import MAX_INVENTORY, read_user_file
from deployer.config.formats.ansible_data import ALL, AnsibleData, RawGroup, RawHost, Value, node_of
from deployer.config.formats.ansible_ini import looks_like_ini, parse_ini
from deployer.config.formats.ansible_ssh_args import ansible_port, ssh_args
from deployer.config.formats.ansible_yaml import parse_yaml
from deployer.config.formats.model import FleetSpec, GroupSpec, HostSpec, check_spec_name
from deployer.config.schema import LAYER
from deployer.config.yamlnodes import TAG, Context, Document, compose, decode_text, line_of, mapping_pairs
from deployer.errors import InventoryError, Where

DEFAULT_SSH_CONFIG = "~/.ssh/config"
# A folder inventory skips what Ansible skips (INVENTORY_IGNORE_EXTS and IGNORED_ALWAYS).
_IGNORED_EXTS = (".pyc", ".pyo", ".swp", ".bak", "~", ".rpm", ".md", ".txt", ".rst", ".orig", ".cfg", ".retry")
_IGNORED_NAMES = ("host_vars", "group_vars", "vars_plugins")
_VARS_EXTS = ("", ".yml", ".yaml", ".json")
_MAX_FILES = 10_000

# deploy_<field>: our settings that Ansible has no variable for (ansible_* covers host, port, user, key, python)
DEPLOY_FIELDS = ("remote_dir", "proxy_jump", "connect_retries", "opencl", "ssh", "timeouts", "env", "labels",
                 "share_builds")
_ANSIBLE_FIELDS = {  # the first of each field's names that is set wins
    "host": ("ansible_host", "ansible_ssh_host"),
    "port": ("ansible_port", "ansible_ssh_port"),
    "user": ("ansible_user", "ansible_ssh_user"),
    "identity_file": ("ansible_ssh_private_key_file", "ansible_private_key_file"),
    "python": ("ansible_python_interpreter",),
}
_SSH_ARGS = ("ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_ssh_args")
_SSH_CONNECTIONS = ("ssh", "smart", "paramiko", "paramiko_ssh", "ansible.builtin.ssh", "ansible.builtin.paramiko_ssh")
_LOCAL_CONNECTIONS = ("local", "ansible.builtin.local")
_UNSUPPORTED = {
    "ansible_password": "passwords are never used: log in with a key (ssh-copy-id) or the SSH agent",
    "ansible_ssh_pass": "passwords are never used: log in with a key (ssh-copy-id) or the SSH agent",
    "ansible_ssh_password": "passwords are never used: log in with a key (ssh-copy-id) or the SSH agent",
    "ansible_ssh_private_key_passphrase": "encrypted keys are used through the SSH agent (ssh-add), never a passphrase",
}
_UNSUPPORTED_PREFIXES = {
    "ansible_become": "privilege escalation (become) is not supported: deployer runs as the login user",
    "ansible_sudo": "privilege escalation (sudo) is not supported: deployer runs as the login user",
    "ansible_su_": "privilege escalation (su) is not supported: deployer runs as the login user",
}
def is_ansible_yaml(root: Node, ctx: Context) -> bool:
    """A mapping of groups (each a mapping of hosts/children/vars, or nothing), or a plugin's configuration."""
    if not isinstance(root, MappingNode):
        return False
    pairs = mapping_pairs(root, ctx)
    if "plugin" in pairs or ALL in pairs:
        return True
    return bool(pairs) and all(
        (isinstance(v, ScalarNode) and v.tag == TAG + "null")
        or (isinstance(v, MappingNode) and set(mapping_pairs(v, ctx)) & {"hosts", "children", "vars"})
        for _, v in pairs.values()
    )


def load_ansible(path: str, form: str | None = None) -> FleetSpec:
    """Read the Ansible inventory at `path` (a file, or a folder as Ansible reads one) and its vars folders.
    `form`: "ini" or "yaml" to skip detection (a folder's files are always detected one by one)."""
    data = AnsibleData()
    base = path if os.path.isdir(path) else os.path.dirname(path) or "."
    for file in _sources(path):
        _read_source(file, data, form if file == path else None)
    data.reconcile()
    if not data.hosts:
        raise InventoryError(Where(path), None, "no hosts in this Ansible inventory")
    return _spec(path, base, data)


def _sources(path: str) -> Iterator[str]:
    if not os.path.isdir(path):
        yield path
        return
    count = 0
    for root, folders, files in os.walk(path):
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in _IGNORED_NAMES)
        for name in sorted(files):
            if name.startswith(".") or name.endswith(_IGNORED_EXTS) or name in _IGNORED_NAMES:
                continue
            count += 1
            if count > _MAX_FILES:
                raise InventoryError(Where(path), None, f"over {_MAX_FILES} files in this inventory folder")
            yield os.path.join(root, name)


def _read_source(file: str, data: AnsibleData, form: str | None) -> None:
    raw = read_user_file(file, MAX_INVENTORY, "the inventory", InventoryError)
    if raw is None:
        raise InventoryError(Where(file), None, "no such file")
    text = decode_text(raw, file)
    if text.startswith("#!") or (os.access(file, os.X_OK) and form is None and file.endswith(".py")):
        raise InventoryError(Where(file, 1), None, "a dynamic inventory script: not supported (deployer never runs "
                                                   "it; save its output with ansible-inventory -y --list and use that)")
    if text.startswith("$ANSIBLE_VAULT;"):
        raise InventoryError(Where(file, 1), None, "a vaulted file: vault is not supported (decrypt it with "
                                                   "ansible-vault view, or keep secrets out of the inventory)")
    if form == "ini" or (form is None and looks_like_ini(text)):
        parse_ini(text, file, data)
        return
    ctx = Context(Document(file, os.path.abspath(os.path.dirname(file))))
    try:
        root = compose(text, file)
    except InventoryError:
        if form == "yaml":
            raise
        parse_ini(text, file, data)  # not YAML: a plain INI list of hosts, as Ansible's ini plugin reads it
        return
    if root is None:
        return
    if form == "yaml" or is_ansible_yaml(root, ctx):
        parse_yaml(root, ctx, data)
    elif isinstance(root, ScalarNode):
        parse_ini(text, file, data)  # `pi-01` alone on a line is YAML text too
    else:
        raise ctx.error(root, "not an Ansible inventory: expected a mapping of groups (all: {hosts: ...}) or an "
                              "INI file ([group] sections of host lines)")


# --- group_vars/ and host_vars/ ----------------------------------------------------------------------------


def _vars_files(base: str, kind: str, name: str) -> list[str]:
    """The files of `base/kind/name` as Ansible finds them: `name`, `name.yml`, `name.yaml`, `name.json`
    (the first that exists), a folder read whole (sorted, recursively, hidden files skipped)."""
    stem = os.path.join(base, kind, name)
    for ext in _VARS_EXTS:
        candidate = stem + ext
        if os.path.isdir(candidate):
            return list(_folder_files(candidate))
        if os.path.lexists(candidate):
            return [candidate]
    return []


def _folder_files(folder: str) -> Iterator[str]:
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or name.endswith("~"):
            continue
        full = os.path.join(folder, name)
        ext = os.path.splitext(name)[1]
        if os.path.isdir(full) and not ext:
            yield from _folder_files(full)
        elif not os.path.isdir(full) and ext in _VARS_EXTS:
            yield full


def _vars_file(file: str) -> dict[str, Value]:
    raw = read_user_file(file, MAX_INVENTORY, "a vars file", InventoryError)
    if raw is None:
        return {}
    text = decode_text(raw, file)
    if text.startswith("$ANSIBLE_VAULT;"):
        raise InventoryError(Where(file, 1), None, "a vaulted vars file: vault is not supported")
    root = compose(text, file)
    if root is None:
        return {}
    ctx = Context(Document(file, os.path.abspath(os.path.dirname(file))))
    pairs = mapping_pairs(root, ctx)
    return {key: Value(node, Where(file, line_of(key_node))) for key, (key_node, node) in pairs.items()}


# --- resolving a host's vars -------------------------------------------------------------------------------


def _sorted_groups(data: AnsibleData, names: list[str]) -> list[RawGroup]:
    groups = [data.groups[n] for n in names if n != ALL]
    return sorted(groups, key=lambda g: (g.depth, g.priority, g.name))


def _host_vars(data: AnsibleData, host: RawHost, base: str, files: dict[str, dict[str, Value]]) -> dict[str, Value]:
    """A host's vars as Ansible's VariableManager combines them (each level replaces whole values):
    `all` < each group (depth, priority, name) < group_vars/all < group_vars/<group> < the host < host_vars."""

    def from_files(kind: str, name: str) -> dict[str, Value]:
        key = f"{kind}/{name}"
        if key not in files:
            merged: dict[str, Value] = {}
            for file in _vars_files(base, kind, name):
                merged.update(_vars_file(file))
            files[key] = merged
        return files[key]

    groups = _sorted_groups(data, data.ancestors(host))
    out: dict[str, Value] = dict(data.groups[ALL].vars)
    for group in groups:
        out.update(group.vars)
    out.update(from_files("group_vars", ALL))
    for group in groups:
        out.update(from_files("group_vars", group.name))
    out.update(host.vars)
    out.update(from_files("host_vars", host.name))
    return out


def resolved_vars(path: str) -> dict[str, dict[str, object]]:
    """Every host's resolved vars as plain values (for tests and `inventory list`): host -> name -> value."""
    data = AnsibleData()
    base = path if os.path.isdir(path) else os.path.dirname(path) or "."
    for file in _sources(path):
        _read_source(file, data, None)
    data.reconcile()
    files: dict[str, dict[str, Value]] = {}
    out = {}
    for host in data.hosts.values():
        values = _host_vars(data, host, base, files)
        out[host.name] = {key: _plain(value) for key, value in values.items()}
    return out


def _plain(value: Value) -> object:
    ctx = Context(Document(value.where.file, "."), "vars")
    wrapper = MappingNode(TAG + "map", [(node_of("v", value.where), value.node)], value.node.start_mark)
    return parse_vars(wrapper, ctx)["v"]


# --- mapping vars onto our fields --------------------------------------------------------------------------


def _spec(path: str, base: str, data: AnsibleData) -> FleetSpec:
    files: dict[str, dict[str, Value]] = {}
    hosts = []
    for group in data.groups.values():  # names become paths (group_vars/NAME) and cache folders: check first
        if group.name != ALL:
            check_spec_name(group.name, group.where, "group")
    for host in data.hosts.values():
        check_spec_name(host.name, host.where, "host")
        if host.name in data.groups:
            raise InventoryError(host.where, None, f"host {host.name!r} is also the name of a group: rename one")
        hosts.append(_host_spec(host, _host_vars(data, host, base, files)))
    groups = tuple(
        GroupSpec(g.name, g.where, tuple(g.hosts), tuple(g.children), MappingProxyType(_plain_vars(g.vars)))
        for g in data.groups.values()
    )
    order = tuple(g.name for g in _sorted_groups(data, list(data.groups)))
    return FleetSpec(path, tuple(hosts), groups, order, DEFAULT_SSH_CONFIG)


def _plain_vars(values: Mapping[str, Value]) -> dict[str, object]:
    return {key: _plain(value) for key, value in values.items()}


def _host_spec(host: RawHost, values: dict[str, Value]) -> HostSpec:
    fields: dict[str, Any] = {}
    origins: dict[str, str] = {}
    free: dict[str, object] = {}

    def ctx(value: Value, name: str) -> Context:
        folder = os.path.abspath(os.path.dirname(value.where.file))
        return Context(Document(value.where.file, folder), name, host.name)

    for key, value in values.items():
        _check_supported(key, value, host.name)
    for key, value in [(k, values[k]) for k in _SSH_ARGS if k in values]:
        for name, parsed in ssh_args(value, ctx(value, key)).items():
            fields[name] = _merge(fields.get(name), parsed)
            origins[name] = str(value.where)
    for name, keys in _ANSIBLE_FIELDS.items():
        chosen = next((k for k in keys if k in values), None)
        if chosen is not None:
            value = values[chosen]
            parsed = _ANSIBLE_PARSERS[name](value.node, ctx(value, chosen))
            if parsed is not None:  # None: `auto` python, our default
                fields[name], origins[name] = parsed, str(value.where)
    connection = values.get("ansible_connection")
    if connection is not None and _connection(connection, ctx(connection, "ansible_connection")) == "local":
        fields["host"], origins["host"] = "local", str(connection.where)
    for key, value in values.items():
        if key.startswith("deploy_"):
            name = key.removeprefix("deploy_")
            if name not in DEPLOY_FIELDS:
                raise ctx(value, key).error(value.node, f"unknown deploy_ variable{did_you_mean(name, DEPLOY_FIELDS)} "
                                                        f"(known: {', '.join('deploy_' + f for f in DEPLOY_FIELDS)})")
            fields[name] = _merge(fields.get(name), LAYER[name](value.node, ctx(value, key)))
            origins[name] = str(value.where)
        elif not key.startswith("ansible_") or key not in _MAPPED:
            free[key] = _plain(value)
            origins[f"vars.{key}"] = str(value.where)
    fields.setdefault("host", host.name)
    origins.setdefault("host", str(host.where))
    return HostSpec(host.name, host.where, fields, MappingProxyType(free), MappingProxyType(origins))


def _merge(below: object, value: object) -> object:
    if isinstance(below, dict) and isinstance(value, dict):
        return {**below, **value}
    return value


def _check_supported(key: str, value: Value, host: str) -> None:
    problem = _UNSUPPORTED.get(key) or next((p for k, p in _UNSUPPORTED_PREFIXES.items() if key.startswith(k)), None)
    if problem is not None:
        raise InventoryError(value.where, key, f"host {host!r}: {problem}", device=host)
    for node in _walk(value.node):
        if node.tag == "!vault" or (isinstance(node, ScalarNode) and str(node.value).startswith("$ANSIBLE_VAULT;")):
            raise InventoryError(Where(value.where.file, line_of(node)), key,
                                 f"host {host!r}: a vaulted value: vault is not supported", device=host)
        if node.tag == "!unsafe":
            problem = f"host {host!r}: the !unsafe tag is not supported: write the text plainly"
            raise InventoryError(Where(value.where.file, line_of(node)), key, problem, device=host)
    if (key in _MAPPED or key.startswith("deploy_")) and any(
        isinstance(n, ScalarNode) and "{{" in str(n.value) for n in _walk(value.node)
    ):
        raise InventoryError(value.where, key, f"host {host!r}: a Jinja template: deployer does not expand "
                                               "templates; write the value itself", device=host)


def _walk(node: Node, depth: int = 0) -> Iterator[Node]:
    yield node
    if depth > 64:
        return
    if isinstance(node, SequenceNode):
        for item in node.value:
            yield from _walk(item, depth + 1)
    elif isinstance(node, MappingNode):
        for key, item in node.value:
            yield from _walk(key, depth + 1)
            yield from _walk(item, depth + 1)


def _parse_python(node: Node, ctx: Context) -> str | None:
    value = parse_text(node, ctx)
    return None if value.startswith("auto") else value  # interpreter discovery: our default, python3


def _parse_identity(node: Node, ctx: Context) -> str:
    return parse_path(node, ctx)


_ANSIBLE_PARSERS: dict[str, Parser] = {
    "host": parse_word, "port": ansible_port, "user": parse_word, "identity_file": _parse_identity,
    "python": _parse_python,
}
_MAPPED = frozenset(k for keys in _ANSIBLE_FIELDS.values() for k in keys) | {"ansible_connection", *_SSH_ARGS}


def _connection(value: Value, ctx: Context) -> str:
    kind = parse_word(value.node, ctx)
    if kind in _LOCAL_CONNECTIONS:
        return "local"
    if kind in _SSH_CONNECTIONS:
        return "ssh"
    raise ctx.error(value.node, f"connection {kind!r} is not supported: deployer connects over ssh or runs "
                                "locally (ansible_connection=local)")
