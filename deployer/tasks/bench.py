"""The `bench` step's controller side: bench cases planned from the kernel library (its `bench_sizes`,
inputs from the library's seed), the agent's `bench` reply read strictly, and each item's repeats.

An input travels as a tile of at most TILE_BYTES, repeated on the board to the buffer's size, so a large
bench size costs the link nothing; outputs are not read back (their correctness is the smoke step's job).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployer.config.kernels import KernelSpec, Library, Program, Variant
from deployer.errors import InputError
from deployer.protocol.reply import MAX_ERROR, Fields, Reply
from deployer.tasks.smoke import case_name, dim, rounded_global
from deployer.text import one_line

if TYPE_CHECKING:  # numpy is imported where it is used: a push that runs nothing never loads it
    import numpy as np

TILE_BYTES = 256 << 10
MAX_NUMBERS_PER_REQUEST = 40_000  # repeats x 2 timings x cases in one reply line (the agent's 1 MiB line)
BENCH_SEED_OFFSET = 1  # bench inputs differ from the smoke inputs of the same seed


@dataclass(frozen=True, slots=True)
class BenchCase:
    id: str
    program_key: str
    request: dict[str, Any]


@dataclass(slots=True)
class BenchPlan:
    cases: list[BenchCase] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # case id -> why it is not benched
    payload: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True, slots=True)
class BenchItem:
    """One case or model's repeats (ms); `error` when it failed or timed out on the board."""

    name: str
    kind: str  # case | model
    ok: bool
    error: str | None
    device_ms: tuple[float, ...]
    wall_ms: tuple[float, ...]


def _elements(shape: Sequence[str | int], sizes: Mapping[str, int]) -> int:
    return math.prod(dim(d, sizes) for d in shape)


def _plan_case(plan: BenchPlan, program: Program, spec: KernelSpec, variant: Variant,
               rng: np.random.Generator) -> None:
    import numpy as np
    name = case_name(program, spec, variant)
    if any(arg.role == "image" for arg in spec.args):
        plan.skipped[name] = "image arguments are not benchmarked"
        return
    sizes = spec.bench_sizes or spec.sizes
    args: list[dict[str, int]] = []
    for arg in spec.args:
        dtype = np.dtype(arg.dtype or variant.dtype).newbyteorder("<")
        if arg.role == "in":
            total = _elements(arg.shape, sizes) * dtype.itemsize
            count = max(1, min(total, TILE_BYTES) // dtype.itemsize)
            tile = (rng.standard_normal(count) if dtype.kind == "f" else rng.integers(-100, 100, count)).astype(dtype)
            args.append({"in": len(plan.payload), "tile": tile.nbytes, "size": total})
            plan.payload += tile.tobytes()
        elif arg.role == "scalar":
            raw = arg.value if arg.value is not None else sizes[arg.name]
            if dtype.kind in "iu" and not np.iinfo(dtype).min <= raw <= np.iinfo(dtype).max:
                raise InputError(spec.where, "bench_sizes", f"{name}: {arg.name} = {raw} does not fit the "
                                                            f"kernel's {dtype.name} argument")
            data = np.array(raw, dtype=dtype).tobytes()
            args.append({"scalar": len(plan.payload), "size": len(data)})
            plan.payload += data
        elif arg.role == "out":
            args.append({"out": _elements(arg.shape, sizes) * dtype.itemsize})
        else:
            args.append({"local": _elements(arg.shape, sizes) * dtype.itemsize})
    request = {"id": name, "program_key": program.key(variant), "kernel": spec.entry, "args": args,
               "global": rounded_global(spec, sizes), "local": list(spec.local_size) if spec.local_size else None}
    plan.cases.append(BenchCase(name, program.key(variant), request))


def plan_bench(library: Library) -> BenchPlan:
    """Every kernel of every variant at its bench sizes, inputs from the library's seed."""
    import numpy as np
    plan = BenchPlan()
    rng = np.random.default_rng(library.seed + BENCH_SEED_OFFSET)
    for program in library.programs:
        for variant in program.variants:
            for spec in program.kernels:
                _plan_case(plan, program, spec, variant, rng)
    return plan


def batches(cases: Sequence[BenchCase], max_repeats: int) -> list[list[BenchCase]]:
    """Cases split so that no reply carries more than MAX_NUMBERS_PER_REQUEST timings."""
    per = max(1, MAX_NUMBERS_PER_REQUEST // (2 * max(1, max_repeats)))
    return [list(cases[i:i + per]) for i in range(0, len(cases), per)]


def parse_bench(reply: Reply, asked: Sequence[str], models: Sequence[str], max_repeats: int) -> list[BenchItem]:
    """The items the board timed, in the order asked; an item it does not report is an error."""
    fields, items = Fields(reply.fields, "bench reply"), []
    cases = _by(fields.items("cases"), "id", "bench reply case")
    for name in asked:
        record = cases.get(name)
        if record is None:
            items.append(BenchItem(name, "case", False, "no result from the device", (), ()))
            continue
        error = record.optional_text("error", MAX_ERROR)
        items.append(BenchItem(name, "case", record.flag("ok"), one_line(error, 300) if error else None,
                               record.ms_list("device_ms", max_repeats), record.ms_list("wall_ms", max_repeats)))
    timed = _by(fields.items("models"), "name", "bench reply model")
    for name in models:
        record = timed.get(name)
        if record is None:
            items.append(BenchItem(name, "model", False, "no result from the device", (), ()))
            continue
        error = record.optional_text("error", MAX_ERROR)
        items.append(BenchItem(name, "model", record.flag("ok"), one_line(error, 300) if error else None, (),
                               record.ms_list("wall_ms", max_repeats)))
    return items


def _by(records: Sequence[object], key: str, where: str) -> dict[str, Fields]:
    """The records of a list, each by its name (`key`); only the names are checked here."""
    named = (Fields(record, where) for record in records)
    return {fields.text(key): fields for fields in named}


def parse_create_ms(reply: Reply, keys: Mapping[str, object]) -> dict[str, float]:
    """Each program's creation from its binary (ms), for the programs this device builds."""
    timed = Fields(reply.fields, "bench reply").nested("create_ms").record
    return {key: float(value) for key, value in timed.items() if key in keys
            and isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e9}
