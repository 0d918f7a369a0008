"""`deploy push --mace-programs SRC --mace-kernels DIR`: the programs a MACE app uses, as a kernel library.

SRC names the programs: a MACE cache file (either container generation; e.g. one `deploy collect` pulled
from a board where the app ran once) or a text file of program keys, one per line (`#` comments, blank
lines ignored). DIR is MACE's OpenCL kernel folder (`mace/ops/opencl/cl` of the app's MACE tree). Each key
is a program name and its build options (docs/mace.md, "Keys and hashes"); the program is `<name>.cl` in DIR,
plus `common.h` when the source has MACE's `#include <common.h>` line. Before any board is touched, the
files' hashes are checked against SRC's `program_hash_` entries: a folder other than the one the app's
libmace was built from would give programs MACE then rebuilds. Every problem is an `InputError` naming the
file (and line for a key list) and what was expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from deployer.config.kernels import Library, Program, Variant
from deployer.errors import InputError, Where
from deployer.remote.mace import (
    DEVICE_NAME_KEY,
    PLATFORM_INFO_KEY,
    PROGRAM_HASH_PREFIX,
    decode_any,
    mace_program_hash,
)

# What MACE adds to a program's options when it compiles it (`OpenclExecutor::BuildProgram`): not in the key.
MACE_BUILD_FLAGS = ("-Werror", "-cl-mad-enable", "-cl-fast-relaxed-math")
COMMON_HEADER = "common.h"
COMMON_INCLUDE = b"#include <common.h>"  # the line MACE's code generator looks for (encrypt_opencl_codegen.py)
MAX_SOURCE_FILE = 256 * 1024 * 1024
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPTION = re.compile(r"-[^\s]*")


@dataclass(frozen=True, slots=True)
class MacePrograms:
    library: Library  # one Program per name, one variant per key; no smoke cases (MACE's kernels have no reference)
    keys: tuple[str, ...]
    mace_version: str | None  # the app's MaceVersion(), from SRC's platform entry (a cache file only)
    source_kind: str  # "cache" | "keys"


def _split_key(key: str) -> tuple[str, list[str]] | None:
    name, *options = key.split(" ")
    if not _NAME.fullmatch(name) or not all(o == "" or _OPTION.fullmatch(o) for o in options):
        return None
    return name, options


def _read_keys(path: Path, data: bytes, cache_error: str) -> list[tuple[str, Where]]:
    expected = ("expected a MACE cache file (mace_cl_compiled_program.bin, either generation) or a text file of "
                "program keys, one per line, such as 'activation -DDATA_TYPE=float -DUSE_RELU'")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(Where(str(path)), "--mace-programs",
                         f"neither a MACE cache file ({cache_error}) nor UTF-8 text: {expected}") from None
    keys: list[tuple[str, Where]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if _split_key(line) is None:
            raise InputError(Where(str(path), number), "--mace-programs",
                             f"not a program key (got {line[:80]!r}): {expected}")
        keys.append((line, Where(str(path), number)))
    if not keys:
        raise InputError(Where(str(path)), "--mace-programs", f"no program key in the file: {expected}")
    return keys


def _read_source(path: Path) -> tuple[list[tuple[str, Where]], dict[str, str], str | None, str]:
    """(keys with where, program_hash_ entries, the app's MaceVersion or None, kind) of SRC."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(Where(str(path)), "--mace-programs", f"cannot read the file: {exc.strerror}") from exc
    try:
        _, pairs = decode_any(data)
    except ValueError as exc:
        return _read_keys(path, data, str(exc)), {}, None, "keys"
    keys: list[tuple[str, Where]] = []
    hashes: dict[str, str] = {}
    version: str | None = None
    for key, value in pairs:
        if key == PLATFORM_INFO_KEY:
            version = value.decode("utf-8", "replace").rsplit(", ", 1)[-1]
        elif key.startswith(PROGRAM_HASH_PREFIX):
            hashes.setdefault(key[len(PROGRAM_HASH_PREFIX):], value.decode("ascii", "replace"))
        elif key != DEVICE_NAME_KEY and key not in dict(keys):
            keys.append((key, Where(str(path))))
    bad = next((k for k, _ in keys if _split_key(k) is None), None)
    if bad is not None or not keys:
        problem = f"holds an entry that is not a program key: {bad[:80]!r}" if bad else "holds no compiled program"
        raise InputError(Where(str(path)), "--mace-programs", f"a MACE cache file that {problem}")
    return keys, hashes, version, "cache"


def load_mace_programs(src: Path, kernels: Path) -> MacePrograms:
    """Read SRC and DIR and check them against each other; nothing touches a device."""
    keys, hashes, version, kind = _read_source(src)
    if not kernels.is_dir():
        raise InputError(Where(str(kernels)), "--mace-kernels", "not a folder: expected MACE's OpenCL kernel folder "
                                                                "(mace/ops/opencl/cl of the app's MACE tree)")
    variants: dict[str, list[Variant]] = {}
    headers: dict[str, tuple[str, ...]] = {}
    wheres: dict[str, Where] = {}
    for key, where in keys:
        split = _split_key(key)
        assert split is not None  # checked as SRC was read
        name, options = split
        source = kernels / f"{name}.cl"
        if not source.is_file():
            raise InputError(where, "--mace-programs", f"key {key!r}: no {name}.cl in the --mace-kernels folder "
                                                       f"{kernels}")
        if name not in headers:
            try:
                data = source.read_bytes()
                headers[name] = (COMMON_HEADER,) if COMMON_INCLUDE in data else ()
                header_bytes = [(kernels / h).read_bytes() for h in headers[name]]
            except OSError as exc:
                raise InputError(Where(str(kernels)), "--mace-kernels",
                                 f"program {name!r}: cannot read {exc.filename}: {exc.strerror}") from exc
            ours = mace_program_hash(data, header_bytes)
            _check_hash(name, ours, hashes, keys, src, kernels)
            wheres[name] = where
        bucket = variants.setdefault(name, [])
        bucket.append(Variant(f"key{len(bucket)}", "float32", tuple(options)))
    programs = tuple(Program(name, f"{name}.cl", headers[name], tuple(v), (), wheres[name])
                     for name, v in variants.items())
    library = Library(kernels, 0, MACE_BUILD_FLAGS, programs)
    return MacePrograms(library, tuple(k for k, _ in keys), version, kind)


def _check_hash(name: str, ours: str, hashes: dict[str, str], keys: list[tuple[str, Where]], src: Path,
                kernels: Path) -> None:
    """Every key of program `name` that SRC hashes must carry the hash of DIR's files."""
    for key, _ in keys:
        if key.split(" ", 1)[0] == name and key in hashes and hashes[key] != ours:
            files = f"{name}.cl" + (f" and {COMMON_HEADER}" if len(ours) > 10 else "")
            raise InputError(Where(str(src)), "--mace-programs",
                             f"program {key!r}: {src.name} holds program_hash_ {hashes[key]!r}, but {files} in "
                             f"{kernels} hash to {ours!r}: --mace-kernels must be the kernel folder the app's "
                             f"libmace was built from")
