"""Smoke tests, controller side: inputs from a fixed seed, the numpy reference, the tolerance check.

numpy lives here and never on a device: `plan_smoke` turns the library into agent cases plus one
payload of input bytes; `compare` checks the output bytes the device sent back against the reference.
A kernel passes when every element satisfies |out - ref| <= tol * (1 + |ref|) for its tolerance (the
variant's own, else its dtype's). A variant whose `requires` a device lacks is skipped there, with the
reason (`Library.skipped`). `parse_startup` reads the start-up figures of the agent's `startup` op.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from deployer.cache.store import read_json, write_json
from deployer.config.kernels import Arg, KernelSpec, Library, Program, Variant
from deployer.errors import DeviceError, InputError, LocalStateError, Where
from deployer.protocol.reply import MAX_ERROR, Fields, Reply
from deployer.text import visible

if TYPE_CHECKING:  # numpy is imported where it is used: a push that runs nothing never loads it
    import numpy as np

REFERENCE_MODULE = "reference.py"


@dataclass(frozen=True, slots=True)
class KernelResult:
    """One kernel of one variant on one device: the JSON contract's `kernels[]` entry."""

    name: str
    program_key: str
    built: bool
    smoke: str  # "passed" | "failed" | "skipped"
    max_abs_error: float | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "program_key": self.program_key, "built": self.built, "smoke": self.smoke,
                "max_abs_error": self.max_abs_error, "detail": self.detail}


@dataclass(slots=True)
class Case:
    id: str
    program_key: str
    spec: KernelSpec
    dtype: str
    variant: str
    request: dict[str, Any]
    outputs: list[tuple[str, np.dtype[Any], tuple[int, ...]]]
    expected: dict[str, np.ndarray] | None
    skip_reason: str | None = None


@dataclass(slots=True)
class SmokePlan:
    cases: list[Case] = field(default_factory=list)
    payload: bytearray = field(default_factory=bytearray)

    def requests(self, skipped: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The cases a device runs: not skipped by the plan, nor by the device (`skipped`: key -> why)."""
        skipped = skipped or {}
        return [c.request for c in self.cases if c.skip_reason is None and c.program_key not in skipped]


def case_name(program: Program, spec: KernelSpec, variant: Variant) -> str:
    entry = spec.entry if spec.entry == program.name else f"{program.name}.{spec.entry}"
    return f"{entry}[{variant.name}]"


def load_references(library: Library) -> ModuleType | None:
    path = library.folder / REFERENCE_MODULE
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("deployer_kernel_references", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # user code: any error is an input error naming the file
        raise InputError(Where(str(path)), None, f"cannot load the references: {exc}") from exc
    return module


def dim(value: str | int, sizes: Mapping[str, int]) -> int:
    return value if isinstance(value, int) else sizes[value]


def _generate(arg: Arg, dtype: np.dtype[Any], sizes: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
    import numpy as np
    shape = tuple(dim(d, sizes) for d in arg.shape)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)  # float16 included: the inputs are exact halves
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), size=shape, endpoint=True).astype(dtype)


def rounded_global(spec: KernelSpec, sizes: Mapping[str, int] | None = None) -> list[int]:
    """The kernel's global size at `sizes` (default its smoke sizes), rounded up to a multiple of local."""
    dims = [dim(d, spec.sizes if sizes is None else sizes) for d in spec.global_size]
    if spec.local_size:
        dims = [math.ceil(g / loc) * loc for g, loc in zip(dims, spec.local_size, strict=True)]
    return dims


def _plan_case(plan: SmokePlan, program: Program, spec: KernelSpec, variant: Variant,
               references: ModuleType | None, rng: np.random.Generator) -> Case:
    import numpy as np
    dtypes = {a.name: np.dtype(a.dtype or variant.dtype).newbyteorder("<") for a in spec.args}
    values: dict[str, Any] = {}
    wire_args: list[dict[str, int]] = []
    outputs = []
    for arg in spec.args:
        dtype = dtypes[arg.name]
        if arg.role in ("in", "image"):
            values[arg.name] = _generate(arg, dtype, spec.sizes, rng)
            data = values[arg.name].tobytes()
            wire: dict[str, int] = {arg.role: len(plan.payload), "size": len(data)}
            if arg.role == "image":
                height, width, _ = values[arg.name].shape
                wire.update(width=width, height=height)
            wire_args.append(wire)
            plan.payload += data
        elif arg.role == "scalar":
            raw = arg.value if arg.value is not None else spec.sizes[arg.name]
            values[arg.name] = dtype.type(raw)
            data = np.array(raw, dtype=dtype).tobytes()
            wire_args.append({"scalar": len(plan.payload), "size": len(data)})
            plan.payload += data
        elif arg.role == "out":
            shape = tuple(dim(d, spec.sizes) for d in arg.shape)
            outputs.append((arg.name, dtype, shape))
            wire_args.append({"out": int(np.prod(shape)) * dtype.itemsize})
        else:
            shape = tuple(dim(d, spec.sizes) for d in arg.shape)
            wire_args.append({"local": int(np.prod(shape)) * dtype.itemsize})
    name = case_name(program, spec, variant)
    expected = _reference(references, spec, values, name)
    request = {"id": name, "program_key": program.key(variant), "kernel": spec.entry, "args": wire_args,
               "global": rounded_global(spec), "local": list(spec.local_size) if spec.local_size else None}
    return Case(name, program.key(variant), spec, variant.dtype, variant.name, request, outputs, expected)


def _reference(references: ModuleType | None, spec: KernelSpec, values: dict[str, Any],
               name: str) -> dict[str, np.ndarray] | None:
    import numpy as np
    if references is None or spec.reference is None:
        return None
    function: Callable[..., Mapping[str, np.ndarray]] | None = getattr(references, spec.reference, None)
    if function is None:
        raise InputError(spec.where, "reference", f"{name}: no function {spec.reference!r} in {REFERENCE_MODULE}")
    scalars = {k: v for k, v in spec.sizes.items() if k not in values}
    try:
        return {k: np.asarray(v) for k, v in function(**values, **scalars).items()}
    except Exception as exc:  # user code: any error in it is an input error naming its file and line
        raise InputError(_user_frame(exc, references), "reference",
                         f"{name}: {spec.reference}() raised {type(exc).__name__}: {exc}") from exc


def _user_frame(exc: BaseException, references: ModuleType) -> Where:
    """The innermost line of the references file in the exception's traceback (the file alone if none)."""
    file = str(getattr(references, "__file__", REFERENCE_MODULE))
    line = 0
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == file:
            line = tb.tb_lineno
        tb = tb.tb_next
    return Where(file, line or 0)


def smoke_kernels(library: Library) -> Iterator[tuple[Program, Variant, KernelSpec]]:
    """Every kernel of every variant, in the smoke plan's order (the plan and `Smoke.outline` both walk it)."""
    for program in library.programs:
        for variant in program.variants:
            for spec in program.kernels:
                yield program, variant, spec


def plan_smoke(library: Library, references: ModuleType | None) -> SmokePlan:
    """Every kernel of every variant, with inputs from the library's seed (same bytes on every run)."""
    import numpy as np
    plan = SmokePlan()
    rng = np.random.default_rng(library.seed)
    for program, variant, spec in smoke_kernels(library):
        plan.cases.append(_plan_case(plan, program, spec, variant, references, rng))
    return plan


class Smoke:
    """A push's smoke plan, made once, when a device first has something to smoke (or up front: `prepare`).

    The cases' ids and programs come from the library alone, so a push whose devices smoke nothing never
    imports numpy nor runs the user's references. `plan()` is safe from the devices' threads."""

    def __init__(self, library: Library, plan: SmokePlan | None = None) -> None:
        self.library = library
        self.outline = [(case_name(program, spec, variant), program.key(variant))
                        for program, variant, spec in smoke_kernels(library)]
        self._plan = plan
        self._lock = threading.Lock()

    @property
    def made(self) -> bool:
        return self._plan is not None

    def plan(self) -> SmokePlan:
        with self._lock:
            if self._plan is None:
                try:
                    self._plan = plan_smoke(self.library, load_references(self.library))
                except InputError as exc:  # they passed when checked: they depend on more than their files
                    raise DeviceError(f"the smoke references failed though they passed before: {exc}") from exc
            return self._plan


def prepare_smoke(library: Library, checked: CheckedReferences | None) -> Smoke:
    """The push's smoke plan: made now (the references run: an error in them is bad input, exit 2, before any
    device is touched) unless these very references were checked before (`checked`), then when needed."""
    if checked is not None and checked.seen():
        return Smoke(library)
    smoke = Smoke(library, plan_smoke(library, load_references(library)))
    if checked is not None:
        checked.remember()
    return smoke


class CheckedReferences:
    """Which libraries' references ran without error, by digest of everything their plan depends on: every
    file of the library's folder, the planner (this module), numpy's files and Python. Kept in
    `<cache>/.smoke-checked.json` (the newest 64); a digest there means the same plan, so no run before the
    devices is needed. A reference that reads files outside its folder is not covered: `--smoke always`
    runs it anyway on a device that smokes."""

    KEEP = 64

    def __init__(self, path: Path, folder: Path, sha256: Callable[[Path], tuple[int, str]]) -> None:
        self.path = path
        parts: list[Any] = [sys.version, _file_stamp(Path(__file__)), _numpy_stamp()]
        self.hashed: dict[Path, tuple[int, str]] = {}  # (size, sha256) by file: local_files reuses them
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            self.hashed[file] = sha256(file)
            parts.append([str(file.relative_to(folder)), *self.hashed[file]])
        self.digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _known(self) -> list[str]:
        known = read_json(self.path)
        return [d for d in known if isinstance(d, str)] if isinstance(known, list) else []

    def seen(self) -> bool:
        return self.digest in self._known()

    def remember(self) -> None:
        try:
            write_json(self.path, ([self.digest] + [d for d in self._known() if d != self.digest])[: self.KEEP])
        except LocalStateError:
            pass  # only a shortcut: the next push runs them again


def _file_stamp(path: Path) -> list[int]:
    try:
        st = path.stat()
    except OSError:
        return []
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _numpy_stamp() -> list[Any]:
    """numpy's version, from its files rather than an import (an upgrade rewrites them)."""
    spec = importlib.util.find_spec("numpy")
    if spec is None or spec.origin is None:
        return []
    folder = Path(spec.origin).parent
    return [str(folder), _file_stamp(folder / "__init__.py"), _file_stamp(folder / "version.py")]


def check_output(name: str, got: np.ndarray, expected: np.ndarray, tolerance: float,
                 what: str) -> tuple[float, str | None]:
    """(max abs error, why not) of one output: every element needs |got - want| <= tol * (1 + |want|)."""
    import numpy as np
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = np.asarray(expected, dtype=np.float64).reshape(-1)
    if got.shape != want.shape:
        return math.nan, f"output {name!r}: {got.size} elements, reference has {want.size}"
    if not np.all(np.isfinite(got)):
        return math.inf, f"output {name!r} has non-finite values"
    error = np.abs(got - want)
    worst = float(error.max(initial=0.0))
    scaled = error / (1.0 + np.abs(want))
    if scaled.size and float(scaled.max()) > tolerance:
        at = int(scaled.argmax())
        return worst, (f"output {name!r}: max abs error {worst:.3g} (element {at}: got {got[at]:.6g}, "
                       f"want {want[at]:.6g}) exceeds tolerance {tolerance:g} for {what}")
    return worst, None


def compare(case: Case, outputs: Mapping[str, np.ndarray]) -> tuple[bool, float, str | None]:
    """(passed, max abs error, why not) of device outputs against the case's reference."""
    assert case.expected is not None
    tolerance = case.spec.tolerance_for(case.variant, case.dtype)
    if tolerance is None:
        return False, math.nan, f"no tolerance for variant {case.variant} or dtype {case.dtype} in the kernel manifest"
    worst, reason = 0.0, None
    for name, expected in case.expected.items():
        what = case.dtype if case.variant not in case.spec.tolerance else f"variant {case.variant}"
        error, why = check_output(name, outputs[name], expected, tolerance, what)
        if math.isnan(error) or math.isinf(error):
            return False, error, why
        worst = max(worst, error)
        reason = reason or why
    return reason is None, worst, reason


def split_outputs(case: Case, payload: memoryview, sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """The device's output bytes of one case, checked against the sizes the case asked for."""
    import numpy as np
    if len(sizes) != len(case.outputs):
        raise ValueError(f"{len(sizes)} outputs, expected {len(case.outputs)}")
    arrays, offset = {}, 0
    for (name, dtype, shape), size in zip(case.outputs, sizes, strict=True):
        want = int(np.prod(shape)) * dtype.itemsize
        if size != want:
            raise ValueError(f"output {name!r} is {size} bytes, expected {want}")
        arrays[name] = np.frombuffer(payload[offset: offset + size], dtype=dtype).reshape(shape)
        offset += size
    return arrays


@dataclass(frozen=True, slots=True)
class ProgramStartup:
    """One program at start-up, PoCL's own kernel cache off: built from source vs created from the binary."""

    key: str
    build_from_source_ms: float | None
    load_from_binary_ms: float | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "build_from_source_ms": self.build_from_source_ms,
                "load_from_binary_ms": self.load_from_binary_ms, "error": self.error}


@dataclass(frozen=True, slots=True)
class Startup:
    """The JSON contract's `startup`: totals over the device's programs, and each program."""

    programs: tuple[ProgramStartup, ...]
    compiler_start_ms: float | None  # the first (throw-away) build of the process: the compiler's own start

    def total(self, name: str) -> float | None:
        values = [getattr(p, name) for p in self.programs]
        return None if not values or None in values else round(sum(values), 3)

    def to_json(self) -> dict[str, Any]:
        return {"build_from_source_ms": self.total("build_from_source_ms"),
                "load_from_binary_ms": self.total("load_from_binary_ms"),
                "compiler_start_ms": self.compiler_start_ms,
                "programs": [p.to_json() for p in self.programs]}


def parse_startup(reply: Reply, keys: Sequence[str]) -> Startup:
    """The `startup` reply's figures for the programs asked for (a device-sent record is checked field by
    field; one that lacks a key we asked for counts as not measured)."""
    fields = Fields(reply.fields, "startup reply")
    by_key = {}
    for record in fields.items("programs"):
        program = Fields(record, "startup reply program")
        by_key[program.text("key")] = program
    programs = []
    for key in keys:
        record = by_key.get(key)
        if record is None:
            programs.append(ProgramStartup(key, None, None, "not measured by the device"))
            continue
        error = record.optional_text("error", MAX_ERROR)
        programs.append(ProgramStartup(key, record.optional_ms("build_from_source_ms"),
                                       record.optional_ms("load_from_binary_ms"),
                                       None if error is None else visible(error, 500)))
    return Startup(tuple(programs), fields.optional_ms("compiler_start_ms"))
