"""`ansible_ssh_common_args`, `ansible_ssh_extra_args` and `ansible_ssh_args` read for what maps onto our
fields (ProxyJump, a `ssh -W` ProxyCommand, Port, User, IdentityFile, known hosts, host key checking, connect
timeout); options with no effect here are passed over, any other is an error naming it (docs/inventory.md).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from typing import Any

from yaml.nodes import Node, ScalarNode

from deployer.config.fields import parse_jump, parse_path, parse_text, parse_word
from deployer.config.formats.ansible_data import Value, node_of
from deployer.config.schema import LAYER
from deployer.config.yamlnodes import TAG, Context, line_of
from deployer.errors import Where

# ssh options with no effect on how deployer connects (connection sharing, keep-alives, logging)
_INERT_OPTIONS = frozenset({
    "controlmaster", "controlpersist", "controlpath", "serveraliveinterval", "serveralivecountmax", "compression",
    "loglevel", "tcpkeepalive", "identitiesonly", "pubkeyauthentication", "passwordauthentication",
    "kbdinteractiveauthentication", "preferredauthentications", "gssapiauthentication", "forwardagent",
    "addkeystoagent", "hashknownhosts", "checkhostip",
})
_INERT_FLAGS = frozenset({"-C", "-q", "-v", "-vv", "-vvv", "-T", "-t", "-tt", "-A", "-a", "-x", "-X", "-4", "-6", "-n"})


def ssh_args(value: Value, ctx: Context) -> dict[str, Any]:
    """What `-o Key=Value`, `-J`, `-p`, `-l`, `-i` in ssh arguments set among our fields."""
    text = parse_text(value.node, ctx)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ctx.error(value.node, f"cannot split these ssh arguments: {exc}") from None
    out: dict[str, Any] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word in _INERT_FLAGS:
            index += 1
            continue
        flag, rest = word[:2], word[2:]
        if flag in ("-o", "-J", "-p", "-l", "-i") and not rest:
            if index + 1 >= len(words):
                raise ctx.error(value.node, f"{word} needs a value")
            index += 1
            rest = words[index]
        index += 1
        if flag == "-o":
            key, _, option = rest.replace("=", " ", 1).partition(" ")
            _ssh_option(key.lower(), option.strip(), value, ctx, out)
        elif flag in _FLAG_OPTIONS:
            _ssh_option(_FLAG_OPTIONS[flag], rest, value, ctx, out)
        else:
            raise ctx.error(value.node, f"ssh argument {word!r} is not supported (supported: -o ProxyJump=, "
                                        "ProxyCommand='ssh -W %h:%p host', Port, User, IdentityFile, "
                                        "StrictHostKeyChecking, UserKnownHostsFile, ConnectTimeout, -J, -p, -l, -i)")
    return out


_FLAG_OPTIONS = {"-J": "proxyjump", "-p": "port", "-l": "user", "-i": "identityfile"}


def _ssh_option(key: str, option: str, value: Value, ctx: Context, out: dict[str, Any]) -> None:
    def node(text: str) -> Node:
        return node_of(text, Where(value.where.file, line_of(value.node)))

    setters: dict[str, Callable[[], None]] = {
        "proxyjump": lambda: out.__setitem__("proxy_jump", LAYER["proxy_jump"](node(option), ctx)),
        "proxycommand": lambda: out.__setitem__("proxy_jump", _proxy_command(option, value, ctx)),
        "port": lambda: out.__setitem__("port", ansible_port(node(option), ctx)),
        "user": lambda: out.__setitem__("user", parse_word(node(option), ctx)),
        "identityfile": lambda: out.__setitem__("identity_file", parse_path(node(option), ctx)),
        "connecttimeout": lambda: out.setdefault("timeouts", {}).__setitem__("connect", _seconds(option, value, ctx)),
    }
    if key in setters:
        setters[key]()
    elif key == "stricthostkeychecking":
        if option.lower() in ("yes", "accept-new"):
            mode = "strict" if option.lower() == "yes" else "accept-new"
            out.setdefault("ssh", {})["host_key_checking"] = mode
        # no, off, ask: never followed, deployer never turns host key checking off (as with the ssh config)
    elif key == "userknownhostsfile":
        first = option.split()[0] if option.split() else ""
        if first and first != "/dev/null":  # /dev/null: goes with checking off, which is never followed
            out.setdefault("ssh", {})["known_hosts"] = parse_path(node(first), ctx)
    elif key not in _INERT_OPTIONS:
        raise ctx.error(value.node, f"ssh option {key!r} is not supported here (supported: ProxyJump, ProxyCommand "
                                    "as 'ssh -W %h:%p host', Port, User, IdentityFile, StrictHostKeyChecking, "
                                    "UserKnownHostsFile, ConnectTimeout)")


def _seconds(option: str, value: Value, ctx: Context) -> float:
    if not option.isdigit() or int(option) <= 0:
        raise ctx.error(value.node, f"ConnectTimeout: expected whole seconds > 0 (got {option!r})")
    return float(option)


def _proxy_command(command: str, value: Value, ctx: Context) -> str:
    """`ssh [-p N] [-l U] -W %h:%p [user@]host` as a ProxyJump hop; any other command is refused."""
    words = shlex.split(command)
    if not words or os.path.basename(words[0]) != "ssh" or "-W" not in words:
        raise ctx.error(value.node, f"ProxyCommand {command!r} is not supported: only 'ssh -W %h:%p host' "
                                    "(write ProxyJump)")
    port: str | None = None
    user: str | None = None
    target: str | None = None
    index = 1
    while index < len(words):
        word = words[index]
        if word in ("-W", "-p", "-l") and index + 1 < len(words):
            if word == "-p":
                port = words[index + 1]
            elif word == "-l":
                user = words[index + 1]
            elif words[index + 1] != "%h:%p":
                raise ctx.error(value.node, f"ProxyCommand: expected -W %h:%p (got {words[index + 1]!r})")
            index += 2
        elif word in _INERT_FLAGS:
            index += 1
        elif not word.startswith("-") and target is None:
            target, index = word, index + 1
        else:
            raise ctx.error(value.node, f"ProxyCommand: {word!r} is not supported (write ProxyJump)")
    if target is None:
        raise ctx.error(value.node, "ProxyCommand: no jump host named")
    spec = (f"{user}@" if user and "@" not in target else "") + target + (f":{port}" if port else "")
    return parse_jump(node_of(spec, Where(value.where.file, line_of(value.node))), ctx)


def ansible_port(node: Node, ctx: Context) -> int:
    """An Ansible port: an integer, or text of digits (Ansible casts it)."""
    text = str(node.value) if isinstance(node, ScalarNode) and node.tag in (TAG + "int", TAG + "str") else ""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ctx.error(node, f"expected a port 1-65535 (got {text or 'a value of another kind'!r})")
    return int(text)
