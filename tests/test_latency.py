"""Latency verdicts (deployer.history.latency): the statistics against known values, the verdicts on small
hand-made series, and the detector's quality on synthetic nightly series, measured as the nightly runs use it.

Quality (docs/regressions.md has the figures): per arm, series of 30 nights x 20 repeats, log-normal noise,
night level = base * exp(N(0, 0.05)), repeat = level * exp(N(0, 0.03)); the step multiplies every night from
index 20 (0-based: the 21st night) on. Each series is judged night by night, `judge_series(nights[:k + 1])`
for k = 0..29. The seeds below are the test's own; the detector's parameters were chosen on other seeds
(1-3, 11-13, 21-28 and 31-34, by an exploration script not kept), never on these.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pytest

from deployer.history.latency import (
    DEFAULT,
    LatencyVerdict,
    Night,
    Settings,
    _candidate,
    betainc,
    change_points,
    judge_series,
    mann_whitney,
    night_stats,
    student_t_cdf,
    t_test,
)

NIGHTS, REPEATS, STEP_AT = 30, 20, 20
WITHIN, BETWEEN = 0.03, 0.05  # log-normal sigmas: repeat around its night, night around the base
ARMS: dict[str, tuple[float, int, int]] = {  # name: (step, seed, series)
    "no step": (0.0, 20261201, 2000),  # twice the minimum: the false-alert rate is the figure with the least room
    "10% step": (0.10, 20261202, 1000),
    "15% step": (0.15, 20261203, 1000),
}
FIRST_RUN = 100  # run ids are FIRST_RUN + night index
SINCE_SLACK = 2  # since_run this close to the step's night locates it (reported beside detection, not required)


# --- Synthetic series and their measurement (bench/latency_quality.py prints the same figures) ------------

def synthetic_series(seed: int, count: int, step: float, *, nights: int = NIGHTS, repeats: int = REPEATS,
                     step_at: int = STEP_AT) -> list[list[Night]]:
    """`count` series; each base is log-uniform in 0.1-100 ms, so nothing depends on the scale."""
    rng = np.random.default_rng(seed)
    base = np.exp(rng.uniform(math.log(0.1), math.log(100.0), size=(count, 1)))
    level = base * np.exp(rng.normal(0.0, BETWEEN, size=(count, nights)))
    level[:, step_at:] *= 1 + step
    values = level[:, :, None] * np.exp(rng.normal(0.0, WITHIN, size=(count, nights, repeats)))
    return [[Night(FIRST_RUN + k, 1.8e9 + 86400.0 * k, tuple(values[s, k].tolist())) for k in range(nights)]
            for s in range(count)]


@dataclass(frozen=True, slots=True)
class ArmFigures:
    series: int
    false_alerts: float  # share of series with any regression/improvement verdict (before the step, if any)
    detected_5: float  # share with a `regression` verdict on a night STEP_AT .. STEP_AT + 4 (within 5 nights)
    located_5: float  # ... one whose since_run is within SINCE_SLACK nights of the step
    detected_end: float  # share with a `regression` verdict on a night from the step to the last
    mean_delay: float  # nights from the step to the first one (0: on the step's first night), of those found
    since_exact: float  # share of those first verdicts whose since_run is exactly the step's night
    kept: float  # share of the nights after the first one still reported as a regression near the step
    seconds: float


def measure_arm(arm: Sequence[Sequence[Night]], *, stepped: bool, settings: Settings = DEFAULT,
                step_at: int = STEP_AT, judge_from: int = 0) -> ArmFigures:
    """Judge every night from `judge_from` on, each given the nights before it, as `deploy run` would.
    A step arm's nights before the step are the no-step arm's situation (judge_series is a pure function
    of the nights it is given): judge_from=step_at skips them, and their false alerts are then nan."""
    started = time.perf_counter()
    alerts, located, delays, exact, kept, after = 0, 0, [], 0, 0, 0
    for nights in arm:
        verdicts = {k: judge_series(nights[:k + 1], settings) for k in range(judge_from, len(nights))}
        judged_before = [v for k, v in verdicts.items() if not stepped or k < step_at]
        alerts += any(v.kind in ("regression", "improvement") for v in judged_before)
        flagged = [k for k, v in verdicts.items() if stepped and k >= step_at and v.kind == "regression"]
        if flagged:
            first = flagged[0]
            delays.append(first - step_at)
            exact += verdicts[first].since_run == FIRST_RUN + step_at
            near = [k for k in flagged if _near_the_step(verdicts[k], step_at)]
            located += any(k <= step_at + 4 for k in near)
            kept += sum(k > first for k in near)
            after += len(nights) - 1 - first
    count = len(arm)
    return ArmFigures(series=count, false_alerts=alerts / count if judge_from < step_at or not stepped else math.nan,
                      detected_5=sum(d <= 4 for d in delays) / count, located_5=located / count,
                      detected_end=len(delays) / count, mean_delay=float(np.mean(delays)) if delays else math.nan,
                      since_exact=exact / len(delays) if delays else math.nan,
                      kept=kept / after if after else math.nan, seconds=time.perf_counter() - started)


def _near_the_step(verdict: LatencyVerdict, step_at: int) -> bool:
    return verdict.since_run is not None and abs(verdict.since_run - (FIRST_RUN + step_at)) <= SINCE_SLACK


def format_figures(figures: dict[str, ArmFigures]) -> str:
    """A Markdown table, as docs/regressions.md and bench/README.md show it."""
    rows = ["| arm | series | false alerts | regression within 5 nights | of which since_run within 2 nights "
            "| by night 29 | mean delay (nights) | since_run exact | still reported after | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in figures.items():
        stepped = name != "no step"
        alerts = "not judged" if math.isnan(f.false_alerts) else f"{f.false_alerts:.2%}"
        cells = [alerts + (" before the step" if stepped and alerts != "not judged" else "")]
        cells += [f"{f.detected_5:.1%}", f"{f.located_5:.1%}", f"{f.detected_end:.1%}", f"{f.mean_delay:.2f}",
                  f"{f.since_exact:.0%}", f"{f.kept:.1%}"] if stepped else ["-"] * 6
        rows.append(f"| {name} | {f.series} | " + " | ".join(cells) + f" | {f.seconds:.1f} |")
    return "\n".join(rows)


# --- Distributions against known values -------------------------------------------------------------------

@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 1.0, 4.0, 250.0])
def test_t_cdf_matches_the_closed_forms_for_1_2_and_4_degrees_of_freedom(t: float) -> None:
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    u = t * t / 4
    assert student_t_cdf(t, 4) == pytest.approx(0.5 + 3 / 8 * t / math.sqrt(1 + u) * (1 - u / (3 * (1 + u))),
                                                abs=1e-13)


@pytest.mark.parametrize(("t", "df", "cdf"), [
    (6.314, 1, 0.95), (2.228, 10, 0.975), (2.845, 20, 0.995), (3.646, 30, 0.9995), (1.960, 1e7, 0.975),
])
def test_t_cdf_matches_the_printed_table(t: float, df: float, cdf: float) -> None:
    # Critical values as every t table prints them, to 3 decimals: the cdf agrees to the rounding.
    assert student_t_cdf(t, df) == pytest.approx(cdf, abs=1.5e-4)
    assert student_t_cdf(-t, df) == pytest.approx(1 - cdf, abs=1.5e-4)


def test_incomplete_beta_known_identities() -> None:
    for a, x in [(0.5, 0.2), (3.0, 0.7), (40.0, 0.95)]:
        assert betainc(a, 1.0, x) == pytest.approx(x ** a, rel=1e-12)
        assert betainc(1.0, a, x) == pytest.approx(1 - (1 - x) ** a, rel=1e-12)
    assert betainc(7.5, 7.5, 0.5) == pytest.approx(0.5, abs=1e-14)
    with pytest.raises(ValueError):
        betainc(0.0, 1.0, 0.5)


def test_t_test_known_example() -> None:
    # Student's pooled test by hand: means 2 and 5, pooled variance 1, t = 3 / sqrt(2/3), df = 4.
    t, p = t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert t == pytest.approx(3 / math.sqrt(2 / 3))
    assert p == pytest.approx(2 * (1 - student_t_cdf(t, 4)), rel=1e-12)
    assert p == pytest.approx(0.021311641128756, rel=1e-9)


def test_mann_whitney_matches_scipys_documented_example() -> None:
    # scipy.stats.mannwhitneyu(males, females, method="asymptotic"): U = 17, p = 0.11134688653314041.
    u, p = mann_whitney([19, 22, 16, 29, 24], [20, 11, 17, 12])
    assert u == 17.0
    assert p == pytest.approx(0.11134688653314041, rel=1e-9)
    assert mann_whitney([19, 22, 16, 29, 24], [20, 11, 17, 12], "greater")[1] == pytest.approx(p / 2, rel=1e-9)


def test_mann_whitney_with_ties_is_close_to_the_exact_permutation_p() -> None:
    x, y = [1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 6.0], [2.0, 3.0, 3.0, 4.0, 5.0, 7.0, 8.0, 8.0]
    pooled = np.array(x + y)
    u_obs, p = mann_whitney(x, y, "less")
    ranks = mann_whitney(pooled, [math.inf])  # a sanity anchor: U of all against a larger value is 0
    assert ranks[0] == 0.0
    below = total = 0
    for chosen in combinations(range(len(pooled)), len(x)):  # 6,435 relabellings: the exact null
        u = mann_whitney(pooled[list(chosen)], np.delete(pooled, chosen))[0]
        below += u <= u_obs
        total += 1
    assert p == pytest.approx(below / total, abs=0.02)


def test_night_stats() -> None:
    stats = night_stats([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats.n, stats.median, stats.min, stats.iqr) == (5, 3.0, 1.0, 2.0)
    assert stats.p90 == pytest.approx(4.6)
    with pytest.raises(ValueError):
        night_stats([])


# --- Change points ----------------------------------------------------------------------------------------

def _energy(x: np.ndarray, y: np.ndarray) -> float:
    n, m = len(x), len(y)
    cross = np.abs(x[:, None] - y[None, :]).sum()
    within_x, within_y = np.abs(x[:, None] - x[None, :]).sum() / 2, np.abs(y[:, None] - y[None, :]).sum() / 2
    return float(2 / (n + m) * cross - 2 * m / ((n + m) * (n - 1)) * within_x
                 - 2 * n / ((n + m) * (m - 1)) * within_y)


def test_e_divisive_candidate_is_the_brute_force_maximum() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        size, min_run = int(rng.integers(6, 30)), int(rng.integers(2, 4))
        z = rng.normal(0, 1, size)
        z[size // 2:] += rng.normal(0, 2)
        start, stop = int(rng.integers(0, 3)), size - int(rng.integers(0, 3))
        if stop - start < 2 * min_run:
            continue
        best = max((_energy(z[start:tau], z[tau:kappa]), tau) for tau in range(start + min_run, stop - min_run + 1)
                   for kappa in range(tau + min_run, stop + 1))
        found = _candidate(z, start, stop, min_run)
        assert found is not None and found[0] == best[1] and found[2] == pytest.approx(best[0])
        assert _energy(z[start:found[0]], z[found[0]:found[1]]) == pytest.approx(best[0])


def _wobble(count: int, seed: int, sigma: float = 0.005) -> list[float]:
    return list(np.exp(np.random.default_rng(seed).normal(0, sigma, count)))


@pytest.mark.parametrize(("levels", "expected"), [
    ([1.0] * 12 + [1.2] * 12, [12]),
    ([1.0] * 10 + [1.3] * 10 + [1.0] * 10, [10, 20]),
    ([5.0] * 15 + [4.0] * 6, [15]),
    ([1.0] * 24, []),
    ([1.0] * 12 + [1.03] * 12, []),  # 3%: under min_change, merged away however clear
])
def test_change_points_on_clean_steps(levels: list[float], expected: list[int]) -> None:
    medians = [level * w for level, w in zip(levels, _wobble(len(levels), 3), strict=True)]
    assert change_points(medians) == expected


# --- Verdicts on hand-made series ---------------------------------------------------------------------------

def _series(levels: Sequence[float], seed: int = 5, between: float = 0.01, within: float = 0.02) -> list[Night]:
    rng = np.random.default_rng(seed)
    nightly = np.asarray(levels) * np.exp(rng.normal(0, between, len(levels)))
    return [Night(FIRST_RUN + k, 1.8e9 + 86400.0 * k,
                  tuple((nightly[k] * np.exp(rng.normal(0, within, REPEATS))).tolist())) for k in range(len(levels))]


def _kinds(nights: Sequence[Night], settings: Settings = DEFAULT) -> list[str]:
    return [judge_series(nights[:k + 1], settings).kind for k in range(len(nights))]


def test_too_few_nights_is_no_baseline() -> None:
    nights = _series([1.0] * 11 + [2.0])
    verdict = judge_series(nights[:11])
    assert (verdict.kind, verdict.since_run, verdict.change, verdict.p_value) == ("no_baseline", None, None, None)
    assert verdict.current == night_stats(nights[10].repeats).median
    assert verdict.note == "11 of 12 nights in this segment: no baseline yet"
    assert judge_series([]).kind == "no_baseline"
    assert judge_series(nights).kind == "no_change"  # 12 nights are judged, and one slow night is never a step
    assert judge_series(nights[:8], Settings(min_nights=8)).kind == "no_change"


def test_a_step_names_its_first_night_and_is_reported_until_accepted() -> None:
    nights = _series([10.0] * 17 + [11.5] * 13)
    verdicts = [judge_series(nights[:k + 1]) for k in range(len(nights))]
    assert [v.kind for v in verdicts[:17]] == ["no_baseline"] * 11 + ["no_change"] * 6
    first = next(k for k, v in enumerate(verdicts) if v.kind == "regression")
    assert first <= 17 + 3  # min_run = 3 nights on the new level, so night 19 at the earliest
    for verdict in verdicts[first:]:  # every night after: the same step, same night named
        assert verdict.kind == "regression" and verdict.since_run == FIRST_RUN + 17
        assert verdict.change == pytest.approx(0.15, abs=0.02)
        assert verdict.baseline == pytest.approx(10.0, rel=0.02) and verdict.current == pytest.approx(11.5, rel=0.02)
    assert verdicts[-1].note.startswith(f"{verdicts[-1].change:.1%} slower since run {FIRST_RUN + 17} (p=")


def test_an_improvement() -> None:
    verdict = judge_series(_series([10.0] * 15 + [8.0] * 8))
    assert verdict.kind == "improvement" and verdict.since_run == FIRST_RUN + 15
    assert verdict.change == pytest.approx(-0.2, abs=0.02) and verdict.note.startswith("20.")
    assert "faster since run 115" in verdict.note


def test_min_change_is_respected_a_real_3_percent_step_is_no_change() -> None:
    nights = _series([10.0] * 15 + [10.3] * 15, between=0.002, within=0.005)  # 3%, and beyond doubt
    assert judge_series(nights[:22], Settings(min_change=0.02)).kind == "regression"  # it is real...
    assert set(_kinds(nights)) == {"no_baseline", "no_change"}  # ...and never reported under the 5% default


def test_a_single_outlier_night_is_not_a_regression() -> None:
    for at in (14, 20, 27, 29):  # in the middle, near the end, the night before, tonight
        levels = [10.0] * 30
        levels[at] = 15.0
        assert set(_kinds(_series(levels, seed=at, between=0.03))) <= {"no_baseline", "no_change"}, at


def test_two_or_three_odd_nights_are_not_a_step_until_they_last() -> None:
    levels = [10.0] * 20 + [13.0] * 2 + [10.0] * 8  # two slow nights, then back
    assert set(_kinds(_series(levels, between=0.02))) <= {"no_baseline", "no_change"}


def test_a_step_that_tonight_has_left_is_not_reported_tonight() -> None:
    nights = _series([10.0] * 16 + [12.0] * 8 + [10.0])  # tonight back on the old level
    assert judge_series(nights[:-1]).kind == "regression"
    verdict = judge_series(nights)
    assert verdict.kind == "no_change" and verdict.since_run is None
    assert "within 5% of before" in verdict.note and verdict.change == pytest.approx(0.2, abs=0.03)


def test_the_scale_does_not_matter() -> None:
    nights = _series([10.0] * 16 + [11.5] * 6)
    scaled = [Night(n.run_id, n.started, tuple(v * 1e-4 for v in n.repeats)) for n in nights]
    a, b = judge_series(nights), judge_series(scaled)
    assert (a.kind, a.since_run) == (b.kind, b.since_run) == ("regression", FIRST_RUN + 16)
    assert a.change == pytest.approx(b.change) and a.p_value == pytest.approx(b.p_value)


@pytest.mark.parametrize("bad", [
    {"min_change": 1.0}, {"min_run": 1}, {"min_nights": 5}, {"max_p": 0.0}, {"split_p": 1e-5},
    {"recent_nights": 0}, {"window": 5},
])
def test_settings_refuse_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Settings(**bad)  # type: ignore[arg-type]


def test_nights_without_repeats_or_with_non_positive_values_are_refused() -> None:
    nights = _series([1.0] * 12)
    with pytest.raises(ValueError):
        judge_series([*nights[:-1], Night(999, 0.0, ())])
    with pytest.raises(ValueError):
        judge_series([*nights[:-1], Night(999, 0.0, (0.0, -1.0, 0.0))])


# --- Quality on synthetic series ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quality() -> dict[str, ArmFigures]:
    # Step arms are judged from the step's night on: their earlier nights are the no-step arm's case.
    return {name: measure_arm(synthetic_series(seed, count, step), stepped=step > 0, judge_from=STEP_AT if step else 0)
            for name, (step, seed, count) in ARMS.items()}


def test_quality_on_synthetic_series(quality: dict[str, ArmFigures], record_property: Callable[[str, object], None],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for name, figures in quality.items():
        for field in ArmFigures.__slots__:
            record_property(f"{name}: {field}", getattr(figures, field))
    with capsys.disabled():
        print("\nlatency verdicts on synthetic series (docs/regressions.md):\n" + format_figures(quality))
    assert quality["no step"].false_alerts <= 0.01
    assert quality["15% step"].detected_5 >= 0.90
    assert quality["10% step"].detected_end > quality["10% step"].detected_5 > 0  # measured, no threshold
