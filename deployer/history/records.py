"""What a `deploy run` produces, as plain frozen records: the executor (`deployer.tasks.run`) builds them,
the history stores them, the verdicts and the reports read them. Nothing here touches a board or a file.

Statuses (KernelCI's grades, worst first): `fail` (the board answered wrong: wrong output, compile error,
a command that exited non-zero), `error` (infrastructure: connection, timeout, driver crash), `miss` (not
run: device offline, rollout stopped, board locked by another push), `pass`, `skip` (not applicable, with
the reason). Only `pass` and `fail` are ever compared against the past: an `error` or a `miss` is never a
test failure and never a regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["fail", "error", "miss", "pass", "skip"]
STATUSES: tuple[Status, ...] = ("fail", "error", "miss", "pass", "skip")  # worst first
COMPARABLE: frozenset[str] = frozenset({"pass", "fail"})

DeviceState = Literal["ok", "offline", "incomplete"]
# ok: health passed (or the playbook has no health step) and its steps ran; offline: health failed, the
# other steps are `miss`; incomplete: the run was interrupted while this device was in flight.

VerdictKind = Literal["new_failure", "fixed", "still_failing", "still_passing", "flaky", "no_baseline"]
VERDICT_LABELS: dict[str, str] = {
    "new_failure": "new failure", "fixed": "fixed", "still_failing": "still failing",
    "still_passing": "still passing", "flaky": "flaky", "no_baseline": "no baseline yet",
}


@dataclass(frozen=True, slots=True)
class Metric:
    """A number a step measured (a shell step's captured value, a program's load time)."""

    name: str
    value: float
    unit: str = ""


@dataclass(frozen=True, slots=True)
class Sample:
    """Every repeat of one measurement (a bench item's device or wall time): the raw data the latency
    verdicts test later nights against. Bounded by the bench's max_repeats."""

    name: str  # device_ms | wall_ms
    unit: str
    values: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The device's OpenCL identity for this run: a change of `id` starts a new comparison."""

    id: str  # 16 hex digits (docs/design.md section 4)
    label: str  # what a person reads: platform, device and driver version, e.g. "PoCL 3.1 pthread cpu"


@dataclass(frozen=True, slots=True)
class Subject:
    """Something that ran whose change starts a new comparison for the items it covers."""

    kind: str  # kernel | model | command | collect
    name: str  # the program key, model file, step name
    sha256: str  # of its source and options, of the model bytes, of the command


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One result: device x step x item. `item` is a smoke case, a program, a collected path, a limit; ""
    for the step as a whole."""

    step: str  # the step's name in the playbook (unique within it)
    kind: str  # the step's kind: health | push | smoke | collect | shell
    item: str
    status: Status
    reason: str = ""  # why, for fail/error/miss/skip (a person reads it; board text made printable)
    flaky: bool = False  # failed once, then passed when re-run to confirm
    attempts: int = 1
    subject: str = ""  # sha256 of what ran (Subject.sha256); "" when nothing identifies it
    duration_s: float | None = None
    metrics: tuple[Metric, ...] = ()
    samples: tuple[Sample, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.step, self.item)


@dataclass(frozen=True, slots=True)
class DeviceResult:
    """Everything one device did in one run; stored in one transaction."""

    device: str
    state: DeviceState
    started: float  # epoch seconds
    ended: float
    fingerprint: Fingerprint | None = None
    items: tuple[ItemResult, ...] = ()
    subjects: tuple[Subject, ...] = ()
    reason: str = ""  # why offline or incomplete

    @property
    def status(self) -> Status:
        """The worst status of its items (`miss` when it has none)."""
        found = {item.status for item in self.items}
        return next((s for s in STATUSES if s in found), "miss")


@dataclass(frozen=True, slots=True)
class Verdict:
    """One result judged against the device's own history (docs/design.md section 13)."""

    device: str
    step: str
    item: str
    kind: VerdictKind
    note: str = ""  # what changed when a comparison restarts: "driver changed A -> B", "kernel changed"
    baseline_run: int | None = None  # the comparable run it was judged against

    @property
    def label(self) -> str:
        return VERDICT_LABELS[self.kind]


LatencyKind = Literal["regression", "improvement", "no_change", "no_baseline"]


@dataclass(frozen=True, slots=True)
class LatencyResult:
    """One latency series (device, step, item, sample name) judged tonight within its segment
    (docs/regressions.md): `since_run` is the night a regression or improvement began."""

    device: str
    step: str
    item: str
    metric: str
    kind: LatencyKind
    since_run: int | None = None
    change: float | None = None  # new level / old level - 1
    p_value: float | None = None
    baseline: float | None = None
    current: float | None = None
    note: str = ""
