"""Latency verdicts: did a series (device x kernel or model x metric) get slower, and since which night.

The caller passes the nights of ONE segment, oldest first, tonight last: the same device fingerprint and
the same subject (kernel sources and options, model bytes), after any level a person accepted. A driver,
source, option or model change starts a new segment and is therefore never a regression (the caller
enforces that by what it passes). docs/regressions.md explains the method and its measured quality.

Method (Hunter / Apache Otava's change points on the nightly medians, plus a same-night check):
1. Each night is summarised by the median of its repeats, and the series fitted is log(median): latency
   noise is multiplicative (a 15% step is the same step on a 0.1 ms and on a 100 ms kernel), and the log
   of a log-normal night is normal, which the t-test assumes.
2. Change points: E-divisive means (Matteson & James 2014) proposes the cut that maximises the energy
   distance between the two sides; a pooled Student t-test of the two sides keeps it when p < `split_p`
   (Otava's relaxed first pass), recursively, in windows of `window` nights. Hunter's merge then drops
   the change point that fails its threshold worst, one at a time, then any that moves the level by less
   than `min_change`. The threshold is `max_p` for a slowdown and `improvement_p` for a speed-up, spent
   as (fresh_nights / age)^2 once a step is older than `fresh_nights` nights (`Settings.threshold`).
   Every level lasts at least `min_run` nights, so one or two odd nights are never a step.
3. The latest change point is the step judged, and tonight's raw repeats must bear it out: a one-sided
   Mann-Whitney U test of tonight's repeats against those of the last `recent_nights` nights before the
   step, scaled by (1 + min_change). A fresh step is reported only when tonight is significantly more than
   `min_change` off the old level (p < `night_p`); an older one until tonight is significantly within it.
4. The step's size, new level / old level - 1 (each level the median of its nights' medians), is at
   least `min_change` (5%) in absolute value.

A step that began some nights ago and persists is reported again every night, `regression` with the same
`since_run` (re-estimated nightly from all the nights, so it can move by a night while the evidence is
thin), until a person accepts the new level (`deploy history accept`), which starts a new segment. That is
what a lab wants: a slowdown stays on the morning report until someone has looked at it.

The statistics are implemented here with math and numpy only: the Student t CDF through the regularized
incomplete beta function (Lentz's continued fraction), Mann-Whitney U with its normal approximation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

LatencyKind = Literal["regression", "improvement", "no_change", "no_baseline"]
FloatArray = npt.NDArray[np.float64]
Sample = Sequence[float] | FloatArray
Alternative = Literal["greater", "less", "two-sided"]


@dataclass(frozen=True, slots=True)
class Night:
    """One nightly run's measurements of one series."""

    run_id: int
    started: float  # epoch seconds; nights are given oldest first
    repeats: tuple[float, ...]  # tonight's raw repeats (e.g. ms), warm-up already discarded


@dataclass(frozen=True, slots=True)
class NightStats:
    """What the report shows of one night; the detector itself uses only the median."""

    n: int
    median: float
    p90: float
    min: float
    iqr: float


@dataclass(frozen=True, slots=True)
class LatencyVerdict:
    """Tonight's verdict on one series; levels in the unit of the repeats."""

    kind: LatencyKind
    since_run: int | None  # run_id of the night the step began (regression/improvement)
    change: float | None  # new level / old level - 1, e.g. 0.15 for 15% slower
    p_value: float | None  # the step's t-test p (regression/improvement, or a step refused tonight)
    baseline: float | None  # the level before the step (or of the segment's earlier nights, for no_change)
    current: float | None  # the level now: after the step, or tonight's median
    note: str = ""  # a line a person reads, e.g. "15.2% slower since run 20 (p=1e-05)"


@dataclass(frozen=True, slots=True)
class Settings:
    """The detector's parameters (docs/regressions.md has the why of each). The p thresholds and night
    counts were chosen on synthetic series (3% within-night and 5% night-to-night log-normal noise, 20
    repeats a night, as in tests/test_latency.py) drawn with seeds other than the test's."""

    min_change: float = 0.05  # steps smaller than this (|new/old - 1|) are never reported
    min_nights: int = 12  # fewer nights in the segment: no_baseline (the night-to-night noise is not known yet)
    max_p: float = 4e-4  # a slowdown is a change point when its two-sided t-test p is below this
    improvement_p: float = 4e-6  # the same for a speed-up: good news can wait a few nights for strong evidence
    fresh_nights: int = 5  # a step older than this needs p below the above * (fresh_nights / age)^2
    split_p: float = 4e-3  # first-pass threshold of the split step: 10x max_p, as Otava's
    min_run: int = 3  # nights on each side of a change point: one or two odd nights are never a step
    window: int = 50  # nights per E-divisive window (Otava's default); longer segments overlap by half
    recent_nights: int = 5  # nights before the step that tonight's repeats are compared with
    night_p: float = 0.002  # tonight's one-sided Mann-Whitney p must be below this (asv compare's threshold)

    def __post_init__(self) -> None:
        if not 0 <= self.min_change < 1:
            raise ValueError(f"min_change must be in [0, 1) (got {self.min_change})")
        if self.min_run < 2:
            raise ValueError(f"min_run must be at least 2 (got {self.min_run})")
        if self.min_nights < 2 * self.min_run:
            raise ValueError(f"min_nights must be at least 2 * min_run = {2 * self.min_run} (got {self.min_nights})")
        if self.window < 2 * self.min_run or self.recent_nights < 1 or self.fresh_nights < 1:
            raise ValueError(f"window must be at least 2 * min_run, recent_nights and fresh_nights at least 1 "
                             f"(got {self.window}, {self.recent_nights}, {self.fresh_nights})")
        for name in ("max_p", "improvement_p", "split_p", "night_p"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1] (got {getattr(self, name)})")
        if self.split_p < max(self.max_p, self.improvement_p):
            raise ValueError(f"split_p must be at least max_p and improvement_p (got {self.split_p}): the first "
                             f"pass would refuse what the merge accepts")

    def threshold(self, t: float, age: int) -> float:
        """The p a change point must beat: by direction (t > 0: slower) and age (nights since it began).
        Each night the detector looks at every step again, so a step `age` nights old has had `age` looks:
        spending the error budget as 1/age^2 past the first `fresh_nights` keeps the total over all looks
        bounded, while a real step's p falls exponentially with its age and stays far below."""
        base = self.max_p if t > 0 else self.improvement_p
        return base * min(1.0, (self.fresh_nights / age) ** 2)


DEFAULT = Settings()


# --- Per-night statistics ---------------------------------------------------------------------------------

def night_stats(repeats: Sequence[float]) -> NightStats:
    """Count, median, 90th percentile, minimum and interquartile range of one night's repeats."""
    if len(repeats) == 0:
        raise ValueError("a night needs at least one repeat")
    values = np.asarray(repeats, dtype=np.float64)
    q25, median, q75, p90 = np.percentile(values, [25, 50, 75, 90])
    return NightStats(n=len(values), median=float(median), p90=float(p90), min=float(values.min()),
                      iqr=float(q75 - q25))


def _median(values: Sequence[float]) -> float:
    # Plain Python: for 20-odd values it is several times faster than np.median, and it runs for every
    # night of the segment on every call.
    ordered = sorted(values)
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


# --- Distributions ----------------------------------------------------------------------------------------

def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by Lentz's continued fraction (Numerical Recipes
    6.4), evaluated on the side of (a + 1) / (a + b + 2) where it converges fast."""
    if a <= 0 or b <= 0 or not 0 <= x <= 1:
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1 (got {a}, {b}, {x})")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < eps:
            return result
    return result  # not reached for the t and F arguments used here (a, b < 1000)


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive (got {df})")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1 - tail if t > 0 else tail


def normal_sf(z: float) -> float:
    """P(Z > z) for the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def t_test(left: Sequence[float], right: Sequence[float]) -> tuple[float, float]:
    """Student's pooled two-sample t-test (equal variances, as Hunter's): (t, two-sided p). Either side may
    hold one value when the other holds two or more."""
    n1, n2 = len(left), len(right)
    if n1 < 1 or n2 < 1 or n1 + n2 < 3:
        raise ValueError(f"a t-test needs n1, n2 >= 1 and n1 + n2 >= 3 (got {n1}, {n2})")
    m1, m2 = math.fsum(left) / n1, math.fsum(right) / n2
    ss = math.fsum((v - m1) ** 2 for v in left) + math.fsum((v - m2) ** 2 for v in right)
    return _t_from_stats(m1, m2, ss, n1, n2)


def _t_from_stats(m1: float, m2: float, ss: float, n1: int, n2: int) -> tuple[float, float]:
    df = n1 + n2 - 2
    scale = math.sqrt(max(ss, 0.0) / df * (1 / n1 + 1 / n2))
    diff = m2 - m1
    if scale <= 1e-12 * max(abs(m1), abs(m2), 1e-300):  # no spread: any difference is certain
        return (math.copysign(math.inf, diff), 0.0) if diff else (0.0, 1.0)
    t = diff / scale
    return t, betainc(df / 2, 0.5, df / (df + t * t))  # P(|T| > |t|), without the 1 - cdf cancellation


def mann_whitney(x: Sample, y: Sample, alternative: Alternative = "two-sided") -> tuple[float, float]:
    """Mann-Whitney U of `x` against `y` with the normal approximation (tie and continuity corrected):
    (U of x, p). "greater": x tends to be larger than y."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("Mann-Whitney needs two non-empty samples")
    combined = np.concatenate([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)])
    _, inverse, counts = np.unique(combined, return_inverse=True, return_counts=True)
    group_ranks = np.cumsum(counts) - (counts - 1) / 2  # the average rank of each group of tied values
    u = float(group_ranks[inverse[:n1]].sum()) - n1 * (n1 + 1) / 2
    n = n1 + n2
    ties = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))) if n > 1 else 0.0
    mean = n1 * n2 / 2
    if sigma == 0:
        return u, 1.0
    if alternative == "greater":
        return u, normal_sf((u - mean - 0.5) / sigma)
    if alternative == "less":
        return u, normal_sf((mean - u - 0.5) / sigma)
    return u, min(1.0, 2 * normal_sf((abs(u - mean) - 0.5) / sigma))


# --- Change points: E-divisive means + t-test (split), Hunter's merge ---------------------------------------

class _Levels:
    """A series of log medians with prefix sums, so any run's mean and sum of squares costs O(1)."""

    def __init__(self, medians: Sequence[float]) -> None:
        if any(not (m > 0 and math.isfinite(m)) for m in medians):
            raise ValueError("latencies must be positive finite numbers")
        self.medians = list(medians)
        logs = [math.log(m) for m in medians]
        origin = logs[0] if logs else 0.0  # centred: the sums of squares do not cancel catastrophically
        self.z = np.array([v - origin for v in logs], dtype=np.float64)
        self.s1, self.s2 = [0.0], [0.0]
        for v in self.z.tolist():
            self.s1.append(self.s1[-1] + v)
            self.s2.append(self.s2[-1] + v * v)

    def __len__(self) -> int:
        return len(self.medians)

    def t_test(self, start: int, cut: int, stop: int) -> tuple[float, float]:
        """(t, two-sided p) of the pooled t-test of [start, cut) against [cut, stop); t > 0: slower after."""
        n1, n2 = cut - start, stop - cut
        sum1, sum2 = self.s1[cut] - self.s1[start], self.s1[stop] - self.s1[cut]
        ss1 = self.s2[cut] - self.s2[start] - sum1 * sum1 / n1
        ss2 = self.s2[stop] - self.s2[cut] - sum2 * sum2 / n2
        return _t_from_stats(sum1 / n1, sum2 / n2, ss1 + ss2, n1, n2)

    def best_cut(self, start: int, stop: int, near: int, min_run: int) -> int:
        """The least-squares cut of [start, stop) within `min_run - 1` nights of `near`, sides of one night
        allowed. The energy statistic favours balanced sides: two slow nights at the end of a series come
        back as a 3-night level that starts with an old-level night. The two-level fit puts the cut where
        the new level starts, and the caller refuses it while that level is shorter than `min_run`."""
        def explained(cut: int) -> float:  # between-sides sum of squares, up to a constant of the interval
            sum1, sum2 = self.s1[cut] - self.s1[start], self.s1[stop] - self.s1[cut]
            return sum1 * sum1 / (cut - start) + sum2 * sum2 / (stop - cut)
        cuts = range(max(start + 1, near - min_run + 1), min(stop - 1, near + min_run - 1) + 1)
        return max(cuts, key=explained)

    def level(self, start: int, stop: int) -> float:
        """The level of nights [start, stop): the median of their medians (robust to one odd night)."""
        return _median(self.medians[start:stop])

    def change(self, start: int, cut: int, stop: int) -> float:
        return self.level(cut, stop) / self.level(start, cut) - 1


def _candidate(z: FloatArray, start: int, stop: int, min_run: int) -> tuple[int, int, float] | None:
    """E-divisive means' proposal in z[start:stop]: the cut tau maximising the energy statistic
    Q(tau, kappa) between z[start:tau] and z[tau:kappa] over every kappa (Matteson & James 2014, alpha = 1),
    each side at least `min_run` long. Returns (tau, kappa, Q) or None when the interval is too short."""
    size = stop - start
    if size < 2 * min_run:
        return None
    grid = _grid(size, min_run)
    seg = z[start:stop]
    prefix = np.zeros((size + 1, size + 1))
    prefix[1:, 1:] = np.abs(seg[:, None] - seg[None, :]).cumsum(0).cumsum(1)  # sums of |x_i - x_j| blocks
    cross = prefix[grid.taus, grid.kappas]  # cross + left: the block rows [0, tau) x columns [0, kappa)
    left, whole = prefix.diagonal()[grid.taus], prefix.diagonal()[grid.kappas]  # twice the within-sums
    q = grid.cross * (cross - left) - grid.left * left - grid.right * (whole - 2 * cross + left) + grid.invalid
    row, column = divmod(int(np.argmax(q)), q.shape[1])
    return start + min_run + row, start + 2 * min_run + column, float(q[row, column])


@dataclass(frozen=True, slots=True)
class _Grid:
    """The (tau, kappa) grid of one interval size and its coefficients in Q, which depend on nothing else."""

    taus: npt.NDArray[np.intp]
    kappas: npt.NDArray[np.intp]
    cross: FloatArray  # 2 / (n + m)
    left: FloatArray  # m / ((n + m) (n - 1))
    right: FloatArray  # n / ((n + m) (m - 1))
    invalid: FloatArray  # 0 where kappa - tau >= min_run, -inf elsewhere


@functools.lru_cache(maxsize=256)
def _grid(size: int, min_run: int) -> _Grid:
    # Cached: the same few sizes recur every night, and building these costs more than using them.
    taus = np.arange(min_run, size - min_run + 1)[:, None]
    kappas = np.arange(2 * min_run, size + 1)[None, :]
    n, m = taus.astype(np.float64), np.maximum(kappas - taus, 2).astype(np.float64)  # m clipped where invalid
    return _Grid(taus=taus, kappas=kappas, cross=2 / (n + m), left=m / ((n + m) * (n - 1)),
                 right=n / ((n + m) * (m - 1)), invalid=np.where(kappas - taus >= min_run, 0.0, -np.inf))


def _bounds(cuts: Sequence[int], start: int, stop: int) -> list[tuple[int, int]]:
    edges = [start, *cuts, stop]
    return list(zip(edges, edges[1:], strict=False))


def _split_window(levels: _Levels, start: int, stop: int, settings: Settings) -> list[int]:
    """Otava's detector on one window: keep adding the best E-divisive candidate over all current
    intervals while its t-test passes the first-pass threshold. The t-test compares the two sides the
    energy statistic compared, [a, tau) and [tau, kappa), where Otava's takes the rest of the interval as
    the right side: a level that came and went (slower for ten nights, then fixed) mixes both levels in
    that rest, and its first cut would fail."""
    cuts: list[int] = []
    while True:
        proposals = [(found, a) for a, b in _bounds(cuts, start, stop)
                     if (found := _candidate(levels.z, a, b, settings.min_run)) is not None]
        if not proposals:
            return cuts
        (tau, kappa, _), a = max(proposals, key=lambda item: item[0][2])
        tau = levels.best_cut(a, kappa, tau, settings.min_run)
        if min(tau - a, kappa - tau) < settings.min_run or levels.t_test(a, tau, kappa)[1] >= settings.split_p:
            return cuts
        cuts = sorted([*cuts, tau])


def _split(levels: _Levels, settings: Settings) -> list[int]:
    """Windows of `settings.window` nights, each starting half a window on (or at the last cut found)."""
    found: list[int] = []
    start, total = 0, len(levels)
    while True:
        stop = min(start + settings.window, total)
        new = _split_window(levels, start, stop, settings)
        found += [c for c in new if all(abs(c - f) >= settings.min_run for f in found)]
        if stop == total:
            return sorted(found)
        start = max(new[-1] if new else 0, start + settings.window // 2)


def _merge(levels: _Levels, cuts: list[int], settings: Settings) -> list[int]:
    """Hunter's merge: while some change point fails its threshold, drop the one that fails it worst; then,
    while the smallest step is under min_change, drop it. Each removal changes its neighbours' sides, so
    every remaining change point is tested again against its new neighbours."""
    cuts = list(cuts)
    while cuts:
        bounds = [0, *cuts, len(levels)]
        tests = [levels.t_test(bounds[i], bounds[i + 1], bounds[i + 2]) for i in range(len(cuts))]
        excess = [p / settings.threshold(t, len(levels) - cut) for (t, p), cut in zip(tests, cuts, strict=True)]
        worst = max(range(len(cuts)), key=lambda i: excess[i])
        if excess[worst] < 1:
            sizes = [abs(levels.change(bounds[i], bounds[i + 1], bounds[i + 2])) for i in range(len(cuts))]
            worst = min(range(len(cuts)), key=lambda i: sizes[i])
            if sizes[worst] >= settings.min_change:
                return cuts
        del cuts[worst]
    return cuts


def change_points(medians: Sequence[float], settings: Settings = DEFAULT) -> list[int]:
    """Indices into `medians` (one per night, oldest first) where a new level begins: the change points
    that survive the split and merge steps. For the HTML report to draw the levels."""
    levels = _Levels(medians)
    if len(levels) < 2 * settings.min_run:
        return []
    return _merge(levels, _split(levels, settings), settings)


# --- The verdict --------------------------------------------------------------------------------------------

def judge_series(nights: Sequence[Night], settings: Settings = DEFAULT) -> LatencyVerdict:
    """The verdict for the LAST night of `nights` (tonight), given the segment's earlier nights."""
    if any(len(night.repeats) == 0 for night in nights):
        raise ValueError("every night needs at least one repeat")
    if len(nights) < settings.min_nights:
        return LatencyVerdict("no_baseline", None, None, None, None,
                              _median(nights[-1].repeats) if nights else None,
                              note=f"{len(nights)} of {settings.min_nights} nights in this segment: no baseline yet")
    levels = _Levels([_median(night.repeats) for night in nights])
    cuts = _merge(levels, _split(levels, settings), settings)
    if not cuts:
        baseline, tonight = levels.level(0, len(levels) - 1), levels.medians[-1]
        return LatencyVerdict("no_change", None, tonight / baseline - 1, None, baseline, tonight,
                              note=f"no step since run {nights[0].run_id}")
    return _judge_step(nights, levels, cuts[-2] if len(cuts) > 1 else 0, cuts[-1], settings)


def _judge_step(nights: Sequence[Night], levels: _Levels, start: int, cut: int, settings: Settings) -> LatencyVerdict:
    """The latest step, nights [start, cut) -> [cut, end), confirmed or refused by tonight's own repeats."""
    end = len(levels)
    change, (_, p_step) = levels.change(start, cut, end), levels.t_test(start, cut, end)
    baseline, current = levels.level(start, cut), levels.level(cut, end)
    word, since = ("slower" if change > 0 else "faster"), nights[cut].run_id
    confirmed, p_night = _tonight(nights, start, cut, change, fresh=end - cut <= settings.fresh_nights,
                                  settings=settings)
    if not confirmed:
        return LatencyVerdict("no_change", None, change, p_step, baseline, current,
                              note=f"{abs(change):.1%} {word} since run {since} (p={p_step:.0e}), but tonight "
                                   f"is within {settings.min_change:.0%} of before (p={p_night:.2g})")
    return LatencyVerdict("regression" if change > 0 else "improvement", since, change, p_step, baseline, current,
                          note=f"{abs(change):.1%} {word} since run {since} (p={p_step:.0e}, tonight p={p_night:.0e})")


def _tonight(nights: Sequence[Night], start: int, cut: int, change: float, *, fresh: bool,
             settings: Settings) -> tuple[bool, float]:
    """Does tonight bear the step out? Tonight's raw repeats against those of the last `recent_nights`
    nights before the step, moved by min_change in the step's direction (one-sided Mann-Whitney).

    A fresh step (at most `fresh_nights` old) is reported only when tonight is significantly more than
    min_change off the old level (p < night_p): the first report rests on tonight's measurement too. An
    older step is established by its nights, and a night is 5% noisy: it stays reported unless tonight is
    significantly within min_change of the old level, which a step that reverted (or a run of odd nights
    that ended) is. Either way this is not a test of the step on its own: nights differ by more than
    repeats do, so tonight's repeats differ "significantly" from any single other night's most of the time.
    Returns (confirmed, the p of the test made)."""
    recent = nights[max(start, cut - settings.recent_nights):cut]
    before = np.concatenate([np.asarray(night.repeats, dtype=np.float64) for night in recent])
    slower = change > 0
    line = before * (1 + settings.min_change) if slower else before / (1 + settings.min_change)
    if fresh:
        p = mann_whitney(nights[-1].repeats, line, "greater" if slower else "less")[1]
        return p < settings.night_p, p
    p = mann_whitney(nights[-1].repeats, line, "less" if slower else "greater")[1]
    return p >= settings.night_p, p
