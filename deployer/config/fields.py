"""Field parsers for line-tracked YAML: each takes a node and a `Context` and returns a plain value or raises an
`InventoryError` naming file:line and the field; `parse_fields` checks a mapping against a closed schema.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

from yaml.nodes import Node, ScalarNode

from deployer.config import sshconfig
from deployer.config.files import MAX_NAMED_FILE, unfit_file
from deployer.config.yamlnodes import (
    CONTROL,
    Context,
    Scalar,
    as_mapping,
    freeze,
    is_null,
    mapping_pairs,
    scalar,
    show_node,
    show_type,
)

MAX_CONNECT_RETRIES = 10
ALL = ("all", "*")  # --limit patterns meaning every device; `all` is no device or group name
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")  # a device name becomes a folder name

# --- fields -----------------------------------------------------------------------------------------------

Parser = Callable[[Node, Context], object]


def parse_fields(
    node: Node, ctx: Context, schema: Mapping[str, Parser], skip: Collection[str] = ()
) -> dict[str, Any]:
    """Parse a mapping against a closed schema: an unknown key is an error naming the closest valid one."""
    out: dict[str, Any] = {}
    for key, (key_node, value_node) in as_mapping(node, ctx).items():
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


def parse_text(node: Node, ctx: Context) -> str:
    value = scalar(node, ctx)
    if not isinstance(value, str) or not value or CONTROL.search(value):
        raise ctx.error(node, f"expected non-empty text on one line (got {show_node(node)})")
    return value


# A remote dir goes into the board's shell command line: plain path characters only, and never a leading `-`
# (an option to mkdir and python). `~` alone or first is the login's home, expanded on the board.
_REMOTE_DIR = re.compile(r"(~/|/|[A-Za-z0-9._+@%])[A-Za-z0-9._+@%/-]*|~")


def parse_remote_dir(node: Node, ctx: Context) -> str:
    value = parse_text(node, ctx)
    if not _REMOTE_DIR.fullmatch(value):
        raise ctx.error(node, f"expected a path of letters, digits and . _ + @ % / - that starts with ~/, / or a "
                              f"letter or digit: no spaces, quotes or a leading '-', since it goes into the "
                              f"board's shell command (got {show_node(node)})")
    return value


def parse_word(node: Node, ctx: Context) -> str:
    value = parse_text(node, ctx)
    if any(char.isspace() for char in value):
        raise ctx.error(node, f"expected one word, no spaces (got {show_node(node)})")
    return value


def parse_name(node: Node, ctx: Context) -> str:
    """A device or group name: text as written (quoted or not), checked later by `check_name`."""
    if not isinstance(node, ScalarNode) or is_null(node):
        raise ctx.error(node, f"expected a name (got {show_node(node)})")
    return str(node.value)


def check_name(name: str, node: Node, ctx: Context, kind: str) -> None:
    if name in ALL:
        raise ctx.error(node, f"{name!r} means every device in --limit: pick another {kind} name")
    check_word(name, node, ctx, kind)


def check_word(name: str, node: Node, ctx: Context, kind: str) -> None:
    """The device name rule, for any name that may become a folder or a key: a playbook, a step."""
    if not NAME.fullmatch(name):
        rule = "up to 255 letters, digits, '.', '_', '-', starting with a letter or digit"
        raise ctx.error(node, f"invalid {kind} name {name!r}: {rule}")


def parse_integer(low: int, high: int | None = None) -> Callable[[Node, Context], int]:
    """An integer from `low` to `high` (None: no upper bound); `true`, `'3'` and `3.0` are refused."""
    span = f"{low}-{high}" if high is not None else f">= {low}"

    def parse(node: Node, ctx: Context) -> int:
        value = scalar(node, ctx)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise ctx.error(node, f"expected an integer {span} (got {show_node(node)})")
        return value

    return parse


parse_port = parse_integer(1, 65535)


def as_finite(value: Scalar) -> float | None:
    """A number as a finite float; None for anything else (text, a boolean, nan, inf, an int past float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse_seconds(node: Node, ctx: Context) -> float:
    value = as_finite(scalar(node, ctx))
    if value is None or value <= 0:
        raise ctx.error(node, f"expected a number of seconds > 0 (got {show_node(node)})")
    return value


parse_retries = parse_integer(0, MAX_CONNECT_RETRIES)


def parse_bool(node: Node, ctx: Context) -> bool:
    value = scalar(node, ctx)
    if not isinstance(value, bool):
        raise ctx.error(node, f"expected true or false (got {show_node(node)})")
    return value


def parse_jump(node: Node, ctx: Context) -> str:
    """`proxy_jump`: checked here for its form; resolved once every device is known (`_with_jumps`)."""
    value = parse_word(node, ctx)
    try:
        sshconfig.parse_jump(value)
    except ValueError as exc:
        raise ctx.error(node, str(exc)) from None
    return value


def parse_path(node: Node, ctx: Context) -> str:
    """A controller path: `~` is the controller user's home; relative to the inventory's folder. If it exists
    it must be a regular file of sane size (what it names is read whole later: keys, known_hosts, configs)."""
    path = os.path.join(ctx.doc.base_dir, os.path.expanduser(parse_text(node, ctx)))
    problem = unfit_file(path, MAX_NAMED_FILE)
    if problem is not None:
        raise ctx.error(node, f"{path}: {problem}")
    return path


def optional(parser: Parser) -> Parser:
    return lambda node, ctx: None if is_null(node) else parser(node, ctx)


def parse_choice(*choices: str) -> Parser:
    def parse(node: Node, ctx: Context) -> str:
        value = scalar(node, ctx)
        if not isinstance(value, str) or value not in choices:
            close = difflib.get_close_matches(str(value).lower(), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ctx.error(node, f"expected one of {', '.join(choices)} (got {show_node(node)}){hint}")
        return value

    return parse


def parse_index_or_text(node: Node, ctx: Context) -> int | str | None:
    value = scalar(node, ctx)
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ctx.error(node, f"expected an index >= 0, a name substring or nothing (got {show_node(node)})")


def parse_text_map(key_re: re.Pattern[str] | None, what: str, *, secret: bool = False) -> Parser:
    """A mapping of text to text; `key_re` restricts its keys. `secret`: the values may be tokens, so an error
    about one names its key and its type, never the value."""

    def parse(node: Node, ctx: Context) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, (key_node, value_node) in as_mapping(node, ctx).items():
            if not key or (key_re is not None and not key_re.fullmatch(key)):
                raise ctx.error(key_node, f"{key!r} is not {what}")
            value = scalar(value_node, ctx.sub(key))
            if not isinstance(value, str):
                got = show_type(value_node) if secret else show_node(value_node)
                raise ctx.sub(key).error(value_node, f"expected text (got {got}): quote it")
            out[key] = value
        return out

    return parse


def parse_vars(node: Node, ctx: Context) -> Mapping[str, object]:
    if is_null(node):
        return MappingProxyType({})
    mapping_pairs(node, ctx)  # a mapping, not a list or a value
    return cast(Mapping[str, object], freeze(node, ctx)[0])


def section(schema: Mapping[str, Parser]) -> Parser:
    return lambda node, ctx: parse_fields(node, ctx, schema)


def did_you_mean(name: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
