"""`deploy run` (a nightly playbook on the fleet, with history and verdicts) and `deploy history`.

Exit codes of `deploy run` (docs/design.md, section 14): 0 clean under `--fail-on`; 1 new failures (or,
with `--fail-on any`, any failure); 2 bad input (playbook, inventory, flags); 3 the run could not start
(history database unusable, fleet or cache held by another run), or its `--report` files could not be written
(the run is kept in the history: `deploy report` writes them later); 130 interrupted (the run is kept,
marked incomplete).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from deployer.cli.app import (
    AcceptNewOption,
    FleetFormat,
    FleetFormatOption,
    FleetOption,
    ForksOption,
    JsonOption,
    LimitOption,
    QuietOption,
    app,
    stderr,
    stdout,
)
from deployer.cli.push import CacheOption
from deployer.cli.render import emit_json, fleet_progress, shown
from deployer.errors import InputError, PlaybookError, Where

if TYPE_CHECKING:
    from deployer.config.inventory import Device
    from deployer.config.playbooks import Playbook
    from deployer.history.records import DeviceResult, LatencyResult, Verdict
    from deployer.tasks.run import RunResult

from deployer.cli.history import DEFAULT_HISTORY, HistoryOption


class FailOn(str, Enum):
    new_failure = "new-failure"
    any = "any"
    never = "never"


@app.command()
def run(
    playbook: Annotated[Path, typer.Argument(help="The playbook (YAML, docs/playbooks.md).")],
    fleet: FleetOption,
    limit: LimitOption = None,
    fleet_format: FleetFormatOption = None,
    history: HistoryOption = DEFAULT_HISTORY,
    cache: CacheOption = Path("cache"),
    forks: ForksOption = 16,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the playbook and the inventory, print each "
                       "device's steps; touch no board and no history.")] = False,
    fail_on: Annotated[FailOn, typer.Option("--fail-on", help="Exit 1 on new failures (confirmed, against the "
                       "device's own history), on any failure, or never.")] = FailOn.new_failure,
    flaky_window: Annotated[int, typer.Option("--flaky-window", min=2, max=1000, help="How many comparable runs "
                            "the flaky verdict looks back over.")] = 10,
    flaky_flips: Annotated[int, typer.Option("--flaky-flips", min=1, max=1000, help="Pass/fail flips within "
                           "the window that make a result flaky.")] = 3,
    wait: Annotated[float, typer.Option("--wait", min=0, help="If another run holds this fleet (or the cache), "
                    "wait up to this many seconds for it instead of refusing at once.")] = 0.0,
    report_dir: Annotated[Path | None, typer.Option("--report", help="Then write the run's report.json, junit.xml "
                          "and report.html into this folder (as `deploy report`).")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="K/N: run only the Kth of N stable shares of the "
                     "devices (a CI matrix job; needs --run-id; docs/nightly.md).")] = None,
    run_key: Annotated[str | None, typer.Option("--run-id", help="The id every shard of one run shares (e.g. the "
                       "CI pipeline's): `deploy history merge` joins them into one run.")] = None,
    accept_new_host_keys: AcceptNewOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Run a playbook on every selected device: results, history, verdicts against each device's past."""
    from deployer.config.playbooks import load_playbook

    options = RunOptions(fleet, history, cache, forks, fail_on, (flaky_window, flaky_flips), wait,
                         accept_new_host_keys, quiet, as_json, report_dir, *_shard_options(shard, run_key))
    book = load_playbook(playbook)
    devices = _select(fleet, book, limit, fleet_format)
    if options.shard is not None:
        from deployer.history.shards import shard_of

        devices = [d for d in devices if shard_of(d.name, options.shard[1]) == options.shard[0]]
    if dry_run:
        _print_dry_run(book, devices, as_json)
        raise typer.Exit(0)
    _run(book, devices, options)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """`deploy run`'s flags, past the playbook and the devices."""

    fleet: Path
    history: Path
    cache: Path
    forks: int
    fail_on: FailOn
    flaky: tuple[int, int]  # window, flips
    wait: float
    accept_new: bool
    quiet: bool
    as_json: bool
    report_dir: Path | None
    shard: tuple[int, int] | None  # K, N
    run_key: str | None

    def settings(self) -> dict[str, Any]:
        """What the history keeps of them with the run."""
        kept: dict[str, Any] = {"flaky_window": self.flaky[0], "flaky_flips": self.flaky[1],
                                "fail_on": self.fail_on.value}
        if self.run_key is not None:
            kept["run_key"] = self.run_key
        if self.shard is not None:
            kept["shard"] = f"{self.shard[0]}/{self.shard[1]}"
        return kept


def _shard_options(shard: str | None, run_key: str | None) -> tuple[tuple[int, int] | None, str | None]:
    from deployer.history.shards import parse_run_key, parse_shard

    if shard is not None and run_key is None:
        raise InputError(None, "--shard", "a shard needs --run-id (the id its other shards share, for merging)")
    return (parse_shard(shard) if shard is not None else None,
            parse_run_key(run_key) if run_key is not None else None)


def _select(fleet: Path, book: Playbook, limit: str | None, form: FleetFormat | None) -> list[Device]:
    """The playbook's `limit`, narrowed by `--limit`."""
    from deployer.config.inventory import load_inventory
    from deployer.config.selection import select

    inventory = load_inventory(fleet, form.value if form is not None else None)
    try:
        chosen = list(select(inventory, book.limit))
    except InputError as exc:  # the playbook's own limit: say which file it is in
        raise PlaybookError(Where(str(book.file)), "limit", f"{exc.problem} (in {fleet})") from None
    if limit is None:
        return chosen
    narrowed = {d.name for d in select(inventory, limit)}
    return [d for d in chosen if d.name in narrowed]


def _run(book: Playbook, devices: list[Device], options: RunOptions) -> None:
    from deployer.cache.store import cache_lock
    from deployer.history.db import History
    from deployer.history.report import run_report
    from deployer.history.trends import judge_latency
    from deployer.history.verdicts import judge
    from deployer.tasks.run import fleet_lock, prepare_run, run_fleet

    job = prepare_run(book, options.cache, accept_new_host_keys=options.accept_new)  # bad kernels, models: exit 2
    wait, history = options.wait, options.history
    with fleet_lock(options.fleet, wait=wait), cache_lock(options.cache, wait=wait), History.open(history) as db:
        run_id = db.begin_run(book.name, str(book.file), book.sha256, str(options.fleet.resolve()),
                              [d.name for d in devices], options.settings())
        result: RunResult | None = None
        try:
            with fleet_progress(devices, f"deploy run {book.name}", options.quiet) as progress:
                result = run_fleet(devices, job, forks=options.forks, progress=progress,
                                   on_result=lambda r: db.record_device(run_id, r))
            window, flips = options.flaky
            verdicts = judge(db, run_id, result.devices, flaky_window=window, flaky_flips=flips)
            db.record_verdicts(run_id, verdicts)
            latency = judge_latency(db, run_id, result.devices, min_changes(book))
            db.record_latency(run_id, latency)
        finally:  # interrupted or not, the run ends marked: complete, or incomplete with what it kept
            db.finish_run(run_id, "complete" if result is not None and not result.interrupted else "incomplete")
        info = db.run(run_id)
    assert info is not None
    report = run_report(info, result.devices, verdicts, history=str(history), interrupted=result.interrupted,
                        latency=latency)
    if options.as_json:
        emit_json(report)
    else:
        _print_summary(result, verdicts, run_id, latency)
    if options.report_dir is not None:
        from deployer.cli.report import write_run_reports

        write_run_reports(report, history, run_id, options.report_dir)
    if result.interrupted:
        stderr.print("deploy: interrupted (the run is kept in the history, marked incomplete)")
        raise typer.Exit(130)
    raise typer.Exit(exit_code(result, verdicts, latency, options.fail_on))


def min_changes(book: Playbook) -> dict[str, float]:
    """Each bench step's smallest reported latency change."""
    from deployer.config.playbooks import BenchStep

    return {s.name: s.options.min_change for s in book.steps if isinstance(s.options, BenchStep)}


def exit_code(result: RunResult, verdicts: list[Verdict], latency: list[LatencyResult], fail_on: FailOn) -> int:
    """1 on a new failure or a latency regression (it stays one until accepted); with `any`, on any failure."""
    if fail_on is FailOn.never:
        return 0
    regressed = any(t.kind == "regression" for t in latency)
    if fail_on is FailOn.any:
        return int(regressed or any(i.status == "fail" for d in result.devices for i in d.items))
    return int(regressed or any(v.kind == "new_failure" for v in verdicts))


def _print_dry_run(book: Playbook, devices: list[Device], as_json: bool) -> None:
    from deployer.config.playbooks import describe

    if as_json:
        emit_json({"schema_version": 1, "playbook": book.name, "devices": [
            {"name": d.name, "steps": [{"name": s.name, "kind": s.kind, "describe": describe(s)}
                                       for s in book.steps]} for d in devices]})
        return
    stdout.print(f"playbook {shown(book.name)} ({shown(str(book.file))}): {len(book.steps)} steps on "
                 f"{len(devices)} device(s); nothing was touched")
    for device in devices:
        stdout.print(f"{shown(device.name)} ({shown(device.host)}):")
        for number, step in enumerate(book.steps, 1):
            stdout.print(f"  {number}. {shown(step.name)}: {shown(describe(step))}")


def _print_summary(result: RunResult, verdicts: list[Verdict], run_id: int, latency: list[LatencyResult]) -> None:
    table = Table(title=f"deploy run #{run_id}", title_justify="left")
    for column in ("device", "state", "status", "steps", "pass", "fail", "error", "miss", "skip",
                   "new failures", "fixed", "flaky", "slower"):
        table.add_column(column)
    for device in result.devices:
        mine = [v for v in verdicts if v.device == device.device]
        steps = {i.step for i in device.items}
        passed = {i.step for i in device.items} - {i.step for i in device.items if i.status in ("fail", "error",
                                                                                             "miss")}
        counts = [str(sum(1 for i in device.items if i.status == s)) for s in ("pass", "fail", "error", "miss",
                                                                               "skip")]
        status_style = {"pass": "green", "skip": "green", "fail": "red", "error": "yellow"}.get(device.status, "")
        table.add_row(shown(device.device), device.state,
                      f"[{status_style}]{device.status}[/{status_style}]" if status_style else device.status,
                      f"{len(passed)}/{len(steps)}", *counts,
                      *(str(sum(1 for v in mine if v.kind == k)) for k in ("new_failure", "fixed", "flaky")),
                      str(sum(1 for t in latency if t.device == device.device and t.kind == "regression")))
    stdout.print(table)
    _print_notes(result.devices, verdicts)
    for trend in latency:
        if trend.kind in ("regression", "improvement"):
            stdout.print(f"{shown(trend.device)}: {shown(trend.step)} {shown(trend.item)}: {trend.kind} "
                         f"({shown(trend.note)})")


def _print_notes(devices: tuple[DeviceResult, ...], verdicts: list[Verdict]) -> None:
    """Below the table: why each offline device is offline, each new failure, fix and change of driver."""
    for device in devices:
        if device.state != "ok":
            stdout.print(f"{shown(device.device)}: {device.state}: {shown(device.reason)}")
    reasons = {(d.device, i.step, i.item): i.reason for d in devices for i in d.items}
    for verdict in verdicts:
        if verdict.kind in ("new_failure", "fixed", "flaky") or verdict.note:
            where = f"{verdict.step}{' ' + verdict.item if verdict.item else ''}"
            why = reasons.get((verdict.device, verdict.step, verdict.item), "")
            extra = "; ".join(x for x in (verdict.note, why) if x)
            stdout.print(f"{shown(verdict.device)}: {shown(where)}: {verdict.label}"
                         + (f" ({shown(extra)})" if extra else ""))
