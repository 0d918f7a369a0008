"""How big `report.html` is and how fast it opens, for a generated history (by default 50 devices x 20 metrics x
90 nights), against a floor measured in the same run: a page holding plotly.js alone and drawing one tiny chart.

    PYTHONPATH=. .venv/bin/python bench/report_html.py [--devices 50 --metrics 20 --nights 90 --runs 7]

The history is generated through the history code (tests/test_report_html.py: `generate_history`) on /dev/shm
where there is one. Open time, as the page itself measures it: from navigation start to the later of the load
event's end and the first chart drawn (the page's `report:first-chart` performance mark), in headless Chromium
(Debian's, driven by selenium, as the test does), three ways: cold (the first page of a fresh browser), warm
(a browser that has shown a blank page first: a person's running browser opening the file) and again (the same
page reopened in that browser). The floor and the report alternate, each in browsers of its own, so both see
the same machine. Prints the figures (medians, min, max) and, with --json, writes them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import plotly.graph_objects as go  # noqa: E402

from deployer.history.db import History  # noqa: E402
from deployer.reports.html import write_html  # noqa: E402
from tests.test_report_html import generate_history, open_page, report_of, start_browser  # noqa: E402

FLOOR_SCRIPT = "Plotly.react('chart', [{y: [1, 3, 2]}], {}).then(() => performance.mark('report:first-chart'));"


def floor_page(path: Path) -> Path:
    chart = go.Figure().to_html(include_plotlyjs=True, full_html=False, div_id="chart")
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{chart}"
                    f"<script>{FLOOR_SCRIPT}</script></body></html>")
    return path


def measure(path: Path, blank: Path) -> tuple[dict[str, float], ...]:
    """Timings in ms: cold (the first page of a fresh browser), warm (the browser has shown another page
    first, as a person's would have) and again (the same page reopened)."""
    driver = start_browser()
    try:
        cold = open_page(driver, path)
    finally:
        driver.quit()
    driver = start_browser()
    try:
        open_page(driver, blank)
        return cold, open_page(driver, path), open_page(driver, path)
    finally:
        driver.quit()


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--nights", type=int, default=90)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="deployer-bench-report-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK)
                                   else None))
    try:
        start = time.monotonic()
        run_id, points = generate_history(folder / "history.db", devices=args.devices, metrics=args.metrics,
                                          nights=args.nights)
        generated = time.monotonic() - start
        report = folder / "report.html"
        with History.open(folder / "history.db") as db:
            start = time.monotonic()
            write_html(report_of(db, run_id), db, run_id, report, change_points=points)
            written = time.monotonic() - start
        floor = floor_page(folder / "floor.html")
        blank = folder / "blank.html"
        blank.write_text("<!DOCTYPE html><title>blank</title><script>performance.mark('report:first-chart')</script>")
        times: dict[str, list[float]] = {f"{page}_{how}": [] for page in ("floor", "report")
                                         for how in ("cold", "warm", "again")}
        painted: list[float] = []  # the report's first contentful paint, cold: the summary and matrix shown
        for _ in range(args.runs):
            for name, path in (("floor", floor), ("report", report)):
                for how, timings in zip(("cold", "warm", "again"), measure(path, blank), strict=True):
                    times[f"{name}_{how}"].append(timings["open"])
                    if name == "report" and how == "cold":
                        painted.append(timings["paint"])
        figures: dict[str, Any] = {
            "date": datetime.date.today().isoformat(), "commit": _commit(), "runs": args.runs,
            "history": {"devices": args.devices, "metrics": args.metrics, "nights": args.nights},
            "size_bytes": report.stat().st_size, "floor_size_bytes": floor.stat().st_size,
            "generate_s": round(generated, 2), "write_s": round(written, 2),
            "open_ms": {name: {k: round(v) for k, v in summary(values).items()} for name, values in times.items()},
            "report_cold_first_paint_ms": {k: round(v) for k, v in summary(painted).items()},
            "load_average": os.getloadavg()}
    finally:
        shutil.rmtree(folder)
    print(json.dumps(figures, indent=2))
    opened = figures["open_ms"]
    print(f"report.html: {figures['size_bytes'] / 1e6:.2f} MB (the plotly.js page alone "
          f"{figures['floor_size_bytes'] / 1e6:.2f} MB); opens in, median of {args.runs} (floor in brackets):")
    for how in ("cold", "warm", "again"):
        report_ms, floor_ms = opened[f"report_{how}"]["median"], opened[f"floor_{how}"]["median"]
        print(f"  {how:5s} {report_ms:6d} ms ({floor_ms} ms, {report_ms / floor_ms:.2f}x)")
    print(f"  first paint (summary and matrix shown), cold: {figures['report_cold_first_paint_ms']['median']} ms")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return found.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
