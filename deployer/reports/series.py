"""Metric series over nights, read from the history through its public methods (`History.runs`,
`History.device_results`): what the HTML report draws as "latency over nights".

A night is a run of the same playbook that started no later than the reported run (the reported run
itself included, whatever its status; other runs only when finished, complete or incomplete). A series
is one device's values of one metric of one (step, item), night by night (None where the device has no
value that night). A device's fingerprint per night splits its nights into segments: a new segment starts
where the fingerprint id changes (nights without a fingerprint, offline or absent, continue the current
one). Each segment's baseline is the median and the interquartile range of its values, the reported
night left out, so the band shows where that night stands against its own driver's past.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from deployer.errors import HistoryError
from deployer.history.db import History, RunInfo

NIGHTS = 90  # how many nights the report reads back, the reported one included
MIN_BASELINE = 3  # values a segment needs before the reported night for a baseline band


class SeriesKey(NamedTuple):
    """One series: a device's metric of one (step, item). A plain 4-tuple compares equal."""

    device: str
    step: str
    item: str
    metric: str


@dataclass(frozen=True, slots=True)
class Night:
    run_id: int
    started: float  # epoch seconds


@dataclass(frozen=True, slots=True)
class Segment:
    """Consecutive nights of one device on one fingerprint: indexes into `Nights.nights`, both included."""

    fingerprint_id: str
    label: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Baseline:
    """A segment's median and interquartile range, over its values before the reported night."""

    first: int
    last: int
    median: float
    iqr: float
    count: int

    @property
    def low(self) -> float:
        return self.median - self.iqr

    @property
    def high(self) -> float:
        return self.median + self.iqr


@dataclass(frozen=True, slots=True)
class Series:
    key: SeriesKey
    unit: str
    values: tuple[float | None, ...]  # one per night


@dataclass(frozen=True, slots=True)
class Nights:
    """What the report draws over time: the nights, oldest first, each device's fingerprint per night
    (id, label; None when the device has none that night), and every metric series."""

    nights: tuple[Night, ...]
    fingerprints: dict[str, tuple[tuple[str, str] | None, ...]]
    series: dict[SeriesKey, Series]

    @property
    def current(self) -> int:
        """The reported night's index: the last."""
        return len(self.nights) - 1

    def index(self, run_id: int) -> int | None:
        return next((i for i, n in enumerate(self.nights) if n.run_id == run_id), None)


def read_nights(history: History, run_id: int, *, nights: int = NIGHTS) -> Nights:
    """The last `nights` nights up to `run_id` (see the module docstring), read whole."""
    runs = _nights(history, run_id, nights)
    fingerprints: dict[str, list[tuple[str, str] | None]] = {}
    values: dict[SeriesKey, list[float | None]] = {}
    units: dict[SeriesKey, str] = {}
    for index, run in enumerate(runs):
        for device in history.device_results(run.id):
            per_night = fingerprints.setdefault(device.device, [None] * len(runs))
            if device.fingerprint is not None:
                per_night[index] = (device.fingerprint.id, device.fingerprint.label)
            for item in device.items:
                for metric in item.metrics:
                    key = SeriesKey(device.device, item.step, item.item, metric.name)
                    finite = metric.value if math.isfinite(metric.value) else None  # nan, inf: not drawn
                    values.setdefault(key, [None] * len(runs))[index] = finite
                    units[key] = metric.unit or units.get(key, "")
    return Nights(nights=tuple(Night(r.id, r.started) for r in runs),
                  fingerprints={d: tuple(f) for d, f in sorted(fingerprints.items())},
                  series={k: Series(k, units[k], tuple(values[k])) for k in sorted(values)})


def _nights(history: History, run_id: int, count: int) -> list[RunInfo]:
    """The reported run and the finished runs of its playbook before it, oldest first, `count` at most.
    `History.runs` lists newest first with a limit: ask for more until enough are found or none are left."""
    if count < 1:
        raise ValueError(f"nights must be at least 1 (got {count})")
    limit = 4 * count
    while True:
        runs = history.runs(limit=limit)
        at = next((i for i, r in enumerate(runs) if r.id == run_id), None)
        if at is not None:
            this = runs[at]
            earlier = [r for r in runs[at + 1:] if r.playbook == this.playbook and r.status != "running"]
            if len(earlier) >= count - 1 or len(runs) < limit:
                return [this, *earlier[: count - 1]][::-1]
        elif len(runs) < limit:
            raise HistoryError(f"{history.path} has no run {run_id}")
        limit *= 4


def segments(fingerprints: Sequence[tuple[str, str] | None]) -> list[Segment]:
    """A device's fingerprint per night cut where its id changes; nights without one join the segment
    they fall in (before the first fingerprint: the first segment)."""
    found: list[Segment] = []
    for index, fingerprint in enumerate(fingerprints):
        if fingerprint is None:
            continue
        if found and found[-1].fingerprint_id == fingerprint[0]:
            found[-1] = Segment(found[-1].fingerprint_id, fingerprint[1], found[-1].first, index)
            continue
        if found:  # the nights since its last fingerprint stay in the segment before
            found[-1] = Segment(found[-1].fingerprint_id, found[-1].label, found[-1].first, index - 1)
        found.append(Segment(fingerprint[0], fingerprint[1], index if found else 0, index))
    if found:  # and so do trailing nights without one
        found[-1] = Segment(found[-1].fingerprint_id, found[-1].label, found[-1].first, len(fingerprints) - 1)
    return found


def baselines(values: Sequence[float | None], cuts: Sequence[Segment], current: int) -> list[Baseline]:
    """Each segment's median +- IQR over its values, the night `current` left out; a segment with fewer than
    MIN_BASELINE values has none."""
    spans = [(s.first, s.last) for s in cuts] or [(0, len(values) - 1)]
    found = []
    for first, last in spans:
        kept = [v for i, v in enumerate(values[first:last + 1], first) if v is not None and i != current]
        if len(kept) < MIN_BASELINE:
            continue
        quartiles = statistics.quantiles(kept, n=4, method="inclusive")
        found.append(Baseline(first, last, statistics.median(kept), quartiles[2] - quartiles[0], len(kept)))
    return found
