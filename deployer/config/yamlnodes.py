"""Line-tracked YAML: a document read into PyYAML nodes that keep their line, with safe scalars.

For every file format users write (the inventory now; playbooks next): merge keys applied, duplicate keys
refused, dates kept as text, depth bounded, and every error naming file:line. `Context` carries the file and
the device an error is about.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from types import MappingProxyType

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from deployer.errors import InventoryError, Where

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # what PyYAML counts as a line break
_MAX_DEPTH = 64
MAX_EXPANDED = 100_000  # values a free mapping (`vars`) may expand to through aliases
TAG = "tag:yaml.org,2002:"
_STR_TAGS = frozenset({TAG + "str", TAG + "timestamp", TAG + "value"})  # dates stay text, as written
_PLAIN_TAGS = _STR_TAGS | {TAG + t for t in ("null", "bool", "int", "float", "seq", "map", "merge")}
_CONSTRUCTOR = SafeConstructor()

Scalar = str | int | float | bool | None

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


def decode_text(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = _line_at(data[: exc.start].decode("utf-8", errors="replace"), exc.start)
        raise InventoryError(Where(file, line), None, f"not UTF-8 text (byte {exc.start})") from None


def compose(text: str, file: str) -> Node | None:
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
class Document:
    file: str
    base_dir: str  # relative paths in the inventory start here
    pairs: dict[int, dict[str, tuple[Node, Node]]] = field(default_factory=dict)  # by id(node): aliases
    frozen: dict[int, tuple[object, int, int]] = field(default_factory=dict)  # shared nodes: work stays linear


@dataclass(frozen=True, slots=True)
class Context:
    """Where a node sits: the document, the dotted field name and the device, for messages."""

    doc: Document
    field: str = ""
    device: str | None = None

    def sub(self, name: str) -> Context:
        return Context(self.doc, f"{self.field}.{name}" if self.field else name, self.device)

    def error(self, node: Node, problem: str) -> InventoryError:
        where = Where(self.doc.file, line_of(node))
        return InventoryError(where, self.field or None, problem, device=self.device)


def line_of(node: Node) -> int:
    return node.start_mark.line + 1 if node.start_mark is not None else 1


def show_node(node: Node) -> str:
    if node.tag not in _PLAIN_TAGS:
        return f"a value tagged {node.tag}"
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    text = str(node.value)
    if node.tag == TAG + "null":
        return "nothing" if not text else text
    short = text if len(text) <= 40 else text[:37] + "..."
    return repr(short) if node.tag in _STR_TAGS else short


def show_type(node: Node) -> str:
    """What kind of value a node holds, never the value: for fields that may hold a secret (env)."""
    if node.tag in (TAG + "int", TAG + "float"):
        return "a number"
    if node.tag == TAG + "bool":
        return "a boolean"
    if node.tag == TAG + "null":
        return "null"
    return show_node(node) if isinstance(node, (MappingNode, SequenceNode)) else "a value of that kind"


def mapping_pairs(node: Node, ctx: Context, depth: int = 0) -> dict[str, tuple[Node, Node]]:
    """A mapping's entries by key, YAML merge keys (`<<`) applied; a duplicate key is an error."""
    if id(node) in ctx.doc.pairs:
        return ctx.doc.pairs[id(node)]
    if depth > _MAX_DEPTH:
        raise ctx.error(node, "merge keys nested too deep (a recursive alias?)")
    if not isinstance(node, MappingNode) or node.tag != TAG + "map":
        raise ctx.error(node, f"expected a mapping (got {show_node(node)})")
    own: dict[str, tuple[Node, Node]] = {}
    merged: dict[str, tuple[Node, Node]] = {}
    for key_node, value_node in node.value:
        if key_node.tag == TAG + "merge":
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                for key, pair in mapping_pairs(source, ctx, depth + 1).items():
                    merged.setdefault(key, pair)  # the first mapping merged wins, as YAML says
            continue
        if not isinstance(key_node, ScalarNode):
            raise ctx.error(key_node, f"a key must be plain text (got {show_node(key_node)})")
        key = str(key_node.value)
        if key in own:
            raise ctx.sub(key).error(key_node, f"duplicate key (first at line {line_of(own[key][0])})")
        own[key] = (key_node, value_node)
    result = own | {key: pair for key, pair in merged.items() if key not in own}
    ctx.doc.pairs[id(node)] = result
    return result


def as_mapping(node: Node, ctx: Context) -> dict[str, tuple[Node, Node]]:
    """Like `mapping_pairs`, with an empty value (`key:` and nothing) read as an empty mapping."""
    return {} if is_null(node) else mapping_pairs(node, ctx)


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == TAG + "null"


def scalar(node: Node, ctx: Context) -> Scalar:
    if not isinstance(node, ScalarNode):
        raise ctx.error(node, f"expected a single value (got {show_node(node)})")
    tag = node.tag
    if tag in _STR_TAGS:
        return str(node.value)
    if tag == TAG + "null":
        return None
    try:  # an explicit tag (`!!int abc`) can hold text its constructor rejects
        if tag == TAG + "bool":
            return SafeConstructor.bool_values[str(node.value).lower()]
        if tag == TAG + "int":
            return _CONSTRUCTOR.construct_yaml_int(node)
        if tag == TAG + "float":
            return _CONSTRUCTOR.construct_yaml_float(node)
    except (KeyError, ValueError, IndexError):
        raise ctx.error(node, f"{show_node(node)} is not a valid {tag.rsplit(':', 1)[-1]}") from None
    raise ctx.error(node, f"unsupported YAML tag {tag!r}: write plain text, a number, a list or a mapping")


def freeze(node: Node, ctx: Context, depth: int = 0) -> tuple[object, int]:
    """A free value (`vars`) made immutable (mappings -> MappingProxyType, lists -> tuples), and its height.

    Shared nodes (aliases) are frozen once; the height bounds the nesting they can build, and the expanded
    size (every value counted as often as aliases repeat it) bounds what `describe` and JSON would write out:
    an alias bomb (a list of nine aliases of a list of nine aliases ...) is refused here, not expanded later.
    """
    if id(node) in ctx.doc.frozen:
        seen = ctx.doc.frozen[id(node)]
        return seen[0], seen[1]
    if depth > _MAX_DEPTH:
        raise ctx.error(node, f"nested over {_MAX_DEPTH} levels deep (a recursive alias?)")
    value: object
    if isinstance(node, SequenceNode) and node.tag == TAG + "seq":
        children = [(item, ctx) for item in node.value]
    elif isinstance(node, (MappingNode, SequenceNode)):
        children = [(v, ctx.sub(key)) for key, (_, v) in mapping_pairs(node, ctx, depth).items()]
    else:
        children = []
    items = [freeze(child, child_ctx, depth + 1) for child, child_ctx in children]
    if isinstance(node, SequenceNode) and node.tag == TAG + "seq":
        value = tuple(item for item, _ in items)
    elif isinstance(node, (MappingNode, SequenceNode)):
        keys = list(mapping_pairs(node, ctx, depth))
        value = MappingProxyType({key: item for key, (item, _) in zip(keys, items, strict=True)})
    else:
        value = scalar(node, ctx)
    height = 1 + max((h for _, h in items), default=0)
    if height > _MAX_DEPTH:
        raise ctx.error(node, f"nested over {_MAX_DEPTH} levels deep (through aliases)")
    size = 1 + sum(ctx.doc.frozen[id(child)][2] for child, _ in children)
    if size > MAX_EXPANDED:
        raise ctx.error(node, f"expands to over {MAX_EXPANDED} values through YAML aliases (an alias bomb?)")
    ctx.doc.frozen[id(node)] = (value, height, size)
    return value, height


def to_plain(value: object) -> object:
    """Records, mappings and tuples as JSON-able dicts and lists; a `Where` as its `file:line` text."""
    if isinstance(value, Where):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [to_plain(item) for item in value]
    return value
