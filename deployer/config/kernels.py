"""The kernel library: `kernels.yml` -> programs, their variants (build options) and smoke cases.

Pure: reads files, touches no device. A program's key in the MACE cache is MACE's rule applied to its
name and one variant's options (`agent_main.mace_program_key`); its headers are found by following
`#include "..."` lines, so they travel with the source and count in its hash. A variant may require a
device feature (`requires: [cl_khr_fp16]`, `[images]`): `unmet_requirement` says, from a device's
fingerprint, why such a variant is skipped there.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deployer.errors import InputError, Where
from deployer.remote.mace import mace_program_hash, mace_program_key

MANIFEST = "kernels.yml"
DTYPES = ("float32", "float16", "int32", "uint32", "int8", "uint8")
INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ROLES = ("in", "out", "scalar", "local", "image")
IMAGES = "images"  # a requirement met by CL_DEVICE_IMAGE_SUPPORT; any other one names an extension
EXTENSION = re.compile(r"^cl_[A-Za-z0-9_]+$")


@dataclass(frozen=True, slots=True)
class Arg:
    role: str  # "in" | "out" | "scalar" | "local" | "image" (an RGBA float image2d_t input, shape [h, w, 4])
    name: str
    dtype: str
    shape: tuple[str | int, ...] = ()
    value: float | int | None = None


@dataclass(frozen=True, slots=True)
class KernelSpec:
    entry: str
    sizes: Mapping[str, int]
    global_size: tuple[str | int, ...]
    local_size: tuple[int, ...] | None
    args: tuple[Arg, ...]
    reference: str | None
    tolerance: Mapping[str, float]  # by dtype, or by variant name (which wins)
    where: Where
    bench_sizes: Mapping[str, int] = field(default_factory=dict)  # the `bench` step's sizes (over `sizes`)

    def tolerance_for(self, variant: str, dtype: str) -> float | None:
        return self.tolerance.get(variant, self.tolerance.get(dtype))


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    dtype: str
    options: tuple[str, ...]
    requires: tuple[str, ...] = ()  # "images" or extension names, e.g. "cl_khr_fp16"


def unmet_requirement(requires: Sequence[str], fingerprint: Mapping[str, Any]) -> str | None:
    """Why a device whose fingerprint is given cannot run a variant with these requirements, or None."""
    device = fingerprint.get("device")
    device = device if isinstance(device, Mapping) else {}
    extensions = device.get("extensions")
    extensions = set(extensions) if isinstance(extensions, list) else set()
    for need in requires:
        if need == IMAGES and device.get("image_support") is not True:
            return "needs images; the device has no image support (CL_DEVICE_IMAGE_SUPPORT is false)"
        if need != IMAGES and need not in extensions:
            return f"needs {need}, which the device does not list in CL_DEVICE_EXTENSIONS"
    return None


@dataclass(frozen=True, slots=True)
class Program:
    name: str
    source: str  # relative to the library folder
    headers: tuple[str, ...]  # relative to the library folder, in include order
    variants: tuple[Variant, ...]
    kernels: tuple[KernelSpec, ...]
    where: Where

    def key(self, variant: Variant) -> str:
        return mace_program_key(self.name, list(variant.options))

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


@dataclass(frozen=True, slots=True)
class Library:
    folder: Path
    seed: int
    compile_options: tuple[str, ...]
    programs: tuple[Program, ...]

    def files(self) -> list[str]:
        """Every file that travels to the device, relative to the folder, sorted."""
        names = {p.source for p in self.programs} | {h for p in self.programs for h in p.headers}
        return sorted(names)

    def program_hash(self, program: Program) -> str:
        read = (self.folder / program.source).read_bytes
        return mace_program_hash(read(), [(self.folder / h).read_bytes() for h in program.headers])

    def program(self, name: str) -> Program | None:
        return next((p for p in self.programs if p.name == name), None)

    def skipped(self, fingerprint: Mapping[str, Any]) -> dict[str, str]:
        """{program key: why} for every variant whose `requires` this device does not meet."""
        skipped = {}
        for program in self.programs:
            for variant in program.variants:
                reason = unmet_requirement(variant.requires, fingerprint)
                if reason is not None:
                    skipped[program.key(variant)] = reason
        return skipped


# libyaml's parser when PyYAML has it (its wheels do): the library's manifest parses in ~11 ms instead of ~70,
# on the path of every push. Both give the same marks and the same documents.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """Mappings remember the line of each key (1-based) under `__lines__`."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    lines: dict[str, int] = {"": node.start_mark.line + 1}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[str(key)] = key_node.start_mark.line + 1
    mapping["__lines__"] = lines
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Reader:
    """Typed access to one YAML mapping, with errors that say file:line and field."""

    def __init__(self, file: str, node: Any, what: str, allowed: Sequence[str]) -> None:
        if not isinstance(node, dict):
            raise InputError(Where(file), what, f"expected a mapping, got {type(node).__name__}")
        self.file, self.node, self.what = file, node, what
        self.lines: dict[str, int] = node.get("__lines__", {})
        for key in node:
            if key != "__lines__" and key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(allowed)})"
                raise InputError(self.where(str(key)), f"{what}.{key}", f"unknown field{hint}")

    def where(self, key: str = "") -> Where:
        return Where(self.file, self.lines.get(key, self.lines.get("", 0)))

    def error(self, key: str, problem: str) -> InputError:
        return InputError(self.where(key), f"{self.what}.{key}", problem)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
        if key not in self.node:
            if required:
                raise InputError(self.where(), f"{self.what}.{key}", "missing")
            return default
        value = self.node[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"expected {names}, got {value!r}")
        return value


def _strings(reader: _Reader, key: str) -> tuple[str, ...]:
    values = reader.get(key, list, [])
    if not all(isinstance(v, str) for v in values):
        raise reader.error(key, "expected a list of strings")
    return tuple(values)


def _dims(reader: _Reader, key: str, sizes: Mapping[str, int], *, required: bool = True) -> tuple[str | int, ...]:
    dims = reader.get(key, list, None, required=required) or []
    for dim in dims:
        if isinstance(dim, bool) or not (isinstance(dim, int) and dim > 0 or isinstance(dim, str) and dim in sizes):
            raise reader.error(key, f"{dim!r} is neither a positive integer nor a name in sizes")
    return tuple(dims)


def _arg(file: str, node: Any, what: str, sizes: Mapping[str, int]) -> Arg:
    reader = _Reader(file, node, what, [*ROLES, "shape", "dtype", "value"])
    roles = [r for r in ROLES if r in node]
    if len(roles) != 1:
        raise InputError(reader.where(), what, f"needs exactly one of {', '.join(ROLES)}")
    role = roles[0]
    name = reader.get(role, str, required=True)
    dtype = reader.get("dtype", str, "")
    if dtype and dtype not in DTYPES:
        raise reader.error("dtype", f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    value = reader.get("value", (int, float))
    if role == "scalar" and value is None and name not in sizes:
        raise reader.error(role, f"scalar {name!r} needs a value or a size of that name")
    shape = _dims(reader, "shape", sizes, required=role != "scalar")
    if role == "image" and (len(shape) != 3 or shape[2] != 4 or dtype not in ("", "float32")):
        raise reader.error("shape", "an image is [height, width, 4] (RGBA) of float32")
    return Arg(role, name, dtype, shape, value)


def _kernel(file: str, node: Any, what: str, variants: Sequence[str]) -> KernelSpec:
    allowed = ["entry", "sizes", "bench_sizes", "global", "local", "args", "reference", "tolerance"]
    reader = _Reader(file, node, what, allowed)
    entry = reader.get("entry", str, required=True)
    sizes = {k: v for k, v in reader.get("sizes", dict, {}).items() if k != "__lines__"}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values()):
        raise reader.error("sizes", "every size must be a positive integer")
    bench_sizes = {k: v for k, v in reader.get("bench_sizes", dict, {}).items() if k != "__lines__"}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in bench_sizes.values()):
        raise reader.error("bench_sizes", "every size must be a positive integer")
    unknown = sorted(set(bench_sizes) - set(sizes))
    if unknown:
        raise reader.error("bench_sizes", f"{unknown[0]!r} is not in sizes (bench sizes override sizes: "
                                          f"{', '.join(sorted(sizes)) or 'none'})")
    args = tuple(_arg(file, a, f"{what}.args[{i}]", sizes) for i, a in enumerate(reader.get("args", list, [])))
    local = reader.get("local", list)
    if local is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in local):
        raise reader.error("local", "expected a list of positive integers")
    tolerance = {k: v for k, v in reader.get("tolerance", dict, {}).items() if k != "__lines__"}
    for dtype, value in tolerance.items():
        known = dtype in DTYPES or dtype in variants
        if not known or isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e30:
            raise reader.error("tolerance", f"{dtype}: expected a known dtype or variant name and a number >= 0")
    return KernelSpec(
        entry, sizes, _dims(reader, "global", sizes), tuple(local) if local else None, args,
        reader.get("reference", str), {k: float(v) for k, v in tolerance.items()}, reader.where(),
        {**sizes, **bench_sizes},
    )


def _headers(folder: Path, source: str, where: Where) -> tuple[str, ...]:
    """Headers a source includes with `#include "..."`, transitively, in first-include order."""
    found: list[str] = []
    pending = [source]
    while pending:
        current = pending.pop(0)
        path = folder / current
        if not path.is_file():
            raise InputError(where, "source", f"{current}: no such file in {folder}")
        for match in INCLUDE.finditer(path.read_bytes()):
            name = match.group(1).decode("utf-8", "replace")
            header = (Path(current).parent / name).as_posix()
            if header.startswith("../") or Path(header).is_absolute():
                raise InputError(where, "source", f"{current} includes {name!r}, outside the library")
            if header not in found:
                found.append(header)
                pending.append(header)
    return tuple(found)


def _program(folder: Path, file: str, name: str, node: Any) -> Program:
    what = f"programs.{name}"
    reader = _Reader(file, node, what, ["source", "variants", "kernels"])
    if not NAME.match(name):
        raise InputError(reader.where(), what, "a program name must be a C identifier")
    source = reader.get("source", str, f"{name}.cl")
    variants = []
    for vname, vnode in reader.get("variants", dict, required=True).items():
        if vname == "__lines__":
            continue
        vreader = _Reader(file, vnode, f"{what}.variants.{vname}", ["dtype", "options", "requires"])
        dtype = vreader.get("dtype", str, "float32")
        if dtype not in DTYPES:
            raise vreader.error("dtype", f"unknown dtype {dtype!r}")
        requires = _strings(vreader, "requires")
        bad = [r for r in requires if r != IMAGES and not EXTENSION.match(r)]
        if bad:
            raise vreader.error("requires", f"{bad[0]!r} is neither {IMAGES!r} nor an extension name (cl_...)")
        variants.append(Variant(str(vname), dtype, _strings(vreader, "options"), requires))
    names = [v.name for v in variants]
    kernels = tuple(_kernel(file, k, f"{what}.kernels[{i}]", names)
                    for i, k in enumerate(reader.get("kernels", list, [])))
    return Program(name, source, _headers(folder, source, reader.where("source")), tuple(variants), kernels,
                   reader.where())


def load_library(folder: Path) -> Library:
    """Read `<folder>/kernels.yml`; every problem is an `InputError` naming file:line and field."""
    path = folder / MANIFEST
    file = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        hint = "; name the library's folder with --kernels DIR (default: ./kernels)" if not folder.is_dir() else ""
        raise InputError(Where(file), None, f"cannot read the kernel manifest: {exc.strerror}{hint}") from exc
    try:
        document = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        raise InputError(Where(file, line), None, f"YAML syntax error: {getattr(exc, 'problem', exc)}") from exc
    except (ValueError, TypeError, RecursionError) as exc:
        # A tag PyYAML cannot construct (`!!int abc`) or nesting deep enough to exhaust the stack.
        raise InputError(Where(file), None, f"not a valid kernel manifest: {type(exc).__name__}: {exc}") from exc
    reader = _Reader(file, document, "kernels", ["seed", "compile_options", "programs"])
    programs = tuple(
        _program(folder, file, str(name), node)
        for name, node in reader.get("programs", dict, required=True).items() if name != "__lines__"
    )
    return Library(folder, reader.get("seed", int, 0), _strings(reader, "compile_options"), programs)
