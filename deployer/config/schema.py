"""The fields a device may set, with their parsers: shared by our YAML inventory and the formats that map
their own variables onto these fields (`deploy_*` in Ansible inventories)."""

from __future__ import annotations

import re

from yaml.nodes import Node

from deployer.config.fields import (
    Parser,
    as_finite,
    optional,
    parse_bool,
    parse_choice,
    parse_index_or_text,
    parse_jump,
    parse_path,
    parse_port,
    parse_remote_dir,
    parse_retries,
    parse_seconds,
    parse_text,
    parse_text_map,
    parse_vars,
    parse_word,
    section,
)
from deployer.config.yamlnodes import Context, scalar, show_node

DEVICE_TYPES = ("gpu", "cpu", "accelerator", "any")
HOST_KEY_CHECKING = ("strict", "accept-new")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _parse_library(node: Node, ctx: Context) -> str:
    """`opencl.library`: a path on the board, absolute, or a bare file name the board's dynamic loader finds."""
    value = parse_text(node, ctx)
    if not (value.startswith("/") or "/" not in value) or value.endswith("/"):
        raise ctx.error(node, f"expected an absolute path on the device or a library file name such as "
                              f"libOpenCL.so.1 (got {show_node(node)})")
    return value


MAX_PERSIST_S = 7 * 86400


def _parse_persist(node: Node, ctx: Context) -> float:
    """`ssh.persist`: seconds the connection master keeps an unused connection (0: off; docs/inventory.md)."""
    value = as_finite(scalar(node, ctx))
    if value is None or not 0 <= value <= MAX_PERSIST_S or isinstance(scalar(node, ctx), bool):
        raise ctx.error(node, f"expected seconds from 0 (off) to {MAX_PERSIST_S} (got {show_node(node)})")
    return value


OPENCL: dict[str, Parser] = {
    "platform": parse_index_or_text,
    "device": parse_index_or_text,
    "device_type": parse_choice(*DEVICE_TYPES),
    "library": optional(_parse_library),
}

SSH: dict[str, Parser] = {
    "known_hosts": parse_path,
    "host_key_checking": parse_choice(*HOST_KEY_CHECKING),
    "options": parse_text_map(None, "an option name"),
    "agent": parse_bool,
    "persist": _parse_persist,
}

TIMEOUTS: dict[str, Parser] = {"connect": parse_seconds, "command": parse_seconds, "device": optional(parse_seconds)}

LAYER: dict[str, Parser] = {  # what `defaults` and each device may set
    "user": parse_word,
    "port": parse_port,
    "python": parse_text,
    "remote_dir": parse_remote_dir,
    "identity_file": optional(parse_path),
    "proxy_jump": optional(parse_jump),
    "connect_retries": parse_retries,
    "opencl": section(OPENCL),
    "ssh": section(SSH),
    "timeouts": section(TIMEOUTS),
    "env": parse_text_map(_ENV_KEY, "a variable name ([A-Za-z_][A-Za-z0-9_]*)", secret=True),
    "labels": parse_text_map(None, "a label name"),
    "vars": parse_vars,
    "share_builds": parse_bool,  # docs/inventory.md "Sharing builds": a trust decision, off by default
}

DEVICE: dict[str, Parser] = {"host": parse_word, **LAYER}

