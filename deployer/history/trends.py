"""Latency verdicts for a run: every bench series of every device judged within its segment
(docs/regressions.md), from the repeats in the history. The method is `deployer.history.latency`; this
module picks each series' nights: same device, step, item and timing, same fingerprint and subject, since
the series was last accepted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from deployer.history.db import History
from deployer.history.latency import Night, Settings, judge_series
from deployer.history.records import DeviceResult, LatencyResult

PRIMARY = ("device_ms", "wall_ms")  # the first of these a result has is the one judged
MAX_NIGHTS = 60


def primary_sample(names: Sequence[str]) -> str | None:
    return next((name for name in PRIMARY if name in names), None)


def judge_latency(history: History, run_id: int, devices: Sequence[DeviceResult],
                  min_change: Mapping[str, float]) -> list[LatencyResult]:
    """One verdict per (device, bench item) that passed tonight; `min_change` by step name."""
    results = []
    for device in devices:
        fingerprint = device.fingerprint.id if device.fingerprint else None
        for item in device.items:
            metric = primary_sample([s.name for s in item.samples])
            if item.status != "pass" or metric is None:
                continue
            nights = [Night(run, started, tuple(values)) for run, started, values in history.sample_nights(
                run_id, device.device, item.step, item.item, metric, fingerprint_id=fingerprint,
                subject=item.subject, limit=MAX_NIGHTS)]
            verdict = judge_series(nights, Settings(min_change=min_change.get(item.step, 0.05)))
            results.append(LatencyResult(device.device, item.step, item.item, metric, verdict.kind,
                                         verdict.since_run, verdict.change, verdict.p_value, verdict.baseline,
                                         verdict.current, verdict.note))
    return results
