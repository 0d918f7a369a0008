"""Which format an inventory is in, told by its content (`--fleet-format` overrides): our YAML (a mapping with
`devices:` of `host`s), MACE's devices.yml (`devices:` of `address`/`target_abis`), an Ansible inventory in
YAML (a mapping of groups) or INI (sections of host lines, or bare host lines), an Ansible folder, or
`ssh:alias,...`.
"""

from __future__ import annotations

import os
import re

from yaml.nodes import MappingNode, ScalarNode

from deployer.config.files import MAX_INVENTORY, read_user_file
from deployer.config.formats.ansible import is_ansible_yaml
from deployer.config.formats.ansible_ini import looks_like_ini
from deployer.config.yamlnodes import Context, Document, compose, decode_text, mapping_pairs
from deployer.errors import InventoryError, Where

FORMATS = ("deploy", "ansible", "ansible-ini", "ansible-yaml", "mace", "ssh")
SSH_PREFIX = "ssh:"
_MACE_KEYS = frozenset({"address", "username", "target_abis", "target_socs", "models", "password", "serialno"})
_YAML_KEY_LINE = re.compile(r"\s*[^#;\s\[][^=]*:(\s|$)")


def detect(path: str) -> str:
    """The format of the inventory at `path`: one of FORMATS."""
    if path.startswith(SSH_PREFIX) and not os.path.exists(path):
        return "ssh"
    if os.path.isdir(path):
        return "ansible"
    raw = read_user_file(path, MAX_INVENTORY, "the inventory", InventoryError)
    if raw is None:
        raise InventoryError(Where(path), None, "no such file")
    text = decode_text(raw, path)
    if text.startswith(("#!", "$ANSIBLE_VAULT;")):
        return "ansible"  # refused there, with the reason
    try:
        root = compose(text, path)
    except InventoryError:
        if looks_like_ini(text) or not any(_YAML_KEY_LINE.match(line) for line in text.splitlines()):
            return "ansible-ini"
        raise
    ctx = Context(Document(path, "."))
    if isinstance(root, ScalarNode) and root.tag.endswith(":str"):
        return "ansible-ini"  # host names one per line read as YAML text
    if not isinstance(root, MappingNode):
        return "ansible-ini" if looks_like_ini(text) or text.lstrip().startswith("[") else "deploy"
    pairs = mapping_pairs(root, ctx)
    if "devices" in pairs:
        return "mace" if _is_mace(pairs["devices"][1], ctx) else "deploy"
    return "ansible-yaml" if is_ansible_yaml(root, ctx) else "deploy"


def _is_mace(node: object, ctx: Context) -> bool:
    if not isinstance(node, MappingNode):
        return False
    entries = [value for _, value in mapping_pairs(node, ctx).values()]
    keys = [set(mapping_pairs(e, ctx)) for e in entries if isinstance(e, MappingNode)]
    return bool(keys) and all("host" not in k for k in keys) and any(k & _MACE_KEYS for k in keys)
