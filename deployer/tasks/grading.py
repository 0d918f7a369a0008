"""How a nightly run grades what a step did into item results (docs/playbooks.md): each step kind's
outcome turned into `pass`, `fail` (the board answered wrong), `error` (infrastructure), `miss` (not run)
or `skip` (not applicable), with the metrics and repeats kept; and the confirming re-run of a failure.
Every string that came from a board is made printable and bounded here."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from deployer.config.playbooks import Step
from deployer.errors import AgentError, CompileError, DeviceError, SmokeMismatch
from deployer.history.latency import night_stats
from deployer.history.records import ItemResult, Metric, Sample, Status, Subject
from deployer.tasks.bench import BenchItem
from deployer.tasks.collect import CollectOutcome
from deployer.tasks.push import DeviceOutcome, NotDeployed, PushJob
from deployer.text import one_line

MAX_REASON = 300


def grade(exc: DeviceError) -> Status:
    """A device error's status: the board answered wrong (fail), was busy (miss) or the rest (error)."""
    if isinstance(exc, CompileError | SmokeMismatch):
        return "fail"
    if isinstance(exc, NotDeployed) or (isinstance(exc, AgentError) and exc.kind == "locked"):
        return "miss"
    return "error"


def reason_text(text: object) -> str:
    return one_line(str(text), MAX_REASON)


def subject_of(subjects: Sequence[Subject], kind: str, name: str) -> str:
    return next((s.sha256 for s in subjects if s.kind == kind and s.name == name), "")


def push_items(step: Step, outcome: DeviceOutcome, exc: DeviceError | None,
               subjects: Sequence[Subject]) -> list[ItemResult]:
    """A push or smoke step's results: the step as a whole (with the start-up figures as metrics), each
    smoke case, each model."""
    status: Status = "pass" if exc is None else grade(exc)
    metrics: list[Metric] = []
    if outcome.startup is not None:
        for program in outcome.startup.programs:
            for name in ("load_from_binary_ms", "build_from_source_ms"):
                value = getattr(program, name, None)
                if isinstance(value, int | float):
                    metrics.append(Metric(f"{program.key}.{name}", float(value), "ms"))
    items = [ItemResult(step.name, step.kind, "", status, "" if exc is None else reason_text(exc.reason),
                        duration_s=sum(outcome.stages.values()), metrics=tuple(metrics))]
    if exc is not None and status != "fail":
        return items  # infrastructure, a lock, nothing deployed: the cases did not run, the step says why
    for case in outcome.kernels:
        subject = subject_of(subjects, "kernel", case.program_key)
        if case.smoke == "passed":
            items.append(ItemResult(step.name, step.kind, f"case {case.name}", "pass", subject=subject))
        elif case.smoke == "failed" or (not case.built and case.detail == "build failed"):
            items.append(ItemResult(step.name, step.kind, f"case {case.name}", "fail",
                                    reason_text(case.detail or "failed"), subject=subject))
        else:
            items.append(ItemResult(step.name, step.kind, f"case {case.name}", "skip",
                                    reason_text(case.detail or case.smoke), subject=subject))
    for model in outcome.models:
        subject = subject_of(subjects, "model", model.name)
        model_metrics = tuple(Metric(name, float(value), "ms") for name, value in
                              (("first_inference_ms", model.first_inference_ms), ("steady_ms", model.steady_ms))
                              if value is not None)
        model_status: Status = "skip" if model.ok is None else "pass" if model.ok else "fail"
        items.append(ItemResult(step.name, step.kind, f"model {model.name}", model_status,
                                "" if model.ok else reason_text(model.detail or ""), subject=subject,
                                metrics=model_metrics))
    return items


def bench_items(step: Step, outcome: DeviceOutcome, exc: DeviceError | None, job: PushJob,
                subjects: Sequence[Subject]) -> list[ItemResult]:
    """A bench step's results: the step as a whole (each program's creation from its binary as a metric,
    timed apart), then each case and model with every repeat kept
    (`samples`) and its night's median, p90, min and IQR as metrics; a case that failed on the board
    (does not fit its memory, timed out) is an `error`, the others go on."""
    status: Status = "pass" if exc is None else grade(exc)
    created = tuple(Metric(f"{key}.create_ms", round(ms, 3), "ms") for key, ms in sorted(outcome.create_ms.items()))
    items = [ItemResult(step.name, step.kind, "", status, "" if exc is None else reason_text(exc.reason),
                        duration_s=sum(outcome.stages.values()), metrics=created)]
    if exc is not None:
        return items
    timed = {(b.kind, b.name): b for b in outcome.bench}
    assert job.bench is not None
    for case in job.bench.plan.cases:
        subject = subject_of(subjects, "kernel", case.program_key)
        found = timed.get(("case", case.id))
        items.append(_bench_item(step, f"bench {case.id}", found, subject, "not run on this device (its "
                                 "program is skipped here)"))
    for name, why in job.bench.plan.skipped.items():
        items.append(ItemResult(step.name, step.kind, f"bench {name}", "skip", why))
    for model in job.models:
        subject = subject_of(subjects, "model", model.model.name)
        found = timed.get(("model", model.model.name))
        items.append(_bench_item(step, f"model {model.model.name}", found, subject, "not run on this device"))
    return items


def _bench_item(step: Step, name: str, found: BenchItem | None, subject: str, why_not: str) -> ItemResult:
    if found is None:
        return ItemResult(step.name, step.kind, name, "skip", why_not, subject=subject)
    if not found.ok:
        return ItemResult(step.name, step.kind, name, "error", reason_text(found.error or "failed"), subject=subject)
    samples = tuple(Sample(label, "ms", values) for label, values in (("device_ms", found.device_ms),
                                                                      ("wall_ms", found.wall_ms)) if values)
    metrics: list[Metric] = []
    if samples:
        stats = night_stats(samples[0].values)
        metrics = [Metric(f"{samples[0].name}.{k}", round(v, 6), "ms") for k, v in
                   (("median", stats.median), ("p90", stats.p90), ("min", stats.min), ("iqr", stats.iqr))]
    return ItemResult(step.name, step.kind, name, "pass", subject=subject, metrics=tuple(metrics), samples=samples)


def collect_items(step: Step, outcome: CollectOutcome) -> list[ItemResult]:
    """One result per file found: kept (pass), or refused, unreadable, invalid, or one MACE would throw
    away on this device (`cold`: built for another driver or platform) (fail)."""
    if outcome.error is not None:
        return [ItemResult(step.name, step.kind, "", "error", reason_text(outcome.error))]
    if not outcome.files:
        return [ItemResult(step.name, step.kind, "", "skip", "no file matched the collect paths")]
    items = []
    for file in outcome.files:
        verdict = (file.record or {}).get("verdict")
        if not file.ok:
            items.append(ItemResult(step.name, step.kind, file.remote_path, "fail",
                                    reason_text(file.detail or file.status)))
        elif isinstance(verdict, Mapping) and verdict.get("mace") == "cold":
            items.append(ItemResult(step.name, step.kind, file.remote_path, "fail",
                                    reason_text(f"MACE would not use it: {verdict.get('reason', '')}")))
        else:
            items.append(ItemResult(step.name, step.kind, file.remote_path, "pass"))
    return items


def parse_number(text: str) -> float | None:
    match = re.search(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)
    return float(match.group()) if match else None


def shell_metrics(spec_regex: str | None, as_json: bool, units: Mapping[str, str],
                  stdout: str) -> tuple[list[Metric], str]:
    """The metrics a shell step captures from its output; (metrics, why none) ."""
    if as_json:
        try:
            value = json.loads(stdout)
        except ValueError as exc:
            return [], f"output is not JSON ({exc})"
        if not isinstance(value, dict):
            return [], "JSON output is not an object"
        return [Metric(one_line(str(k), 64), float(v), units.get(str(k), "")) for k, v in value.items()
                if isinstance(v, int | float) and not isinstance(v, bool)][:64], ""
    if spec_regex is None:
        return [], ""
    match = re.search(spec_regex, stdout, re.MULTILINE)
    if match is None:
        return [], "the metrics regex matched nothing in the output"
    metrics = []
    for name, text in match.groupdict().items():
        number = parse_number(text or "")
        if number is None:
            return [], f"metric {name}: {one_line(str(text), 40)!r} is not a number"
        metrics.append(Metric(name, number, units.get(name, "")))
    return metrics, ""


def confirm(first: Sequence[ItemResult], again: Sequence[ItemResult]) -> list[ItemResult]:
    """The confirming re-run of a step with failures: a failed item that passes now is `pass` marked
    flaky; one that fails again (or could not be re-run) stays failed, confirmed."""
    rerun = {i.key: i for i in again}
    confirmed = []
    for item in first:
        if item.status != "fail":
            confirmed.append(item)
            continue
        second = rerun.get(item.key)
        if second is not None and second.status == "pass":
            confirmed.append(replace(second, flaky=True, attempts=item.attempts + 1,
                                     reason=f"flaky: failed first ({item.reason})"))
        else:
            confirmed.append(replace(item, attempts=item.attempts + 1))
    return confirmed
