"""`report.html`: the page people read in the morning, one self-contained file (no request leaves it).

Made from the run report (docs/report.md) and the history:
- the run's summary: run, playbook, fleet, times, counts per status, new failures, fixed, flaky, offline;
- a matrix of devices x checks (step + item) coloured by status, new failures, fixed and flaky marked;
- latency over nights: one chart at a time, picked with two `<select>`s (device, metric). Every series is
  embedded once as JSON and drawn on selection by the page's script with plotly.js (inlined: the figure's
  layout and config are built with plotly's Python library, `include_plotlyjs=True`), with the device's
  driver changes (fingerprint segments), the change points the caller gives, and each segment's baseline
  band (median +- IQR, deployer.reports.series);
- each device's fingerprints over the nights, as a timeline.

Every string that came from a board or a file (names, reasons, labels) is shown as text: control characters
made visible, then HTML-escaped here, or set as text by the script (`textContent`, entities for plotly).
Values are kept to 6 significant digits in the embedded data. Written atomically (temp file, rename).
"""

from __future__ import annotations

import datetime
import html
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import plotly.graph_objects as go

from deployer.cache.store import write_atomic
from deployer.history.db import History
from deployer.reports.series import NIGHTS, Nights, Segment, SeriesKey, baselines, read_nights, segments
from deployer.text import visible as shared_visible

# series key (device, step, item, metric), a SeriesKey or a plain tuple -> the run ids of its change points
ChangePoints = Mapping[SeriesKey, Sequence[int]] | Mapping[tuple[str, str, str, str], Sequence[int]]
NO_CHANGE_POINTS: ChangePoints = MappingProxyType({})
STATUS_MARKS = {"pass": "✓", "fail": "✗", "error": "E", "miss": "–", "skip": "s"}
VERDICT_MARKS = {"new_failure": "new", "fixed": "fixed", "flaky": "flaky"}  # marked in the matrix
LIST_LIMIT = 40  # rows of each summary list (new failures, fixed...); the matrix has them all
CHART_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["select2d", "lasso2d"]}


def write_html(report: dict[str, Any], history: History, run_id: int, path: Path, *,
               change_points: ChangePoints = NO_CHANGE_POINTS, nights: int = NIGHTS) -> None:
    """Write `path` for the run `run_id` (whose report, docs/report.md, is `report`), reading up to `nights`
    nights of metrics from `history`. `change_points` marks, per series (device, step, item, metric), the runs
    where its level changed. Raises LocalStateError when the file cannot be written (nothing half-written)."""
    if report["run"]["id"] != run_id:
        raise ValueError(f"the report is of run {report['run']['id']}, not {run_id}")
    past = read_nights(history, run_id, nights=nights)
    write_atomic(Path(path), page(report, past, change_points).encode("utf-8"))


def page(report: dict[str, Any], past: Nights, change_points: ChangePoints = NO_CHANGE_POINTS) -> str:
    """The whole page as text."""
    run = report["run"]
    title = f"run {run['id']}: {run['playbook']['name']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_text(title)}</title>
<style>{_asset("html.css")}</style>
</head><body>
{_summary(report)}
{_matrix(report)}
{_charts(past)}
{_fingerprints(report, past)}
<footer>deployer report, schema {_text(report["schema"])} v{report["schema_version"]}, history
{_text(run["history"])}; times in UTC.</footer>
<script type="application/json" id="report-data">{_script_json(_chart_data(past, change_points))}</script>
<script>{_asset("html.js")}</script>
</body></html>
"""


# text


def visible(text: object) -> str:
    """Control characters shown as escapes, e.g. ESC as \\x1b; lines kept (deployer.text, unbounded here)."""
    return shared_visible(str(text), 1 << 24)


def _text(text: object) -> str:
    """A string for HTML text or a quoted attribute."""
    return html.escape(visible(text), quote=True)


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' that could end it, no line separators."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "unknown"
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _asset(name: str) -> str:
    return resources.files("deployer.reports").joinpath(name).read_text(encoding="utf-8")


# the summary


def _summary(report: dict[str, Any]) -> str:
    run, summary = report["run"], report["summary"]
    playbook = run["playbook"]
    duration = "" if run["ended"] is None else f" ({run['ended'] - run['started']:.0f} s)"
    state = "interrupted" if run["interrupted"] else run["status"]
    counts = "".join(f'<span class="pill st-{s}">{_text(s)} {n}</span>' for s, n in summary["results"].items())
    verdicts = summary["verdicts"]
    rows = [("run", f"{run['id']} ({_text(state)})"),
            ("playbook", f"{_text(playbook['name'])} <code>{_text(playbook['file'])}</code>"),
            ("fleet", f"<code>{_text(run['fleet'])}</code>"),
            ("started", _when(run["started"])), ("ended", _when(run["ended"]) + duration),
            ("devices", f"{summary['devices']}, {summary['offline']} offline"),
            ("results", counts),
            ("verdicts", f'<span class="pill v-new_failure">new failures {verdicts["new_failure"]}</span>'
                         f'<span class="pill v-fixed">fixed {verdicts["fixed"]}</span>'
                         f'<span class="pill v-flaky">flaky {verdicts["flaky"]}</span>'
                         f' still failing {verdicts["still_failing"]}, no baseline {verdicts["no_baseline"]}')]
    table = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    lists = [_list("New failures", _verdict_rows(report, "new_failure")),
             _list("Fixed", _verdict_rows(report, "fixed")),
             _list("Flaky", _flaky_rows(report)),
             _list("Offline devices", [(d["name"], "", d["reason"]) for d in report["devices"]
                                       if d["state"] == "offline"]),
             _list("Incomplete devices", [(d["name"], "", d["reason"]) for d in report["devices"]
                                          if d["state"] == "incomplete"])]
    return (f'<header><h1>{_text("Run " + str(run["id"]) + ": " + playbook["name"])}</h1></header>\n'
            f'<section id="summary"><table class="summary">{table}</table>{"".join(lists)}</section>')


def _check(result: dict[str, Any]) -> str:
    return f"{result['step']} / {result['item']}" if result["item"] else str(result["step"])


def _verdict_rows(report: dict[str, Any], kind: str) -> list[tuple[str, str, str]]:
    return [(d["name"], _check(r), r["reason"] or (r["verdict"]["note"] if r["verdict"] else ""))
            for d in report["devices"] for r in d["results"] if r["verdict"] and r["verdict"]["kind"] == kind]


def _flaky_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(d["name"], _check(r), "passed on its re-run" if r["flaky"] else "flips between pass and fail")
            for d in report["devices"] for r in d["results"]
            if r["flaky"] or (r["verdict"] and r["verdict"]["kind"] == "flaky")]


def _list(title: str, rows: list[tuple[str, str, str]]) -> str:
    if not rows:
        return ""
    items = "".join(f"<li><b>{_text(device)}</b>{' ' + _text(check) if check else ''}"
                    f"{': <span class=reason>' + _text(why) + '</span>' if why else ''}</li>"
                    for device, check, why in rows[:LIST_LIMIT])
    more = f"<li>and {len(rows) - LIST_LIMIT} more (the matrix has them all)</li>" if len(rows) > LIST_LIMIT else ""
    return f'<div class="list"><h3>{_text(title)} ({len(rows)})</h3><ul>{items}{more}</ul></div>'


# the matrix


def _matrix(report: dict[str, Any]) -> str:
    checks: dict[tuple[str, str], None] = {}
    for device in report["devices"]:
        for result in device["results"]:
            checks.setdefault((result["step"], result["item"]), None)
    head = "".join(f'<th class="check"><span>{_text(step)}</span><br><small>{_text(item or "(step)")}</small></th>'
                   for step, item in checks)
    rows = []
    for device in report["devices"]:
        found = {(r["step"], r["item"]): r for r in device["results"]}
        cells = "".join(_cell(found.get(check)) for check in checks)
        state = "" if device["state"] == "ok" else f' <span class="state">{_text(device["state"])}</span>'
        why = f' title="{_text(device["reason"])}"' if device["reason"] else ""
        rows.append(f'<tr data-device="{_text(device["name"])}"><th class="device"{why}>'
                    f'<a href="#charts" class="pick">{_text(device["name"])}</a>{state}</th>{cells}</tr>')
    legend = " ".join(f'<span class="cell st-{s}">{m}</span> {s}' for s, m in STATUS_MARKS.items())
    marks = ('<span class="cell st-fail v-new_failure">✗<i>new</i></span> new failure '
             '<span class="cell st-pass v-fixed">✓<i>fixed</i></span> fixed '
             '<span class="cell st-pass v-flaky">✓<i>flaky</i></span> flaky')
    return (f'<section id="matrix-section"><h2>Devices x checks</h2><p class="legend">{legend} {marks}; '
            f'hover a cell for its reason, click a device for its charts</p><div class="scroll">'
            f'<table id="matrix"><thead><tr><th>device</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return '<td class="cell none"></td>'
    kind = result["verdict"]["kind"] if result["verdict"] else ""
    if result["flaky"]:
        kind = "flaky"
    mark = f"<i>{VERDICT_MARKS[kind]}</i>" if kind in VERDICT_MARKS else ""
    tip = [result["status"], result["verdict"]["label"] if result["verdict"] else "", result["reason"],
           result["verdict"]["note"] if result["verdict"] else ""]
    return (f'<td class="cell st-{_text(result["status"])}{" v-" + kind if kind else ""}" '
            f'title="{_text(" - ".join(t for t in tip if t))}">{STATUS_MARKS.get(result["status"], "?")}{mark}</td>')


# latency over nights


def _charts(past: Nights) -> str:
    """The selectors and the chart: plotly.js inline, and the figure's layout and config from plotly's Python
    library; the page's script draws the selected series into it."""
    figure = go.Figure(layout=_layout())
    chart = figure.to_html(include_plotlyjs=True, full_html=False, div_id="chart", config=CHART_CONFIG,
                           default_height="460px", default_width="100%")
    empty = "" if past.series else '<p class="empty">no metric was recorded on these nights</p>'
    return (f'<section id="charts"><h2>Latency over nights</h2>\n<div class="pickers">'
            f'<label>device <select id="device"></select></label> '
            f'<label>metric <select id="metric"></select></label> <span id="series-note"></span></div>{empty}\n'
            f'{chart}\n<p class="legend">dashed vertical line: the device\'s driver (fingerprint) changed, a new '
            f'segment starts; band: the segment\'s median &plusmn; IQR over its nights before this one; '
            f'red x: a change point; ringed: this run</p></section>')


def _layout() -> dict[str, Any]:
    return {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
            "xaxis": {"type": "date", "title": {"text": "night (UTC)"}},
            "legend": {"orientation": "h", "y": -0.2}, "hovermode": "closest"}


def _chart_data(past: Nights, change_points: ChangePoints) -> dict[str, Any]:
    index = {n.run_id: i for i, n in enumerate(past.nights)}
    devices: dict[str, dict[str, Any]] = {}
    for key, series in past.series.items():
        cuts = segments(past.fingerprints.get(key.device, ()))
        device = devices.setdefault(key.device, {
            "name": visible(key.device), "series": [],
            "segments": [[s.first, s.last, visible(s.label), visible(s.fingerprint_id)] for s in cuts]})
        points = sorted({index[r] for r in change_points.get(key, ()) if r in index})
        device["series"].append({
            "step": visible(key.step), "item": visible(key.item), "metric": visible(key.metric),
            "unit": visible(series.unit), "v": [_round(v) for v in series.values], "cp": points,
            "base": [[b.first, b.last, _round(b.median), _round(b.iqr), b.count]
                     for b in baselines(series.values, cuts, past.current)]})
    return {"nights": [[n.run_id, n.started] for n in past.nights], "current": past.current,
            "devices": list(devices.values()), "selected": _first_choice(past, change_points),
            "config": CHART_CONFIG}


def _first_choice(past: Nights, change_points: ChangePoints) -> list[int]:
    """The chart shown first: the first series with a change point at this run, else the first series."""
    current = past.nights[-1].run_id if past.nights else None
    devices: dict[str, list[SeriesKey]] = {}
    for key in past.series:
        devices.setdefault(key.device, []).append(key)
    for d, keys in enumerate(devices.values()):
        for s, key in enumerate(keys):
            if current in change_points.get(key, ()):
                return [d, s]
    return [0, 0]


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


# fingerprints over the nights


def _fingerprints(report: dict[str, Any], past: Nights) -> str:
    names = list(dict.fromkeys([d["name"] for d in report["devices"]] + list(past.fingerprints)))
    total = max(len(past.nights), 1)
    rows = []
    for name in names:
        cuts = segments(past.fingerprints.get(name, ()))
        bar = "".join(_segment(past, s, i, total) for i, s in enumerate(cuts)) or '<span class="none">none</span>'
        now = next((d["fingerprint"] for d in report["devices"] if d["name"] == name), None)
        label = f'{_text(now["label"])} <code>{_text(now["id"])}</code>' if now else "none this run"
        changes = f"{len(cuts) - 1} change(s)" if len(cuts) > 1 else ""
        rows.append(f"<tr><th>{_text(name)}</th><td>{label}</td><td>{changes}</td>"
                    f'<td class="timeline">{bar}</td></tr>')
    first = _when(past.nights[0].started)[:10] if past.nights else ""
    return (f'<section id="fingerprints"><h2>Fingerprints and drivers over {len(past.nights)} night(s)'
            f' (since {first})</h2><div class="scroll"><table id="fingerprint-table"><thead><tr><th>device</th>'
            f'<th>this run</th><th></th><th>nights, oldest left</th></tr></thead><tbody>{"".join(rows)}'
            f'</tbody></table></div></section>')


def _segment(past: Nights, segment: Segment, number: int, total: int) -> str:
    first, last = past.nights[segment.first], past.nights[segment.last]
    tip = (f"{segment.label} ({segment.fingerprint_id}): runs {first.run_id}-{last.run_id}, "
           f"{_when(first.started)[:10]} to {_when(last.started)[:10]}")
    width = 100 * (segment.last - segment.first + 1) / total
    return (f'<span class="seg seg{number % 4}" style="width:{width:.2f}%" title="{_text(tip)}">'
            f"{_text(segment.label)}</span>")
