"""Verdicts: each pass/fail result of a run judged against the same device's own past (docs/design.md, 13).

The comparable run of a result: the most recent EARLIER run (status complete or incomplete, not this one)
in which the same device has a result for the same (step, item) whose status is pass or fail, with the
same device fingerprint id and the same subject sha256. Earlier results with error/miss/skip are passed over
(never a baseline).

Against that run's result (the baseline), a result is:
- `new_failure`: the baseline passed, this fails; `fixed`: the baseline failed, this passes;
- `still_failing`, `still_passing`: both failed, both passed;
- `flaky`: the result is marked flaky now (it failed, then passed on its confirming re-run), or its status
  flipped pass <-> fail at least `flaky_flips` times among the last `flaky_window` comparable results,
  this one included. Flaky overrides new_failure, fixed and still_*;
- `no_baseline`: there is no comparable run. When the device does have an earlier pass/fail result for
  the item, the note says what changed since the latest one, driver first: "driver changed {old label} ->
  {new label}", "{kind} changed" (kernel, model, command: the kind of the Subject recorded with that sha256),
  or both joined by "; ".
Results with status error, miss or skip get no verdict: they are never a regression.

`judge` reads the past from the history and the run's own results from the caller (the executor has them
in memory; `History.device_results` gives them back for a stored run). The run must already be in the
history (`begin_run`), since "earlier" is measured from its start. It returns the verdicts; the caller
stores them with `History.record_verdicts`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from deployer.errors import HistoryError
from deployer.history.db import History, PastResult
from deployer.history.records import COMPARABLE, DeviceResult, ItemResult, Status, Verdict, VerdictKind

FLAKY_WINDOW = 10
FLAKY_FLIPS = 3
_KINDS: dict[tuple[Status, Status], VerdictKind] = {  # (baseline, now)
    ("pass", "fail"): "new_failure", ("fail", "pass"): "fixed",
    ("fail", "fail"): "still_failing", ("pass", "pass"): "still_passing",
}


@dataclass(frozen=True, slots=True)
class VerdictCounts:
    """How many of each verdict one device got in a run: the run's table and its exit code read these."""

    new_failure: int = 0
    fixed: int = 0
    still_failing: int = 0
    flaky: int = 0
    still_passing: int = 0
    no_baseline: int = 0


def judge(history: History, run_id: int, results: Sequence[DeviceResult], *, flaky_window: int = FLAKY_WINDOW,
          flaky_flips: int = FLAKY_FLIPS) -> list[Verdict]:
    """A verdict for every pass/fail item of `results`, device by device in their order."""
    if flaky_window < 1 or flaky_flips < 1:
        raise ValueError(f"flaky_window and flaky_flips must be at least 1 (got {flaky_window}, {flaky_flips})")
    if history.run(run_id) is None:
        raise HistoryError(f"{history.path} has no run {run_id}: begin_run it before judging")
    return [_judge_item(history, run_id, device, item, flaky_window, flaky_flips)
            for device in results for item in device.items if item.status in COMPARABLE]


def _judge_item(history: History, run_id: int, device: DeviceResult, item: ItemResult, window: int,
                flips_needed: int) -> Verdict:
    fingerprint_id = device.fingerprint.id if device.fingerprint else None
    past = history.comparable_results(run_id, device.device, item.step, item.item, fingerprint_id=fingerprint_id,
                                      subject=item.subject, limit=max(window - 1, 1))
    baseline = past[0] if past else None
    statuses = [item.status, *(p.status for p in past[: window - 1])]
    kind: VerdictKind
    if item.flaky or flips(statuses) >= flips_needed:
        kind = "flaky"
    elif baseline is None:
        kind = "no_baseline"
    else:
        kind = _KINDS[(baseline.status, item.status)]
    note = "" if baseline else _change_note(history, run_id, device, item)
    return Verdict(device=device.device, step=item.step, item=item.item, kind=kind, note=note,
                   baseline_run=baseline.run_id if baseline else None)


def flips(statuses: Sequence[Status]) -> int:
    """How many times consecutive statuses differ: pass, fail, pass is 2."""
    return sum(1 for newer, older in zip(statuses, statuses[1:], strict=False) if newer != older)


def _change_note(history: History, run_id: int, device: DeviceResult, item: ItemResult) -> str:
    """What differs from the latest earlier pass/fail result of the item, when none is comparable."""
    latest = history.earlier_results(run_id, device.device, item.step, item.item, limit=1)
    return change_note(latest[0], device, item) if latest else ""


def change_note(before: PastResult, device: DeviceResult, item: ItemResult) -> str:
    """"driver changed A -> B", "kernel changed", both joined by "; ", or "" when nothing differs."""
    changes = []
    now_id, now_label = (device.fingerprint.id, device.fingerprint.label) if device.fingerprint else (None, None)
    if before.fingerprint_id != now_id:
        changes.append(f"driver changed {before.fingerprint_label or 'unknown'} -> {now_label or 'unknown'}")
    if before.subject != item.subject:
        recorded = {s.sha256: s.kind for s in device.subjects}
        changes.append(f"{recorded.get(item.subject) or before.subject_kind or 'subject'} changed")
    return "; ".join(changes)


def summarize(verdicts: Iterable[Verdict], devices: Iterable[str] = ()) -> dict[str, VerdictCounts]:
    """Counts per device; `devices` adds those with no verdict at all (zeros), in that order first."""
    counted: dict[str, Counter[str]] = {device: Counter() for device in devices}
    for verdict in verdicts:
        counted.setdefault(verdict.device, Counter())[verdict.kind] += 1
    return {device: VerdictCounts(**{kind: counts[kind] for kind in _FIELDS}) for device, counts in counted.items()}


_FIELDS = tuple(VerdictCounts.__dataclass_fields__)
