"""One device's work, the same for every fleet command (push, rollback, collect, install, a nightly step).

A command gives `run_device` an `Outcome` to fill and a function of its stages; the runner owns the rest,
once: the session (opened by the first stage that needs it, closed however the work ends), each stage's
timing and progress, the byte counts, and turning whatever the work raised into that device's outcome. A
device's error (`DeviceError`), a local-state error of that device, and a bug (any other exception: its
traceback saved to a file) each end that device only: no exception from one device's work can take the
run's summary down. `run_fleet` puts it over `fan_out` (the pool, deadlines, the stop rule, Ctrl-C).
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from deployer.config.inventory import Device
from deployer.connect.deadline import INTERRUPTED
from deployer.errors import DeviceError, LocalStateError
from deployer.protocol.session import AgentSession, open_session
from deployer.tasks.fleet import FleetInterrupted, StopRule, fan_out
from deployer.tasks.progress import Progress

NOT_STARTED = "not_started"  # the failed stage of a device the stop rule or Ctrl-C kept from starting
INTERNAL = "internal"  # the failed stage of a device whose work hit a bug in deploy


@dataclass(slots=True)
class Outcome:
    """What one device did, in every fleet command: whether it passed, the stage it failed at and why, the
    seconds per stage, the bytes each way. Each command's outcome adds its own fields (and JSON) to these."""

    name: str
    ok: bool = False
    error: str | None = None
    failed_stage: str | None = None
    stages: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0

    def passed(self) -> bool:
        """Once the work ended without an error: whether the device passed (collect: every file did)."""
        return True

    def describe(self, stage: str, reason: str) -> str:
        """What `error` says of a failure at `stage`."""
        return reason

    def fail(self, stage: str, reason: str) -> None:
        self.ok, self.failed_stage, self.error = False, stage, self.describe(stage, reason)

    def base_json(self) -> dict[str, Any]:
        """The fields every command's JSON has (docs/json.md)."""
        return {"name": self.name, "ok": self.ok, "error": self.error, "failed_stage": self.failed_stage,
                "stages": {k: round(v, 4) for k, v in self.stages.items()},
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}

    def to_json(self) -> dict[str, Any]:
        return self.base_json()


OutcomeT = TypeVar("OutcomeT", bound=Outcome)


@dataclass(frozen=True, slots=True)
class Connect:
    """How the runner opens a device's session."""

    accept_new_host_keys: bool = False
    check: bool = False  # push --check: the agent is started read-only


class DeviceWork(Generic[OutcomeT]):
    """The explicit context a device's stages share: its device, its outcome, the stage under way, and the
    session (opened on the first `session()`, or the caller's own for a nightly step)."""

    def __init__(self, device: Device, outcome: OutcomeT, progress: Progress, connect: Connect, stack: ExitStack,
                 session: AgentSession | None = None) -> None:
        self.device, self.outcome, self.progress, self.connect = device, outcome, progress, connect
        self.current = "connect"
        self._stack, self._session = stack, session

    @contextmanager
    def stage(self, name: str, shown: str | None = None) -> Iterator[None]:
        """A stage: shown as it starts (as `shown`, e.g. with the file it reads), timed (summed when a stage
        recurs), named by an error raised in it."""
        self.current = name
        self.progress.stage(self.device.name, shown or name)
        start = time.perf_counter()
        try:
            yield
        finally:
            stages = self.outcome.stages
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - start

    @property
    def opened(self) -> bool:
        return self._session is not None

    def session(self, noop_token: str | None = None) -> AgentSession:
        """The device's session, opened on the first call; `noop_token`: its shell may answer a no-op."""
        if self._session is None:
            with self.stage("connect"):
                self._session = self._stack.enter_context(open_session(
                    self.device, accept_new_host_keys=self.connect.accept_new_host_keys, check=self.connect.check,
                    noop_token=noop_token))
            session = self._session
            self.progress.traffic(self.device.name, lambda: (session.bytes_sent, session.bytes_received))
        return self._session

    def count_traffic(self) -> None:
        if self._session is not None:
            self.outcome.bytes_sent = self._session.bytes_sent
            self.outcome.bytes_received = self._session.bytes_received


Work = Callable[[DeviceWork[OutcomeT]], None]
OnFailure = Callable[[DeviceWork[OutcomeT], DeviceError], None]


def run_device(device: Device, outcome: OutcomeT, work: Work[OutcomeT], *, progress: Progress,
               connect: Connect = Connect(), on_failure: OnFailure[OutcomeT] | None = None) -> OutcomeT:
    """`work` on one device; never raises for anything that device did (Ctrl-C aside). `on_failure`: what a
    command does besides the outcome with a device's error (push keeps a local record of it)."""
    stack = ExitStack()
    context = DeviceWork(device, outcome, progress, connect, stack)
    try:
        with stack:  # the session closes here (with a goodbye), before the outcome is final
            try:
                work(context)
            finally:
                context.count_traffic()
        outcome.ok = outcome.passed()
    except (DeviceError, LocalStateError) as exc:
        _fail(context, exc, on_failure)
    except Exception:
        outcome.fail(INTERNAL, bug_report(device.name))
    progress.finished(device.name, outcome.ok, outcome.error)
    return outcome


def run_on(session: AgentSession, device: Device, outcome: OutcomeT, work: Work[OutcomeT], *,
           on_failure: OnFailure[OutcomeT] | None = None) -> tuple[OutcomeT, DeviceError | None]:
    """`work` on a session the caller opened (a nightly run's steps share one): the outcome, and the
    device's error for the caller to grade (a bug is the caller's to report)."""
    with ExitStack() as stack:
        context = DeviceWork(device, outcome, Progress(), Connect(), stack, session)
        try:
            work(context)
        except (DeviceError, LocalStateError) as exc:
            return outcome, _fail(context, exc, on_failure)
        finally:
            context.count_traffic()
    outcome.ok = outcome.passed()
    return outcome, None


def _fail(context: DeviceWork[OutcomeT], exc: DeviceError | LocalStateError,
          on_failure: OnFailure[OutcomeT] | None) -> DeviceError | None:
    """Fail the outcome with `exc`, the one mapping both runners share: a device's error names its device and
    stage (where it was caught, unless it knew better) and goes to `on_failure`; a local-state error names the
    stage under way. Returns the device's error, for `run_on`'s caller to grade."""
    if isinstance(exc, LocalStateError):
        context.outcome.fail(context.current, f"local cache: {exc}")
        return None
    exc.for_device(context.device.name, context.current)
    context.outcome.fail(exc.stage, exc.reason)
    if on_failure is not None:
        on_failure(context, exc)
    return exc


def bug_report(device: str) -> str:
    """A bug met while working on `device`: its traceback saved to a file, and what the outcome says."""
    try:
        with tempfile.NamedTemporaryFile("w", prefix="deploy-crash-", suffix=".txt", delete=False) as out:
            out.write(f"while working on device {device!r}:\n")
            traceback.print_exc(file=out)
        where = f"traceback saved to {out.name}"
    except OSError:
        where = "its traceback could not be saved"
    return f"internal error (a bug in deploy; {where}; please report it)"


@dataclass(frozen=True)  # no slots: `FleetOutcome[X](...)` sets __orig_class__, which slots would refuse
class FleetOutcome(Generic[OutcomeT]):
    outcomes: tuple[OutcomeT, ...]
    interrupted: bool = False  # Ctrl-C: the devices in flight were stopped, those not started were not

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[OutcomeT]:
        return [o for o in self.outcomes if not o.ok]


def run_fleet(devices: Sequence[Device], new: Callable[[str], OutcomeT], work: Callable[[Device], OutcomeT], *,
              forks: int, progress: Progress, label: str, stop: StopRule[OutcomeT] | None = None,
              deadline: Callable[[Device], float | None] | None = None) -> FleetOutcome[OutcomeT]:
    """`work(device)` on every device (at most `forks` at once, each within its deadline: `timeouts.device`
    unless told), outcomes in inventory order. `new(name)` makes the outcome of a device that did not start
    (the stop rule, Ctrl-C)."""

    def not_started(device: Device, why: str) -> OutcomeT:
        outcome = new(device.name)
        outcome.fail(NOT_STARTED, why)
        progress.finished(device.name, False, why)
        return outcome

    try:
        return FleetOutcome(tuple(fan_out(devices, work, forks=forks, label=label,
                                           deadline=deadline or (lambda d: d.timeouts.device), stop=stop,
                                           not_started=not_started)))
    except FleetInterrupted as stopped:
        ended: list[Any] = stopped.results
        outcomes = tuple(o if o is not None else not_started(d, INTERRUPTED)
                         for d, o in zip(devices, ended, strict=True))
        return FleetOutcome(outcomes, interrupted=True)
