"""An Ansible inventory in YAML form, read as ansible-core's `yaml` plugin reads it: top-level keys are
groups (usually just `all`), each a mapping of `hosts` (host pattern -> vars or nothing), `children` (group
name -> the same kind of mapping) and `vars`. Where Ansible warns and skips (a group that is a list, an unknown
key) we stop with file:line instead.
"""

from __future__ import annotations

from yaml.nodes import MappingNode, Node, ScalarNode

from deployer.config.formats.ansible_data import AnsibleData, Value
from deployer.config.formats.model import RangeError, expand_range, split_address
from deployer.config.yamlnodes import TAG, Context, is_null, line_of, mapping_pairs, show_node
from deployer.errors import Where

_SECTIONS = ("hosts", "children", "vars")


def parse_yaml(root: Node, ctx: Context, data: AnsibleData) -> None:
    """Add the YAML inventory composed in `root` to `data`."""
    pairs = mapping_pairs(root, ctx)
    if "plugin" in pairs:
        raise ctx.sub("plugin").error(pairs["plugin"][0], "an inventory plugin's configuration: inventory plugins "
                                      "are not supported (export the hosts with ansible-inventory -y --list)")
    for name, (key_node, value) in pairs.items():
        _group(name, key_node, value, ctx, data)


def _group(name: str, key_node: Node, node: Node, ctx: Context, data: AnsibleData) -> str:
    here = ctx.sub(name)
    if not isinstance(key_node, ScalarNode) or is_null(key_node) or not name:
        raise here.error(key_node, "expected a group name")
    if not is_null(node) and not (isinstance(node, MappingNode) and node.tag == TAG + "map"):
        raise here.error(node, f"group {name!r} must be a mapping of hosts, children and vars (got {show_node(node)})")
    data.add_group(name, Where(ctx.doc.file, line_of(key_node)))
    if is_null(node):
        return name
    for section, (section_key, value) in mapping_pairs(node, here).items():
        at = here.sub(section)
        if section not in _SECTIONS:
            raise at.error(section_key, "unknown key in a group: expected hosts, children or vars")
        if is_null(value):
            continue
        entries: dict[str, tuple[Node, Node]]
        if isinstance(value, ScalarNode) and section != "vars":  # `hosts: web1` means {web1: null}
            entries = {str(value.value): (value, _null_like(value))}
        elif isinstance(value, MappingNode) and value.tag == TAG + "map":
            entries = mapping_pairs(value, at)
        else:
            raise at.error(value, f"expected a mapping (got {show_node(value)})")
        for key, (inner_key, inner) in entries.items():
            if section == "vars":
                data.set_group_var(name, key, Value(inner, Where(ctx.doc.file, line_of(inner_key))))
            elif section == "children":
                data.add_child(name, _group(key, inner_key, inner, at, data))
            else:
                _hosts(key, inner_key, inner, name, at, data)
    return name


def _null_like(node: Node) -> Node:
    return ScalarNode(TAG + "null", "", node.start_mark, node.end_mark)


def _hosts(pattern: str, key_node: Node, node: Node, group: str, ctx: Context, data: AnsibleData) -> None:
    where = Where(ctx.doc.file, line_of(key_node))
    if key_node.tag != TAG + "str":
        raise ctx.error(key_node, f"host pattern {show_node(key_node)} must be text: quote it")
    address = split_address(pattern)
    name, port = address if address is not None else (pattern, None)
    try:
        names = expand_range(name)
    except RangeError as exc:
        raise ctx.error(key_node, f"host range {name!r}: {exc}") from None
    values: dict[str, Value] = {}
    if not is_null(node):
        for key, (var_key, value) in mapping_pairs(node, ctx.sub(pattern)).items():
            values[key] = Value(value, Where(ctx.doc.file, line_of(var_key)))
    for host in names:
        data.add_host(host, group, where, port).vars.update(values)
