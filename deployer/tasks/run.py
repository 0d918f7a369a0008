"""A nightly run (`deploy run`): a playbook's steps, in order, on every selected device, each result graded.

Per device, one SSH connection and agent session serve every step (reopened only after a step lost it).
A step gives item results (docs/playbooks.md): `pass`, `fail` (the board answered wrong), `error`
(infrastructure), `miss` (not run), `skip` (not applicable). Two rules make a night's results trustworthy:

- a step with an `error` is run again, up to its `retries`, on a fresh connection; a `fail` never is;
- a step with a `fail` is run once more to confirm it: an item that passes then is `pass` marked `flaky`.

A failed health step makes the device `offline`: its other steps are `miss`, and nothing of it counts as
a test failure. A step that fails or errors stops that device's later steps (`miss`) unless the step says
`continue_on_error`. Each device's result goes to the history as soon as it is done (`on_result`, one
transaction), so a run killed at any moment keeps every finished device.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deployer.cache.store import hold_lock
from deployer.config.inventory import Device
from deployer.config.playbooks import (
    BenchStep,
    CollectStep,
    HealthStep,
    Limit,
    Playbook,
    PushStep,
    ShellStep,
    SmokeStep,
    Step,
)
from deployer.connect.deadline import INTERRUPTED, Deadline, current_deadline
from deployer.errors import AgentError, DeviceError, LocalStateError
from deployer.history.records import (
    DeviceResult,
    DeviceState,
    Fingerprint,
    ItemResult,
    Metric,
    Status,
    Subject,
)
from deployer.protocol import ops
from deployer.protocol.session import AgentSession, open_session
from deployer.tasks.bench import plan_bench
from deployer.tasks.collect import CollectJob, collect_on
from deployer.tasks.fleet import FleetInterrupted, fan_out
from deployer.tasks.grading import (
    bench_items,
    collect_items,
    confirm,
    grade,
    parse_number,
    push_items,
    reason_text,
    shell_metrics,
    subject_of,
)
from deployer.tasks.progress import Progress
from deployer.tasks.push import BenchJob, PushJob, prepare_push, push_on
from deployer.tasks.runner import bug_report
from deployer.text import one_line, visible

SHELL_GRACE_S = 15.0  # past a step's timeout, how long the controller waits for the agent's own verdict
MAX_REASON = 300


# ----- the job: every step's local inputs, read and checked once before any board is touched -----


@dataclass(frozen=True, slots=True)
class RunJob:
    playbook: Playbook
    cache: Path
    pushes: Mapping[str, PushJob]  # step name -> job (push and smoke steps)
    subjects: Mapping[str, tuple[Subject, ...]]  # step name -> what it runs
    accept_new_host_keys: bool = False


def prepare_run(playbook: Playbook, cache: Path, *, accept_new_host_keys: bool = False) -> RunJob:
    """Load every step's kernels and models (InputError, exit 2, before any board); hash what each runs."""
    pushes: dict[str, PushJob] = {}
    subjects: dict[str, tuple[Subject, ...]] = {}
    for step in playbook.steps:
        options = step.options
        if isinstance(options, PushStep):
            pushes[step.name] = prepare_push(
                options.kernels, options.models, cache, mace_version=options.mace_version or "",
                keep=options.keep, mace_format=options.mace_format, smoke_mode=options.smoke,
                accept_new_host_keys=accept_new_host_keys)
        elif isinstance(options, SmokeStep):
            pushes[step.name] = prepare_push(options.kernels, options.models, cache, smoke_mode="always",
                                             smoke_only=True, accept_new_host_keys=accept_new_host_keys)
        elif isinstance(options, BenchStep):
            job = prepare_push(options.kernels, options.models, cache, smoke_mode="never", smoke_only=True,
                               accept_new_host_keys=accept_new_host_keys)
            pushes[step.name] = replace(job, bench=BenchJob(plan_bench(job.library), bench_settings(options),
                                                            timeout_s=step.timeout))
        if step.name in pushes:
            subjects[step.name] = push_subjects(pushes[step.name])
        elif isinstance(options, ShellStep):
            subjects[step.name] = (Subject("command", step.name, _sha(options.command)),)
    return RunJob(playbook, cache, pushes, subjects, accept_new_host_keys)


def bench_settings(options: BenchStep) -> dict[str, int]:
    return {"warmup": options.warmup, "min_repeats": options.min_repeats, "max_repeats": options.max_repeats,
            "min_time_ms": options.min_time_ms, "pause_ms": options.pause_ms,
            "item_timeout_ms": max(1, round(options.item_timeout_s * 1000))}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def push_subjects(job: PushJob) -> tuple[Subject, ...]:
    """Each program's sources and options, each model's bytes: a change of one starts a new comparison of
    the results that ran it (and the report says "kernel changed" rather than "new failure")."""
    shas = job.shas
    library = job.library
    subjects = []
    for program in library.programs:
        files = [f"kernels/{p}" for p in (program.source, *program.headers)]
        for variant in program.variants:
            what = {"files": [[p, shas.get(p)] for p in files], "options": list(variant.options),
                    "compile_options": list(library.compile_options)}
            subjects.append(Subject("kernel", program.key(variant), _sha(json.dumps(what, sort_keys=True))))
    for plan in job.models:
        model_files = sorted(f for f in shas if f.startswith(f"models/{plan.model.name}"))
        what = {"model": plan.model.name, "files": [[f, shas[f]] for f in model_files]}
        subjects.append(Subject("model", plan.model.name, _sha(json.dumps(what, sort_keys=True))))
    return tuple(subjects)


# ----- one device -----


class _Connection:
    """The device's one session, opened on first use and again after a step lost it."""

    def __init__(self, device: Device, accept_new_host_keys: bool) -> None:
        self.device, self.accept_new = device, accept_new_host_keys
        self._session: AgentSession | None = None
        self._closer: Any = None

    def get(self) -> AgentSession:
        if self._session is None:
            self._closer = open_session(self.device, accept_new_host_keys=self.accept_new)
            self._session = self._closer.__enter__()
        return self._session

    def drop(self) -> None:
        """Close it (a step timed out or the link broke): the next step connects again."""
        closer, self._session, self._closer = self._closer, None, None
        if closer is not None:
            try:
                closer.__exit__(None, None, None)
            except DeviceError:
                pass  # the session is gone either way

    def kill(self) -> None:
        """From a timer thread: end the session at once (its reads fail in the step's thread)."""
        session = self._session
        if session is not None:
            session.close()


class DeviceRun:
    """One device's run of the playbook."""

    def __init__(self, device: Device, job: RunJob, progress: Progress) -> None:
        self.device, self.job, self.progress = device, job, progress
        self.connection = _Connection(device, job.accept_new_host_keys)
        self.fingerprint: Fingerprint | None = None
        self.subjects: dict[tuple[str, str], Subject] = {}
        self.started = time.time()

    def run(self) -> DeviceResult:
        items: list[ItemResult] = []
        state: DeviceState = "ok"
        why_stopped = ""
        try:
            for step in self.job.playbook.steps:
                if why_stopped:
                    items.append(ItemResult(step.name, step.kind, "", "miss", why_stopped))
                    continue
                self.progress.stage(self.device.name, step.name)
                step_items = self._step(step)
                items += step_items
                if self._interrupted():
                    state, why_stopped = "incomplete", INTERRUPTED
                elif step.kind == "health" and any(i.status != "pass" for i in step_items):
                    state = "offline"
                    why_stopped = "device offline: " + next(f"{i.item}: {i.reason}" for i in step_items
                                                            if i.status != "pass")
                elif not step.continue_on_error and any(i.status in ("fail", "error") for i in step_items):
                    why_stopped = f"not run: step {step.name!r} did not pass"
        finally:
            self.connection.drop()
        result = DeviceResult(self.device.name, state, self.started, time.time(), self.fingerprint, tuple(items),
                              tuple(self.subjects.values()), reason=why_stopped if state != "ok" else "")
        self.progress.finished(self.device.name, result.status in ("pass", "skip"), _summary(result))
        return result

    def _interrupted(self) -> bool:
        deadline = current_deadline()
        return deadline is not None and deadline.expired and deadline.reason == INTERRUPTED

    def _step(self, step: Step) -> list[ItemResult]:
        """The step, retried after infrastructure errors and re-run once to confirm a failure."""
        items = self._attempt(step)
        tries = 1
        while any(i.status == "error" for i in items) and tries <= step.retries and not self._interrupted():
            items = self._attempt(step)
            tries += 1
        items = [replace(i, attempts=tries) if tries > 1 else i for i in items]
        if any(i.status == "fail" for i in items) and not self._interrupted():
            items = confirm(items, self._attempt(step))
        return items

    def _attempt(self, step: Step) -> list[ItemResult]:
        """One run of the step within its timeout (plus a grace for the agent's own verdict), past which
        the session is closed; an error of the device drops the session, so the next step reconnects."""
        start = time.monotonic()
        limit = Deadline(step.timeout + SHELL_GRACE_S)
        limit.on_expiry(self.connection.kill)
        limit.start()
        try:
            items = self._run_step(step)
        except DeviceError as exc:
            exc.for_device(self.device.name, step.name)
            self.connection.drop()
            why = f"timed out after {step.timeout:g} s" if limit.expired else reason_text(exc.reason)
            return [ItemResult(step.name, step.kind, "", "error" if limit.expired else grade(exc), why)]
        finally:
            limit.cancel()
        elapsed = round(time.monotonic() - start, 3)
        return [i if i.duration_s is not None else replace(i, duration_s=elapsed) for i in items]

    def _run_step(self, step: Step) -> list[ItemResult]:
        options = step.options
        if isinstance(options, HealthStep):
            return self._health(step, options)
        if isinstance(options, PushStep | SmokeStep | BenchStep):
            return self._push(step)
        if isinstance(options, CollectStep):
            return self._collect(step, options)
        if isinstance(options, ShellStep):
            return self._shell(step, options)
        raise AssertionError(f"unknown step kind {step.kind}")

    def _note_subjects(self, step: Step) -> None:
        for subject in self.job.subjects.get(step.name, ()):
            self.subjects[(subject.kind, subject.name)] = subject

    # ----- the step kinds -----

    def _health(self, step: Step, options: HealthStep) -> list[ItemResult]:
        """reachable, opencl, disk, then each limit; the first that does not pass ends the check. Every
        item is pass or error: a board that is not healthy is offline, never failing."""
        def item(name: str, status: Status = "pass", reason: str = "", metrics: tuple[Metric, ...] = ()
                 ) -> ItemResult:
            return ItemResult(step.name, step.kind, name, status, reason, metrics=metrics)

        session = self.connection.get()  # a DeviceError here: reachable is the step's error
        items = [item("reachable")]
        try:
            self._remember_fingerprint(ops.fingerprint(session, self.device.opencl.as_request(), remember=False,
                                                       timeout_s=min(step.timeout, self.device.timeouts.command)))
            items.append(item("opencl"))
        except AgentError as exc:
            return [*items, item("opencl", "error", reason_text(exc.reason))]
        if options.min_free_mb is not None:
            free = ops.disk_free(session)
            metric = (Metric("free_mb", round(free / (1 << 20), 1), "MiB"),)
            if free < options.min_free_mb << 20:
                return [*items, item("disk", "error", f"{free >> 20} MiB free under the remote dir, "
                                     f"needs {options.min_free_mb} MiB", metric)]
            items.append(item("disk", metrics=metric))
        for limit in options.limits:
            items.append(self._limit(step, limit, session))
            if items[-1].status != "pass":
                break
        return items

    def _limit(self, step: Step, limit: Limit, session: AgentSession) -> ItemResult:
        done = ops.shell(session, limit.command, min(step.timeout, 60.0), max_output=4096)
        if done.timed_out:
            return ItemResult(step.name, step.kind, limit.name, "error", f"{limit.command!r} timed out")
        number = parse_number(done.stdout)
        if done.exit != 0 or number is None:
            return ItemResult(step.name, step.kind, limit.name, "error",
                              reason_text(f"{limit.command!r} gave no number (exit {done.exit}): {done.stdout}"))
        value = round(number * limit.scale, 6)
        metrics = (Metric(limit.name, value, limit.unit),)
        shown = f"{limit.name} {value:g}{(' ' + limit.unit) if limit.unit else ''}"
        if limit.max is not None and value > limit.max:
            return ItemResult(step.name, step.kind, limit.name, "error", f"{shown} > max {limit.max:g}",
                              metrics=metrics)
        if limit.min is not None and value < limit.min:
            return ItemResult(step.name, step.kind, limit.name, "error", f"{shown} < min {limit.min:g}",
                              metrics=metrics)
        return ItemResult(step.name, step.kind, limit.name, "pass", metrics=metrics)

    def _remember_fingerprint(self, raw: Mapping[str, Any] | None) -> None:
        if not raw:
            return
        fid = str(raw.get("id", ""))  # checked by parse_fingerprint
        device = raw.get("device") if isinstance(raw.get("device"), Mapping) else None
        if device is None:
            return
        label = one_line(f"{device.get('name', '?')} driver {device.get('driver_version', '?')}", 160)
        self.fingerprint = Fingerprint(fid, label)

    def _push(self, step: Step) -> list[ItemResult]:
        job = self.job.pushes[step.name]
        self._note_subjects(step)
        session = self.connection.get()
        outcome, exc = push_on(session, self.device, job)
        self._remember_fingerprint(outcome.fingerprint)
        if exc is not None and grade(exc) == "error":
            raise exc  # the session may be broken: the attempt reconnects and retries
        if job.bench is not None:
            return bench_items(step, outcome, exc, job, self.job.subjects.get(step.name, ()))
        return push_items(step, outcome, exc, self.job.subjects.get(step.name, ()))

    def _collect(self, step: Step, options: CollectStep) -> list[ItemResult]:
        job = CollectJob(self.job.cache, patterns=options.paths, accept_new_host_keys=self.job.accept_new_host_keys)
        outcome = collect_on(self.connection.get(), self.device, job)
        return collect_items(step, outcome)

    def _shell(self, step: Step, options: ShellStep) -> list[ItemResult]:
        self._note_subjects(step)
        subject = subject_of(self.job.subjects.get(step.name, ()), "command", step.name)
        done = ops.shell(self.connection.get(), options.command, step.timeout)
        out, err = done.stdout, done.stderr

        def result(status: Status, reason: str = "", metrics: Sequence[Metric] = ()) -> list[ItemResult]:
            return [ItemResult(step.name, step.kind, "", status, reason_text(reason), subject=subject,
                               metrics=tuple(metrics))]

        if done.timed_out:
            return result("error", f"timed out after {step.timeout:g} s (its process group was killed)")
        code, signal = done.exit, done.signal
        if code != options.expect_exit:
            how = f"killed by signal {signal}" if code is None else f"exit {code} (expected {options.expect_exit})"
            tail = visible((err or out).strip()[-200:], 200)
            return result("fail", f"{how}{': ' + tail if tail else ''}")
        if options.metrics is None:
            return result("pass")
        metrics, why = shell_metrics(options.metrics.regex, options.metrics.json, options.metrics.units, out)
        return result("fail", why) if why else result("pass", metrics=metrics)


def _summary(result: DeviceResult) -> str:
    counts: dict[str, int] = {}
    for item in result.items:
        counts[item.status] = counts.get(item.status, 0) + 1
    text = ", ".join(f"{n} {s}" for s, n in counts.items())
    return f"{result.state}: {text}" if result.state != "ok" else text


# ----- the fleet -----


def lock_dir() -> Path:
    """Where fleet locks live: per user, beside no inventory (an inventory's folder may be read-only)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "deployer" / "locks"


def fleet_lock(inventory: Path, *, wait: float = 0.0) -> AbstractContextManager[None]:
    """One nightly run per fleet at a time (the fleet: the inventory file, by its real path); a second one
    is refused with a clear message, or waits `wait` seconds (`--wait`). A killed run's lock goes with it."""
    folder = lock_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalStateError(f"cannot create the lock folder {folder}: {exc.strerror or exc}") from exc
    key = hashlib.sha256(str(inventory.resolve()).encode()).hexdigest()[:16]
    return hold_lock(folder / f"fleet-{key}.lock", f"fleet {inventory}", wait=wait)


@dataclass(frozen=True, slots=True)
class RunResult:
    devices: tuple[DeviceResult, ...]
    interrupted: bool = False


def not_run(playbook: Playbook, device: str, why: str) -> DeviceResult:
    now = time.time()
    items = tuple(ItemResult(s.name, s.kind, "", "miss", why) for s in playbook.steps)
    return DeviceResult(device, "incomplete", now, now, items=items, reason=why)


def run_fleet(devices: Sequence[Device], job: RunJob, *, forks: int, progress: Progress,
              on_result: Callable[[DeviceResult], None]) -> RunResult:
    """Every device in parallel (at most `forks` at once); `on_result` (from the worker threads, one at a
    time per device) stores each device's result as soon as it is done."""
    stored: set[str] = set()
    lock = threading.Lock()

    def store(result: DeviceResult) -> None:  # once per device: a late worker after Ctrl-C is not stored again
        with lock:
            if result.device in stored:
                return
            stored.add(result.device)
        on_result(result)

    def work(device: Device) -> DeviceResult:
        try:
            result = DeviceRun(device, job, progress).run()
        except Exception:  # a bug: that device's steps miss, saying where its traceback is; the others go on
            result = not_run(job.playbook, device.name, bug_report(device.name))
            progress.finished(device.name, False, result.reason)
        store(result)
        return result

    try:
        return RunResult(tuple(fan_out(devices, work, forks=forks, label="run")))
    except FleetInterrupted as stopped:
        results = []
        for device, done in zip(devices, stopped.results, strict=True):
            if isinstance(done, DeviceResult):
                results.append(done)
            else:
                missed = not_run(job.playbook, device.name, INTERRUPTED)
                store(missed)
                results.append(missed)
        return RunResult(tuple(results), interrupted=True)
