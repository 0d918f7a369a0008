"""`deploy history` (list, show, accept, prune) and `deploy compare`: living with the nightly verdicts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from deployer.cli.app import JsonOption, app, stdout
from deployer.cli.render import emit_json, shown
from deployer.errors import InputError

if TYPE_CHECKING:
    from deployer.history.db import History, SampleRow

history_app = typer.Typer(no_args_is_help=True, help="The nightly runs' history database: runs, latency "
                                                     "timelines, accepted levels, pruning.")
app.add_typer(history_app, name="history")

HistoryOption = Annotated[Path, typer.Option("--history", help="The runs' history database (SQLite).")]
DEFAULT_HISTORY = Path("history.db")
SIGNIFICANT_P = 0.002  # asv's threshold for two runs' repeats (Mann-Whitney)


def _day(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


@history_app.command("list")
def history_list(
    history: HistoryOption = DEFAULT_HISTORY,
    last: Annotated[int, typer.Option("--last", min=1, max=10000, help="How many runs, newest first.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """The newest runs: id, playbook, start, status, devices."""
    from deployer.history.db import History

    with History.open(history, create=False, read_only=True) as db:
        runs = db.runs(limit=last)
    if as_json:
        emit_json({"schema_version": 1, "runs": [
            {"id": r.id, "playbook": r.playbook, "playbook_file": r.playbook_path, "playbook_sha256": r.playbook_sha256,
             "fleet": r.fleet, "devices": list(r.devices), "started": r.started, "ended": r.ended,
             "status": r.status, "host": r.host, "pid": r.pid, "settings": dict(r.settings)} for r in runs]})
        return
    table = Table()
    for column in ("run", "playbook", "started", "status", "devices"):
        table.add_column(column)
    for entry in runs:
        table.add_row(str(entry.id), shown(entry.playbook), _day(entry.started), entry.status,
                      str(len(entry.devices)))
    stdout.print(table)


@history_app.command("show")
def history_show(
    history: HistoryOption = DEFAULT_HISTORY,
    device: Annotated[str | None, typer.Option("--device", "-d", help="Only this device.")] = None,
    item: Annotated[str | None, typer.Option("--item", "-i", help="Only items containing this text, e.g. "
                    "saxpy.")] = None,
    metric: Annotated[str | None, typer.Option("--metric", "-m", help="device_ms or wall_ms.")] = None,
    runs: Annotated[int, typer.Option("--runs", min=1, max=1000, help="How many of the newest runs.")] = 30,
    as_json: JsonOption = False,
) -> None:
    """Latency timelines: per series, each night's median and spread, where a segment starts (a driver
    change) and the night's verdict."""
    from deployer.history.db import History
    from deployer.history.latency import night_stats

    with History.open(history, create=False, read_only=True) as db:
        rows = db.sample_rows(device=device, item=item, metric=metric, runs=runs)
    if not rows:
        raise InputError(None, "--device" if device else "--item" if item else None,
                         f"{history}: no latency samples match (run a playbook with a bench step)")
    if as_json:
        emit_json({"schema_version": 1, "nights": [
            {"run": r.run_id, "started": r.started, "device": r.device, "step": r.step, "item": r.item,
             "metric": r.metric, "n": len(r.values), "median": night_stats(r.values).median,
             "fingerprint": r.fingerprint_id, "latency": r.latency, "since_run": r.since_run} for r in rows]})
        return
    for key, series in _series(rows).items():
        stdout.print(f"[bold]{shown(' '.join(key))}[/bold]")
        previous = None
        for row in series:
            stats = night_stats(row.values)
            segment = "  <- driver changed" if previous is not None and previous != row.fingerprint_id else ""
            verdict = f"  {row.latency}" + (f" since run {row.since_run}" if row.since_run else "") \
                if row.latency in ("regression", "improvement") else ""
            stdout.print(f"  run {row.run_id:>5}  {_day(row.started)}  median {stats.median:10.4f}  "
                         f"p90 {stats.p90:10.4f}  n {stats.n:4d}{verdict}{segment}")
            previous = row.fingerprint_id


def _series(rows: list[SampleRow]) -> dict[tuple[str, str, str, str], list[SampleRow]]:
    grouped: dict[tuple[str, str, str, str], list[SampleRow]] = {}
    for row in rows:
        grouped.setdefault((row.device, row.step, row.item, row.metric), []).append(row)
    return grouped


@history_app.command("accept")
def history_accept(
    device: Annotated[str, typer.Argument(help="The device.")],
    item: Annotated[str, typer.Argument(help="The bench item, e.g. 'bench saxpy[f32]' (as the report names it).")],
    history: HistoryOption = DEFAULT_HISTORY,
    step: Annotated[str | None, typer.Option("--step", help="The bench step, if the playbook has several.")] = None,
    metric: Annotated[str | None, typer.Option("--metric", "-m", help="device_ms or wall_ms (default: "
                      "each judged).")] = None,
) -> None:
    """Accept a series' new level after an intended change: from the night the change began it is the
    baseline, and it is no longer reported."""
    from deployer.history.db import History

    with History.open(history, create=False) as db:
        accepted = _accept(db, device, item, step, metric)
    for line in accepted:
        stdout.print(line)


def _accept(db: History, device: str, item: str, step: str | None, metric: str | None) -> list[str]:
    latest = next((r for r in db.runs(limit=1000)
                   if any(t.device == device and t.item == item for t in db.latency(r.id))), None)
    if latest is None:
        raise InputError(None, "item", f"no latency verdict for device {device!r} and item {item!r} "
                                       "(see deploy history show)")
    lines = []
    for trend in db.latency(latest.id):
        if trend.device != device or trend.item != item or (step and trend.step != step) or \
                (metric and trend.metric != metric):
            continue
        since_run = db.run(trend.since_run) if trend.since_run else None
        since = since_run.started if since_run else latest.started
        db.accept(device, trend.step, item, trend.metric, since=since)
        lines.append(f"{device} {trend.step} {item} {trend.metric}: accepted the level since "
                     f"{'run ' + str(since_run.id) if since_run else 'run ' + str(latest.id)} ({_day(since)})")
    if not lines:
        raise InputError(None, "--step" if step else "--metric", "nothing matches those filters")
    return lines


@history_app.command("prune")
def history_prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Delete runs that started longer ago than "
                          "this: 90d, 12h, 2w (s, m, h, d, w).")],
    history: HistoryOption = DEFAULT_HISTORY,
) -> None:
    """Delete old runs (and all their results) from the history database."""
    from deployer.history.db import History
    from deployer.history.durations import parse_age

    age = parse_age(older_than)
    with History.open(history, create=False) as db:
        removed = db.prune(age)
    stdout.print(f"{history}: {removed} run(s) older than {shown(older_than)} deleted")


@history_app.command("merge")
def history_merge(
    shards: Annotated[list[Path], typer.Argument(help="The shards' history files (each a copy of this history "
                      "that `deploy run --shard K/N --run-id ID` wrote to).")],
    history: HistoryOption = DEFAULT_HISTORY,
) -> None:
    """Append every shard's run into this (cumulative) history, one run per --run-id; merging twice
    changes nothing; shards of different playbooks or fleets are refused."""
    from deployer.history.db import History
    from deployer.history.shards import merge_history

    with History.open(history) as db:
        for shard in shards:
            for key, here, added in merge_history(db, shard):
                stdout.print(f"{shard}: run {shown(key)} -> run {here} here: "
                             f"{len(added)} device(s) added" + (f" ({shown(', '.join(added))})" if added else ""))


@app.command()
def compare(
    run_a: Annotated[int, typer.Argument(help="The earlier run's id (deploy history list).")],
    run_b: Annotated[int, typer.Argument(help="The later run's id.")],
    history: HistoryOption = DEFAULT_HISTORY,
    as_json: JsonOption = False,
) -> None:
    """Two runs side by side: per device and item, status changes and latency changes, each with whether
    it is significant (Mann-Whitney on the two nights' repeats, p < 0.002, and at least 5%)."""
    from deployer.history.db import History
    from deployer.history.latency import mann_whitney, night_stats

    with History.open(history, create=False, read_only=True) as db:
        if db.run(run_a) is None or db.run(run_b) is None:
            missing = run_a if db.run(run_a) is None else run_b
            raise InputError(None, "run", f"{history} has no run {missing} (deploy history list)")
        before = {(d.device, i.step, i.item): i for d in db.device_results(run_a) for i in d.items}
        after = {(d.device, i.step, i.item): i for d in db.device_results(run_b) for i in d.items}
    rows = []
    for key in sorted(set(before) & set(after)):
        a, b = before[key], after[key]
        row: dict[str, object] = {"device": key[0], "step": key[1], "item": key[2], "before": a.status,
                                  "after": b.status, "metric": None, "change": None, "p_value": None,
                                  "significant": False}
        samples_a, samples_b = ({s.name: s.values for s in x.samples} for x in (a, b))
        metric = next((m for m in ("device_ms", "wall_ms") if m in samples_a and m in samples_b), None)
        if metric is not None:
            median_a, median_b = night_stats(samples_a[metric]).median, night_stats(samples_b[metric]).median
            change = median_b / median_a - 1 if median_a > 0 else 0.0
            _, p_value = mann_whitney(samples_b[metric], samples_a[metric], "two-sided")
            row.update(metric=metric, change=change, p_value=p_value,
                       significant=p_value < SIGNIFICANT_P and abs(change) >= 0.05)
        if a.status != b.status or metric is not None:
            rows.append(row)
    if as_json:
        emit_json({"schema_version": 1, "run_a": run_a, "run_b": run_b, "items": rows})
        return
    table = Table(title=f"run {run_a} -> run {run_b}", title_justify="left")
    for column in ("device", "item", "status", "latency", "significant"):
        table.add_column(column)
    for row in rows:
        status = str(row["before"]) if row["before"] == row["after"] else f"{row['before']} -> {row['after']}"
        delta = row["change"]
        latency = "" if not isinstance(delta, float) else f"{delta:+.1%} ({row['metric']}, p={row['p_value']:.2g})"
        table.add_row(shown(str(row["device"])), shown(f"{row['step']} {row['item']}".strip()), status, latency,
                      "yes" if row["significant"] else "")
    stdout.print(table)
