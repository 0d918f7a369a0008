"""How good the latency verdicts are on synthetic nightly series: the false-alert rate without a step, how
often a 10% and a 15% slowdown are flagged within 5 nights, the mean detection delay. The same series, seeds
and measurement as tests/test_latency.py (imported from it), so by default it prints the test's figures.

    PYTHONPATH=. .venv/bin/python bench/latency_quality.py                    # the test's figures
    PYTHONPATH=. .venv/bin/python bench/latency_quality.py --all-nights       # + false alerts before the step
    PYTHONPATH=. .venv/bin/python bench/latency_quality.py --seed-offset 100 --series 4000   # other draws

Series: 30 nights x 20 repeats, night level = base * exp(N(0, 0.05)), repeat = level * exp(N(0, 0.03)), the
step from night index 20 (0-based) on; every night judged with `judge_series(nights[:k + 1])`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_latency import ARMS, STEP_AT, ArmFigures, format_figures, measure_arm, synthetic_series  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, help="series per arm (default: the test's, 2000 / 1000 / 1000)")
    parser.add_argument("--seed-offset", type=int, default=0, help="added to every arm's seed: other draws")
    parser.add_argument("--all-nights", action="store_true",
                        help="judge the step arms' nights before the step too (their false alerts; slower)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures: dict[str, ArmFigures] = {}
    for name, (step, seed, count) in ARMS.items():
        arm = synthetic_series(seed + args.seed_offset, args.series or count, step)
        figures[name] = measure_arm(arm, stepped=step > 0, judge_from=0 if args.all_nights or not step else STEP_AT)
    if args.json:
        print(json.dumps({name: asdict(f) for name, f in figures.items()}, indent=2))
    else:
        print(format_figures(figures))


if __name__ == "__main__":
    main()
