"""The run report (docs/report.md): one JSON object for a run, built from its records alone, so that
`deploy run --json` and the reports written later from the history are the same object."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployer.history.db import RunInfo
from deployer.history.records import STATUSES, DeviceResult, ItemResult, LatencyResult, Verdict

REPORT_SCHEMA = "deployer.run"
REPORT_SCHEMA_VERSION = 1
VERDICT_COUNTS = ("new_failure", "fixed", "still_failing", "flaky", "no_baseline")


LATENCY_COUNTS = ("regression", "improvement", "no_change", "no_baseline")


def run_report(run: RunInfo, devices: Sequence[DeviceResult], verdicts: Sequence[Verdict], *,
               history: str, interrupted: bool = False, latency: Sequence[LatencyResult] = ()) -> dict[str, Any]:
    by_item = {(v.device, v.step, v.item): v for v in verdicts}
    trends = {(t.device, t.step, t.item): t for t in latency}
    return {
        "schema": REPORT_SCHEMA, "schema_version": REPORT_SCHEMA_VERSION,
        "run": {"id": run.id, "history": history, "interrupted": interrupted,
                "status": "incomplete" if interrupted or run.status != "complete" else "complete",
                "playbook": {"name": run.playbook, "file": run.playbook_path, "sha256": run.playbook_sha256},
                "fleet": run.fleet, "started": run.started, "ended": run.ended},
        "summary": {
            "devices": len(devices), "offline": sum(1 for d in devices if d.state == "offline"),
            "results": {s: sum(1 for d in devices for i in d.items if i.status == s) for s in STATUSES},
            "verdicts": {k: sum(1 for v in verdicts if v.kind == k) for k in VERDICT_COUNTS},
            "latency": {k: sum(1 for t in latency if t.kind == k) for k in LATENCY_COUNTS},
        },
        "devices": [_device(d, by_item, trends) for d in devices],
    }


Key = tuple[str, str, str]


def _device(device: DeviceResult, by_item: dict[Key, Verdict], trends: dict[Key, LatencyResult]) -> dict[str, Any]:
    return {
        "name": device.device, "state": device.state, "status": device.status, "reason": device.reason,
        "started": device.started, "ended": device.ended,
        "fingerprint": None if device.fingerprint is None else {"id": device.fingerprint.id,
                                                               "label": device.fingerprint.label},
        "counts": {s: sum(1 for i in device.items if i.status == s) for s in STATUSES},
        "results": [_result(i, by_item.get(key := (device.device, i.step, i.item)), trends.get(key))
                    for i in device.items],
    }


def _result(item: ItemResult, verdict: Verdict | None, trend: LatencyResult | None) -> dict[str, Any]:
    return {
        "step": item.step, "kind": item.kind, "item": item.item, "status": item.status, "reason": item.reason,
        "flaky": item.flaky, "attempts": item.attempts, "subject": item.subject, "duration_s": item.duration_s,
        "metrics": [{"name": m.name, "value": m.value, "unit": m.unit} for m in item.metrics],
        "verdict": None if verdict is None else {"kind": verdict.kind, "label": verdict.label, "note": verdict.note,
                                                 "baseline_run": verdict.baseline_run},
        "samples": [{"name": x.name, "unit": x.unit, "n": len(x.values)} for x in item.samples],
        "latency": None if trend is None else {
            "metric": trend.metric, "kind": trend.kind, "since_run": trend.since_run, "change": trend.change,
            "p_value": trend.p_value, "baseline": trend.baseline, "current": trend.current, "note": trend.note},
    }
