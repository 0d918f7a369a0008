"""`deploy inventory convert --to yaml`: any inventory written out in our YAML format, every field of every
device explicit (as resolved: an Ansible host's group_vars, an ssh alias's HostName), so that reading the
result back gives the same devices with the same values. Groups keep their members and children; their
vars are already in each device's `vars`.
"""

from __future__ import annotations

from typing import Any

import yaml

from deployer.config.inventory import Device, Inventory
from deployer.config.yamlnodes import to_plain


def to_yaml(inventory: Inventory) -> str:
    """Our YAML inventory text for `inventory` (env values included: it is the user's own file)."""
    document: dict[str, Any] = {"ssh_config": inventory.ssh_config}
    document["devices"] = [_device(d) for d in inventory.devices]
    groups = {
        name: {"members": list(g.members), "children": list(g.children)}
        for name, g in inventory.groups.items()
    }
    if groups:
        document["groups"] = groups
    header = f"# converted by deploy inventory convert from {inventory.path} ({inventory.format})\n"
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _device(device: Device) -> dict[str, Any]:
    plain: dict[str, Any] = {
        "name": device.name,
        "host": "local" if device.is_local else device.host,
        "port": device.port,
        "user": device.user,
        "identity_file": device.identity_file,
        "proxy_jump": device.proxy_jump,
        "connect_retries": device.connect_retries,
        "python": device.python,
        "remote_dir": device.remote_dir,
        "opencl": to_plain(device.opencl),
        "ssh": to_plain(device.ssh),
        "timeouts": to_plain(device.timeouts),
        "env": dict(device.env),
        "labels": dict(device.labels),
        "vars": to_plain(device.vars),
        "share_builds": device.share_builds,
    }
    return plain
