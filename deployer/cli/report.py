"""`deploy report RUN|latest --history DB --out DIR`: a run's `report.json`, `junit.xml` and `report.html`,
made from the history alone (no board is touched), and `write_reports`, which `deploy run --report DIR` calls
too, so the files of a run are the same whichever command wrote them (docs/report.md).

Exit codes (docs/design.md, section 14): 0 written; 2 RUN is not a run id or `latest`, or the history has no
such run; 3 the history is missing or unusable (HistoryError), holds no run yet (`latest`), or DIR cannot be
written (nothing is: each file appears whole or not at all).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from deployer.cli.app import app, stdout
from deployer.cli.render import shown
from deployer.errors import InputError, LocalStateError

if TYPE_CHECKING:
    from deployer.history.db import History, RunInfo

REPORT_FILES = ("report.json", "junit.xml", "report.html")
LATEST = "latest"


@app.command("report")
def report(
    run: Annotated[str, typer.Argument(metavar="RUN", help="A run id (`deploy history list` shows them), "
                                       "or latest: the newest run.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write report.json, junit.xml and "
                                      "report.html into (created if missing; files of the same name are replaced).")],
    history: Annotated[Path, typer.Option("--history", help="The runs' history database (SQLite).")] = Path(
        "history.db"),
) -> None:
    """Write a run's report.json, junit.xml and report.html from the history alone."""
    from deployer.history.db import History
    from deployer.history.report import run_report

    wanted = _run_id(run)
    with History.open(history, create=False, read_only=True) as db:
        info = _find_run(db, history, wanted)
        made = run_report(info, db.device_results(info.id), db.verdicts(info.id), history=str(history),
                          interrupted=info.status == "incomplete", latency=db.latency(info.id))
        write_reports(made, db, info.id, out)
    stdout.print(f"run #{info.id} ({shown(info.playbook)}, {info.status}): {', '.join(REPORT_FILES)} "
                 f"written in {shown(str(out))}")


def write_reports(report: dict[str, Any], db: History, run_id: int, out: Path) -> list[Path]:
    """Write `report.json` (the report as it is), `junit.xml` and `report.html` of the run into `out`; each
    appears whole or not at all (`deployer.reports.files`): an unwritable folder is a LocalStateError."""
    from deployer.reports.files import write_bytes, write_files
    from deployer.reports.html import write_html
    from deployer.reports.junit import junit_xml

    info = db.run(run_id)
    planned = () if info is None else info.devices
    steps = change_points(db, run_id)
    return write_files(out, {
        "report.json": write_bytes(json.dumps(report, indent=2).encode() + b"\n"),
        "junit.xml": write_bytes(junit_xml(report, planned=planned)),
        "report.html": lambda path: write_html(report, db, run_id, path, change_points=steps),
    })


def change_points(db: History, run_id: int) -> dict[tuple[str, str, str, str], list[int]]:
    """Where each latency series' regression or improvement began (its verdict's `since_run`), drawn on
    the chart of the night's median (`<timing>.median`, the metric the bench step stores)."""
    return {(t.device, t.step, t.item, f"{t.metric}.median"): [t.since_run] for t in db.latency(run_id)
            if t.kind in ("regression", "improvement") and t.since_run is not None}


def write_run_reports(report: dict[str, Any], history: Path, run_id: int, out: Path) -> list[Path]:
    """`deploy run --report DIR`: `write_reports` once the run is finished and its history closed."""
    from deployer.history.db import History

    with History.open(history, create=False, read_only=True) as db:
        return write_reports(report, db, run_id, out)


def _run_id(run: str) -> int | None:
    """The run id RUN names; None for `latest`."""
    if run == LATEST:
        return None
    if not run.isascii() or not run.isdigit() or int(run) == 0:
        raise InputError(None, "RUN", f"expected a run id (a number from `deploy history list`) or {LATEST!r} "
                                      f"(got {run!r})")
    return int(run)


def _find_run(db: History, history: Path, wanted: int | None) -> RunInfo:
    if wanted is None:
        newest = db.runs(limit=1)
        if not newest:
            raise LocalStateError(f"{history} holds no run yet: the first `deploy run` records one")
        return newest[0]
    info = db.run(wanted)
    if info is None:
        ids = [str(r.id) for r in db.runs(limit=5)]
        known = f"its newest are {', '.join(ids)}" if ids else "it holds no run yet"
        raise InputError(None, "RUN", f"{history} has no run {wanted} ({known}; `deploy history list` shows them)")
    return info
