"""Smoke tests, controller side: inputs from a fixed seed, the numpy reference, the tolerance check.

numpy lives here and never on a device: `plan_smoke` turns the library into agent cases plus one
payload of input bytes; `check_smoke` compares the output bytes the device sent back with the reference.
A kernel passes when every element satisfies |out - ref| <= tol * (1 + |ref|) for its dtype's tolerance.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from deployer.errors import InputError, Where
from deployer.kernels import Arg, KernelSpec, Library, Program, Variant

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
    request: dict[str, Any]
    outputs: list[tuple[str, np.dtype[Any], tuple[int, ...]]]
    expected: dict[str, np.ndarray] | None
    skip_reason: str | None = None


@dataclass(slots=True)
class SmokePlan:
    cases: list[Case] = field(default_factory=list)
    payload: bytearray = field(default_factory=bytearray)

    def requests(self) -> list[dict[str, Any]]:
        return [c.request for c in self.cases if c.skip_reason is None]


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


def _dim(value: str | int, sizes: Mapping[str, int]) -> int:
    return value if isinstance(value, int) else sizes[value]


def _generate(arg: Arg, dtype: np.dtype[Any], sizes: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
    shape = tuple(_dim(d, sizes) for d in arg.shape)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), size=shape, endpoint=True).astype(dtype)


def _rounded_global(spec: KernelSpec) -> list[int]:
    sizes = [_dim(d, spec.sizes) for d in spec.global_size]
    if spec.local_size:
        sizes = [math.ceil(g / loc) * loc for g, loc in zip(sizes, spec.local_size, strict=True)]
    return sizes


def _plan_case(plan: SmokePlan, program: Program, spec: KernelSpec, variant: Variant,
               references: ModuleType | None, rng: np.random.Generator) -> Case:
    dtypes = {a.name: np.dtype(a.dtype or variant.dtype).newbyteorder("<") for a in spec.args}
    values: dict[str, Any] = {}
    wire_args: list[dict[str, int]] = []
    outputs = []
    for arg in spec.args:
        dtype = dtypes[arg.name]
        if arg.role == "in":
            values[arg.name] = _generate(arg, dtype, spec.sizes, rng)
            data = values[arg.name].tobytes()
            wire_args.append({"in": len(plan.payload), "size": len(data)})
            plan.payload += data
        elif arg.role == "scalar":
            raw = arg.value if arg.value is not None else spec.sizes[arg.name]
            values[arg.name] = dtype.type(raw)
            data = np.array(raw, dtype=dtype).tobytes()
            wire_args.append({"scalar": len(plan.payload), "size": len(data)})
            plan.payload += data
        elif arg.role == "out":
            shape = tuple(_dim(d, spec.sizes) for d in arg.shape)
            outputs.append((arg.name, dtype, shape))
            wire_args.append({"out": int(np.prod(shape)) * dtype.itemsize})
        else:
            shape = tuple(_dim(d, spec.sizes) for d in arg.shape)
            wire_args.append({"local": int(np.prod(shape)) * dtype.itemsize})
    name = case_name(program, spec, variant)
    expected = _reference(references, spec, values, name)
    request = {"id": name, "program_key": program.key(variant), "kernel": spec.entry, "args": wire_args,
               "global": _rounded_global(spec), "local": list(spec.local_size) if spec.local_size else None}
    return Case(name, program.key(variant), spec, variant.dtype, request, outputs, expected)


def _reference(references: ModuleType | None, spec: KernelSpec, values: dict[str, Any],
               name: str) -> dict[str, np.ndarray] | None:
    if references is None or spec.reference is None:
        return None
    function: Callable[..., Mapping[str, np.ndarray]] | None = getattr(references, spec.reference, None)
    if function is None:
        raise InputError(spec.where, "reference", f"{name}: no function {spec.reference!r} in {REFERENCE_MODULE}")
    scalars = {k: v for k, v in spec.sizes.items() if k not in values}
    return {k: np.asarray(v) for k, v in function(**values, **scalars).items()}


def plan_smoke(library: Library, references: ModuleType | None) -> SmokePlan:
    """Every kernel of every variant, with inputs from the library's seed (same bytes on every run)."""
    plan = SmokePlan()
    rng = np.random.default_rng(library.seed)
    for program in library.programs:
        for variant in program.variants:
            for spec in program.kernels:
                plan.cases.append(_plan_case(plan, program, spec, variant, references, rng))
    return plan


def compare(case: Case, outputs: Mapping[str, np.ndarray]) -> tuple[bool, float, str | None]:
    """(passed, max abs error, why not) of device outputs against the case's reference."""
    assert case.expected is not None
    tolerance = case.spec.tolerance.get(case.dtype)
    if tolerance is None:
        return False, math.nan, f"no tolerance for dtype {case.dtype} in the kernel manifest"
    worst, reason = 0.0, None
    for name, expected in case.expected.items():
        got = outputs[name].astype(np.float64).reshape(-1)
        want = np.asarray(expected, dtype=np.float64).reshape(-1)
        if got.shape != want.shape:
            return False, math.nan, f"output {name!r}: {got.size} elements, reference has {want.size}"
        error = np.abs(got - want)
        if not np.all(np.isfinite(got)):
            return False, math.inf, f"output {name!r} has non-finite values"
        worst = max(worst, float(error.max(initial=0.0)))
        scaled = error / (1.0 + np.abs(want))
        if scaled.size and float(scaled.max()) > tolerance:
            at = int(scaled.argmax())
            reason = (f"output {name!r}: max abs error {error.max():.3g} (element {at}: got {got[at]:.6g}, "
                      f"want {want[at]:.6g}) exceeds tolerance {tolerance:g} for {case.dtype}")
    return reason is None, worst, reason


def split_outputs(case: Case, payload: memoryview, sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """The device's output bytes of one case, checked against the sizes the case asked for."""
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
