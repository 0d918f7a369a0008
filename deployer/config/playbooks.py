"""Playbooks: the YAML file a nightly run follows (`deploy run PLAYBOOK --fleet INVENTORY`) -> a frozen `Playbook`.

Pure: it reads the playbook and looks at the local paths it names (the kernels folder has a `kernels.yml`, each
model is a file), so that `deploy run --dry-run` catches a wrong path; it touches no device. The format is
docs/playbooks.md. Every problem is a `PlaybookError` naming file:line of the offending node and the field, dotted
and indexed as the YAML nests it (`steps[1].push.keep`); the schema is closed, so a misspelt key is an error that
names the closest valid one. The line-tracked YAML and the field parsers are the inventory's (`yamlnodes`,
`fields`); they raise the inventory's error class, turned into `PlaybookError` at one place, `parse_playbook`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from deployer.config.fields import (
    Parser,
    as_finite,
    check_word,
    did_you_mean,
    optional,
    parse_bool,
    parse_choice,
    parse_fields,
    parse_integer,
    parse_name,
    parse_seconds,
    parse_text,
    parse_text_map,
    section,
)
from deployer.config.files import read_user_file
from deployer.config.kernels import MANIFEST
from deployer.config.yamlnodes import (
    CONTROL,
    TAG,
    Context,
    Document,
    as_mapping,
    compose,
    decode_text,
    is_null,
    line_of,
    mapping_pairs,
    scalar,
    show_node,
)
from deployer.errors import InventoryError, PlaybookError, Where

KINDS = ("health", "push", "smoke", "bench", "collect", "shell")
DEFAULT_TIMEOUTS: Mapping[str, float] = MappingProxyType(
    {"health": 60.0, "push": 900.0, "smoke": 600.0, "bench": 1800.0, "collect": 300.0, "shell": 60.0}
)
DEFAULT_RETRIES = 1
MAX_STEP_RETRIES = 5
SMOKE_MODES = ("changed", "always", "never")  # as `deploy push --smoke`
MACE_FORMATS = ("pb", "legacy")  # as `deploy push --mace-format`
HEALTH_ITEMS = ("reachable", "opencl", "disk")  # a health step's own items: no limit may take these names
MAX_PLAYBOOK = 1 << 20


@dataclass(frozen=True, slots=True)
class Limit:
    """A value read on the device by a command: out of [min, max], the device is `offline` for this run."""

    name: str
    command: str
    scale: float  # value = the number the command prints * scale
    unit: str
    min: float | None
    max: float | None


@dataclass(frozen=True, slots=True)
class HealthStep:
    min_free_mb: int | None  # free space under the device's remote_dir; None: not checked
    limits: tuple[Limit, ...]


@dataclass(frozen=True, slots=True)
class PushStep:
    kernels: Path  # the kernel library folder (with kernels.yml), absolute
    models: tuple[Path, ...]  # absolute
    smoke: str  # one of SMOKE_MODES
    mace_format: str  # one of MACE_FORMATS
    mace_version: str | None  # None: the device's vars.mace_version, else the default (as deploy push)
    keep: int  # releases kept on each device, >= 1


@dataclass(frozen=True, slots=True)
class SmokeStep:
    kernels: Path
    models: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class BenchStep:
    """Latency from the board's current binaries (docs/regressions.md): every kernel case at its bench
    sizes, and each model's forward pass, repeated until both a count and a time are reached."""

    kernels: Path
    models: tuple[Path, ...]
    warmup: int = 3  # runs discarded before timing
    min_repeats: int = 20  # timed runs, at least ...
    min_time_ms: int = 500  # ... and at least this long, whichever ends later
    max_repeats: int = 200  # never more (the history keeps every repeat)
    pause_ms: int = 200  # between items, against heat
    item_timeout_s: float = 60.0  # one item's repeats past this: that item is an `error`
    min_change: float = 0.05  # smaller latency steps are never reported


@dataclass(frozen=True, slots=True)
class CollectStep:
    paths: tuple[str, ...]  # absolute or ~ globs on the device; empty: deploy collect's defaults


@dataclass(frozen=True, slots=True)
class MetricsSpec:
    """How a shell step's output becomes metrics: a regex's named groups, or its top-level JSON numbers."""

    regex: str | None
    json: bool
    units: Mapping[str, str]  # metric name -> unit


@dataclass(frozen=True, slots=True)
class ShellStep:
    command: str
    metrics: MetricsSpec | None
    expect_exit: int


Options = HealthStep | PushStep | SmokeStep | BenchStep | CollectStep | ShellStep


@dataclass(frozen=True, slots=True)
class Step:
    name: str  # unique in the playbook; default: the kind
    kind: str  # one of KINDS
    line: int  # of the step's entry in the playbook
    timeout: float  # seconds for this step on one device
    retries: int  # re-runs after an `error` (never after a `fail`)
    continue_on_error: bool  # the device's later steps run even if this one fails or errors
    options: Options


@dataclass(frozen=True, slots=True)
class Playbook:
    name: str
    file: Path
    sha256: str  # of the file's bytes
    limit: str | None  # the --limit grammar (docs/inventory.md); None: every device
    steps: tuple[Step, ...]


def load_playbook(path: Path) -> Playbook:
    """Read and check the playbook at `path`; raises `PlaybookError` and nothing else."""
    file = os.fspath(path)
    data = read_user_file(file, MAX_PLAYBOOK, "the playbook", PlaybookError)
    if data is None:
        raise PlaybookError(Where(file), None, "no such file")
    return parse_playbook(data, path)


def parse_playbook(source: str | bytes, path: Path) -> Playbook:
    """Check playbook text; `path` names it in messages, and relative paths in it start at its folder."""
    data = source.encode("utf-8", "surrogatepass") if isinstance(source, str) else source
    try:
        text = source if isinstance(source, str) else decode_text(source, os.fspath(path))
        return _playbook(text, path, hashlib.sha256(data).hexdigest())
    except InventoryError as exc:  # what the shared YAML and field parsers raise: the same facts, our class
        raise PlaybookError(exc.where, exc.field, exc.problem) from None


def _playbook(text: str, path: Path, sha256: str) -> Playbook:
    file = os.fspath(path)
    ctx = Context(Document(file, os.path.abspath(os.path.dirname(file))))
    root = compose(text, file)
    if root is None:
        raise PlaybookError(Where(file, 1), None, "empty playbook: expected a mapping with 'name' and 'steps'")
    if not isinstance(root, MappingNode):
        raise ctx.error(root, f"the top level must be a mapping with 'name' and 'steps' (got {show_node(root)})")
    top = parse_fields(root, ctx, _TOP)
    for key, fix in (("name", "name the playbook (a word)"), ("steps", "list the steps")):
        if key not in top:
            raise ctx.sub(key).error(root, f"missing: {fix}")
    steps = _steps(top["steps"], ctx.sub("steps"), top.get("defaults", {}))
    return Playbook(top["name"], path, sha256, top.get("limit"), steps)


def _word(kind: str) -> Callable[[Node, Context], str]:
    def parse(node: Node, ctx: Context) -> str:
        name = parse_name(node, ctx)
        check_word(name, node, ctx, kind)
        return name

    return parse


def _items(node: Node, ctx: Context, what: str) -> list[Node]:
    if not isinstance(node, SequenceNode) or node.tag != TAG + "seq":
        raise ctx.error(node, f"expected a list of {what} (got {show_node(node)})")
    return list(node.value)


def _node(node: Node, ctx: Context) -> Node:
    return node


_COMMON: dict[str, Parser] = {  # what `defaults` and each step may set
    "timeout": parse_seconds,
    "retries": parse_integer(0, MAX_STEP_RETRIES),
    "continue_on_error": parse_bool,
}
_STEP_KEYS: dict[str, Parser] = {key: _node for key in ("name", *KINDS, *_COMMON)}  # parsed one by one

# --- steps ------------------------------------------------------------------------------------------------


def _steps(node: Node, ctx: Context, defaults: Mapping[str, Any]) -> tuple[Step, ...]:
    items = _items(node, ctx, "steps")
    if not items:
        raise ctx.error(node, "no steps: list at least one")
    seen: dict[str, int] = {}
    return tuple(_step(item, Context(ctx.doc, f"{ctx.field}[{i}]"), defaults, seen) for i, item in enumerate(items))


def _step(item: Node, ctx: Context, defaults: Mapping[str, Any], seen: dict[str, int]) -> Step:
    if isinstance(item, ScalarNode) and item.value in KINDS:
        raise ctx.error(item, f"expected a mapping (got {show_node(item)}): write `{item.value}:`, with a colon")
    raw: dict[str, Node] = parse_fields(item, ctx, _STEP_KEYS)  # an unknown key names the closest valid one
    kinds = [key for key in raw if key in KINDS]
    if not kinds:
        raise ctx.error(item, f"no step kind: give exactly one of {', '.join(KINDS)}")
    if len(kinds) > 1:
        key_node = mapping_pairs(item, ctx)[kinds[1]][0]
        raise ctx.sub(kinds[1]).error(key_node, f"a second step kind in one step (after {kinds[0]!r}): "
                                                "split it into two steps")
    kind = kinds[0]
    name = _word("step")(raw["name"], ctx.sub("name")) if "name" in raw else kind
    if name in seen:
        at = raw["name"] if "name" in raw else mapping_pairs(item, ctx)[kind][0]
        fix = "step names are unique" if "name" in raw else f"give the second {kind} step a `name`"
        raise ctx.sub("name").error(at, f"duplicate step name {name!r} (first at line {seen[name]}): {fix}")
    seen[name] = line_of(item)
    common = {**defaults, **{key: _COMMON[key](raw[key], ctx.sub(key)) for key in _COMMON if key in raw}}
    return Step(
        name=name,
        kind=kind,
        line=line_of(item),
        timeout=common.get("timeout", DEFAULT_TIMEOUTS[kind]),
        retries=common.get("retries", DEFAULT_RETRIES),
        continue_on_error=common.get("continue_on_error", False),
        options=_OPTIONS[kind](raw[kind], ctx.sub(kind)),
    )

# --- values -----------------------------------------------------------------------------------------------


def _number(node: Node, ctx: Context) -> float:
    value = as_finite(scalar(node, ctx))
    if value is None:
        raise ctx.error(node, f"expected a number (got {show_node(node)})")
    return value


def _scale(node: Node, ctx: Context) -> float:
    value = _number(node, ctx)
    if value == 0:
        raise ctx.error(node, "expected a number other than 0 (got 0): every value would read 0")
    return value


def _command(node: Node, ctx: Context) -> str:
    """A shell command for the board: text, lines and tabs allowed (a `|` block), no other control character."""
    value = scalar(node, ctx)
    if not isinstance(value, str) or not value.strip() or CONTROL.search(value.replace("\n", "").replace("\t", "")):
        raise ctx.error(node, f"expected a shell command: non-empty text (got {show_node(node)})")
    return value


def _unit(node: Node, ctx: Context) -> str:
    value = scalar(node, ctx)
    if not isinstance(value, str) or CONTROL.search(value):
        raise ctx.error(node, f"expected text on one line, '' for none (got {show_node(node)}): quote it")
    return value


def _local_path(node: Node, ctx: Context) -> str:
    """A controller path: `~` is the user's home; a relative one starts at the playbook's folder."""
    return os.path.normpath(os.path.join(ctx.doc.base_dir, os.path.expanduser(parse_text(node, ctx))))


def _kernels(node: Node, ctx: Context) -> Path:
    path = _local_path(node, ctx)
    if not os.path.isdir(path):
        raise ctx.error(node, f"{path}: {'not a folder' if os.path.exists(path) else 'no such folder'} "
                              "(a relative path starts at the playbook's folder)")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise ctx.error(node, f"{path}: no {MANIFEST} in it: not a kernel library (docs/kernels.md)")
    return Path(path)


def _models(node: Node, ctx: Context) -> tuple[Path, ...]:
    if is_null(node):
        return ()
    out = []
    for item in _items(node, ctx, "model files"):
        path = _local_path(item, ctx)
        if not os.path.isfile(path):
            raise ctx.error(item, f"{path}: {'not a regular file' if os.path.exists(path) else 'no such file'} "
                                  "(a relative path starts at the playbook's folder)")
        out.append(Path(path))
    return tuple(out)


def _globs(node: Node, ctx: Context) -> tuple[str, ...]:
    items = _items(node, ctx, "globs")
    if not items:
        raise ctx.error(node, "an empty list: leave `paths` out for deploy collect's default places")
    patterns = tuple(parse_text(item, ctx) for item in items)
    for pattern, item in zip(patterns, items, strict=True):
        if not (pattern == "~" or pattern.startswith(("/", "~/"))):
            raise ctx.error(item, f"{pattern!r} is relative: give an absolute glob, or one under ~/ (it is looked "
                                  "for on the devices, where no folder is current)")
    return patterns

# --- step kinds -------------------------------------------------------------------------------------------


def _health(node: Node, ctx: Context) -> HealthStep:
    fields = parse_fields(node, ctx, _HEALTH)
    return HealthStep(fields.get("min_free_mb"), fields.get("limits", ()))


def _limits(node: Node, ctx: Context) -> tuple[Limit, ...]:
    if is_null(node):
        return ()
    seen: dict[str, int] = {}
    out = []
    for index, item in enumerate(_items(node, ctx, "limits")):
        here = Context(ctx.doc, f"{ctx.field}[{index}]")
        fields = parse_fields(item, here, _LIMIT)
        for key in ("name", "command"):
            if key not in fields:
                raise here.sub(key).error(item, "missing: each limit needs a name and a command")
        name, pairs = fields["name"], mapping_pairs(item, here)
        if name in HEALTH_ITEMS or name in seen:
            first = f"first at line {seen[name]}" if name in seen else "a health check of its own"
            raise here.sub("name").error(pairs["name"][1], f"{name!r} names another item ({first}): rename it")
        seen[name] = line_of(item)
        low, high = fields.get("min"), fields.get("max")
        if low is None and high is None:
            raise here.error(item, "neither min nor max: give one or both (a limit needs a range)")
        if low is not None and high is not None and low > high:
            raise here.sub("min").error(pairs["min"][1], f"min {low:g} is above max {high:g}")
        out.append(Limit(name, fields["command"], fields.get("scale", 1.0), fields.get("unit", ""), low, high))
    return tuple(out)


def _push(node: Node, ctx: Context) -> PushStep:
    fields = _with_kernels(node, ctx, _PUSH)
    return PushStep(fields["kernels"], fields.get("models", ()), fields.get("smoke", "changed"),
                    fields.get("mace_format", "pb"), fields.get("mace_version"), fields.get("keep", 3))


def _smoke(node: Node, ctx: Context) -> SmokeStep:
    fields = _with_kernels(node, ctx, _SMOKE)
    return SmokeStep(fields["kernels"], fields.get("models", ()))


def _bench(node: Node, ctx: Context) -> BenchStep:
    fields = _with_kernels(node, ctx, _BENCH)
    step = BenchStep(fields["kernels"], fields.get("models", ()),
                     **{k: v for k, v in fields.items() if k not in ("kernels", "models")})
    if step.max_repeats < step.min_repeats:
        raise ctx.sub("max_repeats").error(node, f"max_repeats {step.max_repeats} is below min_repeats "
                                                 f"{step.min_repeats}")
    return step


def _fraction(node: Node, ctx: Context) -> float:
    value = _number(node, ctx)
    if not 0 <= value < 10:
        raise ctx.error(node, f"expected a fraction such as 0.05 for 5% (got {show_node(node)})")
    return value


def _with_kernels(node: Node, ctx: Context, schema: Mapping[str, Parser]) -> dict[str, Any]:
    fields = parse_fields(node, ctx, schema)
    if "kernels" not in fields:
        raise ctx.sub("kernels").error(node, "missing: the kernel library folder (with kernels.yml)")
    return fields


def _collect(node: Node, ctx: Context) -> CollectStep:
    return CollectStep(parse_fields(node, ctx, _COLLECT).get("paths", ()))


def _shell(node: Node, ctx: Context) -> ShellStep:
    fields = parse_fields(node, ctx, _SHELL)
    if "command" not in fields:
        raise ctx.sub("command").error(node, "missing: the shell command to run on the board")
    return ShellStep(fields["command"], fields.get("metrics"), fields.get("expect_exit", 0))


def _metrics(node: Node, ctx: Context) -> MetricsSpec | None:
    if is_null(node):
        return None
    fields = parse_fields(node, ctx, _METRICS)
    regex, as_json, units = fields.get("regex"), fields.get("json", False), fields.get("units", {})
    if (regex is None) == (not as_json):
        which = "both regex and json: true" if regex is not None else "neither regex nor json: true"
        raise ctx.error(node, f"{which}: give a regex with named groups, or json: true")
    if regex is not None:
        at = mapping_pairs(node, ctx)["regex"][1]
        try:
            groups = list(re.compile(regex).groupindex)
        except (re.error, OverflowError, RecursionError) as exc:
            raise ctx.sub("regex").error(at, f"not a valid regex: {exc}") from None
        if not groups:
            raise ctx.sub("regex").error(at, "no named group: name each value, as in (?P<load1>[0-9.]+)")
        units_node = mapping_pairs(node, ctx).get("units", (None, None))[1]
        for key, (key_node, _) in ({} if units_node is None else as_mapping(units_node, ctx)).items():
            if key not in groups:
                raise ctx.sub("units").error(key_node, f"{key!r} is no group of the regex{did_you_mean(key, groups)}")
    return MetricsSpec(regex, as_json, MappingProxyType(units))


_HEALTH: dict[str, Parser] = {"min_free_mb": optional(parse_integer(0)), "limits": _limits}
_LIMIT: dict[str, Parser] = {
    "name": _word("limit"),
    "command": _command,
    "scale": _scale,
    "unit": _unit,
    "min": optional(_number),
    "max": optional(_number),
}
_SMOKE: dict[str, Parser] = {"kernels": _kernels, "models": _models}
_PUSH: dict[str, Parser] = {
    **_SMOKE,
    "smoke": parse_choice(*SMOKE_MODES),
    "mace_format": parse_choice(*MACE_FORMATS),
    "mace_version": optional(parse_text),
    "keep": parse_integer(1),
}
_BENCH: dict[str, Parser] = {
    **_SMOKE,
    "warmup": parse_integer(0, 100),
    "min_repeats": parse_integer(1, 1000),
    "min_time_ms": parse_integer(0, 600000),
    "max_repeats": parse_integer(1, 1000),
    "pause_ms": parse_integer(0, 60000),
    "item_timeout_s": parse_seconds,
    "min_change": _fraction,
}
_COLLECT: dict[str, Parser] = {"paths": optional(_globs)}
_METRICS: dict[str, Parser] = {"regex": parse_text, "json": parse_bool, "units": parse_text_map(None, "a metric name")}
_SHELL: dict[str, Parser] = {"command": _command, "metrics": _metrics, "expect_exit": parse_integer(0, 255)}
_OPTIONS: dict[str, Callable[[Node, Context], Options]] = {
    "health": _health, "push": _push, "smoke": _smoke, "bench": _bench, "collect": _collect, "shell": _shell,
}
_TOP: dict[str, Parser] = {
    "name": _word("playbook"),
    "limit": optional(parse_text),
    "defaults": section(_COMMON),
    "steps": _node,  # read once `defaults` is known
}

# --- for people -------------------------------------------------------------------------------------------


def describe(step: Step) -> str:
    """One line for `deploy run --dry-run`: what the step does and its limits, without its name."""
    tail = f"timeout {step.timeout:g} s, retries {step.retries}"
    tail += ", continue on error" if step.continue_on_error else ""
    return f"{step.kind} {_what(step.options)} ({tail})"


def _what(options: Options) -> str:
    if isinstance(options, HealthStep):
        disk = [] if options.min_free_mb is None else [f"disk >= {options.min_free_mb} MB free"]
        return ", ".join(["reachable", "opencl", *disk, *(_range(limit) for limit in options.limits)])
    if isinstance(options, (PushStep, SmokeStep, BenchStep)):
        count = len(options.models)
        parts = [f"{options.kernels.name}/" + (f" + {count} model{'s' if count != 1 else ''}" if count else "")]
        if isinstance(options, PushStep):  # the smoke mode always; the rest when not the default
            parts.append(f"smoke {options.smoke}")
            parts += [f"mace {options.mace_format}"] if options.mace_format != "pb" else []
            parts += [f"mace_version {options.mace_version}"] if options.mace_version else []
            parts += [f"keep {options.keep}"] if options.keep != 3 else []
        if isinstance(options, BenchStep):
            parts.append(f"{options.min_repeats}-{options.max_repeats} repeats over >= {options.min_time_ms} ms "
                         f"after {options.warmup} warm-up, report steps >= {options.min_change:.0%}")
        return ", ".join(parts)
    if isinstance(options, CollectStep):
        return ", ".join(options.paths) if options.paths else "the default places"
    first = options.command.strip().splitlines()[0]
    parts = [f"`{first if len(first) <= 40 else first[:37] + '...'}`"]
    if options.metrics is not None:
        regex = options.metrics.regex
        parts.append(f"metrics {', '.join(re.compile(regex).groupindex) if regex else 'from json'}")
    parts += [f"expect exit {options.expect_exit}"] if options.expect_exit else []
    return ", ".join(parts)


def _range(limit: Limit) -> str:
    unit = f" {limit.unit}" if limit.unit else ""
    if limit.min is not None and limit.max is not None:
        return f"{limit.name} {limit.min:g}..{limit.max:g}{unit}"
    if limit.max is not None:
        return f"{limit.name} <= {limit.max:g}{unit}"
    return f"{limit.name} >= {limit.min:g}{unit}"
