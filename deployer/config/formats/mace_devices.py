"""MACE's `devices.yml` (the file MACE's tools/device.py reads for ARM Linux boards): a top-level `devices:`
mapping of names to `address`, `username`, `target_abis`, `target_socs`, `models` and `password`.

`address` and `username` say how to reach a board (the ssh config and our defaults fill in the rest);
`target_socs`, `target_abis` and `models` are kept as labels; `password` is never used (deployer logs in
with keys or the SSH agent) and a note says so. A devices.yml of MACE's Android kind (boards reached through
adb by serial number, no address) is refused with a message saying what deployer drives instead.
"""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from deployer.config.fields import check_name, did_you_mean, parse_word
from deployer.config.formats.model import FleetSpec, GroupSpec, HostSpec
from deployer.config.yamlnodes import TAG, Context, Document, compose, decode_text, line_of, mapping_pairs, show_node
from deployer.errors import InventoryError, Where

DEFAULT_SSH_CONFIG = "~/.ssh/config"
_KEYS = ("address", "username", "password", "target_abis", "target_socs", "models", "system")
_LABELS = ("target_socs", "target_abis", "models")
_LINUX = ("arm_linux", "linux", "armlinux")


def parse_mace(source: str | bytes, file: str) -> tuple[FleetSpec, tuple[str, ...]]:
    """The devices of a MACE devices.yml, and the notes to show (each password not used)."""
    text = source if isinstance(source, str) else decode_text(source, file)
    ctx = Context(Document(file, os.path.abspath(os.path.dirname(file))))
    root = compose(text, file)
    if not isinstance(root, MappingNode):
        raise InventoryError(Where(file, 1), None, "expected MACE's devices.yml: a mapping with 'devices'")
    pairs = mapping_pairs(root, ctx)
    if "devices" not in pairs or not isinstance(pairs["devices"][1], MappingNode):
        at = pairs["devices"][1] if "devices" in pairs else root
        raise ctx.sub("devices").error(at, f"expected a mapping of device names (got {show_node(at)})")
    hosts: list[HostSpec] = []
    notes: list[str] = []
    for name, (key_node, node) in mapping_pairs(pairs["devices"][1], ctx.sub("devices")).items():
        check_name(name, key_node, Context(ctx.doc, "name"), "device")
        hosts.append(_device(name, key_node, node, Context(ctx.doc, "", name), notes))
    if not hosts:
        raise ctx.sub("devices").error(pairs["devices"][1], "no devices listed")
    names = tuple(h.name for h in hosts)
    where = Where(file, line_of(pairs["devices"][0]))
    groups = (GroupSpec("all", where, (), ("ungrouped",), MappingProxyType({})),
              GroupSpec("ungrouped", where, names, (), MappingProxyType({})))
    return FleetSpec(file, tuple(hosts), groups, ("ungrouped",), DEFAULT_SSH_CONFIG), tuple(notes)


def _device(name: str, key_node: Node, node: Node, ctx: Context, notes: list[str]) -> HostSpec:
    if not isinstance(node, MappingNode):
        raise ctx.error(node, f"expected a mapping of address, username, target_abis, ... (got {show_node(node)})")
    values = mapping_pairs(node, ctx)
    for key, (at, _) in values.items():
        if key not in _KEYS:
            raise ctx.sub(key).error(at, f"unknown field{did_you_mean(key, _KEYS)} (MACE's devices.yml has: "
                                         f"{', '.join(_KEYS)})")
    system = values.get("system")
    kind = str(system[1].value).lower() if system and isinstance(system[1], ScalarNode) else None
    if "address" not in values or (kind is not None and kind not in _LINUX):
        raise ctx.error(key_node, "this is MACE's Android kind of devices.yml (boards reached through adb by "
                                  "serial number, no address): deployer drives ARM Linux boards over SSH; give "
                                  "each board an address and username, or list it in our inventory format")
    where = Where(ctx.doc.file, line_of(key_node))
    fields: dict[str, Any] = {"host": parse_word(values["address"][1], ctx.sub("address"))}
    origins = {"host": f"{ctx.doc.file}:{line_of(values['address'][0])}"}
    if "username" in values:
        fields["user"] = parse_word(values["username"][1], ctx.sub("username"))
        origins["user"] = f"{ctx.doc.file}:{line_of(values['username'][0])}"
    labels = {key: _label(values[key][1], ctx.sub(key)) for key in _LABELS if key in values}
    if labels:
        fields["labels"] = labels
        origins["labels"] = f"{ctx.doc.file}:{line_of(node)}"
    if "password" in values:
        line = line_of(values["password"][0])
        notes.append(f"{ctx.doc.file}:{line}: device {name!r}: field 'password': not used: deployer logs in with "
                     "keys or the SSH agent (ssh-copy-id the board once)")
    return HostSpec(name, where, fields, MappingProxyType({}), MappingProxyType(origins))


def _label(node: Node, ctx: Context) -> str:
    """A label's text: a value as written, a list joined by ','."""
    items = node.value if isinstance(node, SequenceNode) and node.tag == TAG + "seq" else [node]
    words = []
    for item in items:
        if not isinstance(item, ScalarNode) or not str(item.value):
            raise ctx.error(item, f"expected text or a list of text (got {show_node(item)})")
        words.append(str(item.value))
    return ",".join(words)
