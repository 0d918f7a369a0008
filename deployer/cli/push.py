"""`deploy push` and `deploy rollback`, and their summaries (table, --check plan, JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from deployer import DEFAULT_MACE_VERSION
from deployer.cli.app import (
    AcceptNewOption,
    FleetFormatOption,
    FleetOption,
    ForksOption,
    JsonOption,
    LimitOption,
    MaceFormat,
    QuietOption,
    SmokeMode,
    WaitOption,
    app,
    select_devices,
    stdout,
)
from deployer.cli.render import device_line, finish_fleet, fleet_progress, shown

if TYPE_CHECKING:
    from collections.abc import Sequence

    from deployer.tasks.push import DeviceOutcome, FleetResult
    from deployer.tasks.rollback import RollbackOutcome
    from deployer.tasks.runner import FleetOutcome


@app.command()
def push(
    fleet: FleetOption,
    limit: LimitOption = None,
    fleet_format: FleetFormatOption = None,
    model: Annotated[list[Path] | None, typer.Option("--model", "-m", help="A model file to push (repeatable); a "
                     "model of the deployer's format (docs/models.md) is also run on each device.")] = None,
    kernels: Annotated[Path, typer.Option("--kernels", help="Kernel library folder (with kernels.yml).")] = Path(
        "kernels"),
    cache: Annotated[Path, typer.Option("--cache", help="Local per-device cache folder.")] = Path("cache"),
    mace_version: Annotated[str | None, typer.Option("--mace-version", help="MaceVersion() of the app's libmace; "
                            f"default: the device's vars.mace_version, else {DEFAULT_MACE_VERSION}.")] = None,
    mace_programs: Annotated[Path | None, typer.Option("--mace-programs", help="A MACE app's programs to build "
                             "instead of --kernels: a MACE cache file (e.g. one `deploy collect` pulled) or a "
                             "file of program keys, one per line; needs --mace-kernels.")] = None,
    mace_kernels: Annotated[Path | None, typer.Option("--mace-kernels", help="MACE's OpenCL kernel folder "
                            "(mace/ops/opencl/cl) of the app's MACE tree, for --mace-programs.")] = None,
    forks: ForksOption = 16,
    keep: Annotated[int, typer.Option("--keep", min=1, help="Releases kept on each device.")] = 3,
    mace_format: Annotated[MaceFormat, typer.Option("--mace-format", help="Cache container: pb (MACE v1.1+) "
                           "or legacy (v1.0.x apps).")] = MaceFormat.pb,
    accept_new_host_keys: AcceptNewOption = False,
    smoke: Annotated[SmokeMode, typer.Option("--smoke", help="Smoke-test the programs whose binary or "
                     "fingerprint changed (changed), every program (always), or none (never).")] = SmokeMode.changed,
    check: Annotated[bool, typer.Option("--check", help="Only say, per device, which files would travel and "
                     "which programs would be rebuilt; change nothing.")] = False,
    retries: Annotated[int | None, typer.Option("--retries", min=0, max=10, help="Connect retries after a refused, "
                       "reset or timed-out connection; default: the inventory's connect_retries (2).")] = None,
    deadline: Annotated[float | None, typer.Option("--deadline", min=0, help="Seconds one device's whole push may "
                        "take (0: no limit); default: the inventory's timeouts.device.")] = None,
    max_fail_percentage: Annotated[float | None, typer.Option("--max-fail-percentage", min=0, max=100, help="Once "
                                   "more than this % of the devices failed, start no more.")] = None,
    wait: WaitOption = 0.0,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Push kernels and models, compile on each device, pull the MACE cache, smoke-test it (incrementally)."""
    from deployer.cache.store import cache_lock, record_run
    from deployer.config.inventory import override
    from deployer.errors import InputError
    from deployer.tasks.push import prepare_push, run_fleet

    if (mace_programs is None) != (mace_kernels is None):
        given, missing = ("--mace-programs", "--mace-kernels") if mace_kernels is None else \
            ("--mace-kernels", "--mace-programs")
        raise InputError(None, missing, f"{given} needs {missing} (the app's programs and "
                                                          "MACE's kernel folder go together)")
    selected = select_devices(fleet, limit, cache, fleet_format)
    devices = [override(d, connect_retries=retries, deadline=deadline) for d in selected]
    app = (mace_programs, mace_kernels) if mace_programs is not None and mace_kernels is not None else None
    job = prepare_push(kernels, model or [], cache, check=check, mace_programs=app,
                       mace_version=mace_version or "", keep=keep,
                       accept_new_host_keys=accept_new_host_keys, mace_format=mace_format.value,
                       smoke_mode=smoke.value, max_fail_percentage=max_fail_percentage)
    if check:
        with fleet_progress(devices, "deploy push --check", quiet) as progress:
            result = run_fleet(devices, job, forks=forks, progress=progress)
    else:
        with cache_lock(cache, wait=wait), fleet_progress(devices, "deploy push", quiet) as progress:
            result = run_fleet(devices, job, forks=forks, progress=progress)
            record_run(cache, "push", str(fleet), {o.name: o.error for o in result.outcomes})
    finish_fleet(result, as_json=as_json, check=check,
                 plain=lambda: _print_check(result) if check else _print_summary(result))


@app.command()
def rollback(
    fleet: FleetOption,
    limit: LimitOption = None,
    fleet_format: FleetFormatOption = None,
    cache: Annotated[Path, typer.Option("--cache", help="Local per-device cache folder.")] = Path("cache"),
    forks: ForksOption = 16,
    accept_new_host_keys: AcceptNewOption = False,
    wait: WaitOption = 0.0,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Switch each device back to its previous release; the local cache follows."""
    from deployer.cache.store import cache_lock, record_run
    from deployer.tasks.rollback import rollback_fleet

    devices = select_devices(fleet, limit, cache, fleet_format)
    with cache_lock(cache, wait=wait), fleet_progress(devices, "deploy rollback", quiet) as progress:
        result = rollback_fleet(devices, cache, forks=forks, progress=progress,
                                accept_new_host_keys=accept_new_host_keys)
        record_run(cache, "rollback", str(fleet), {o.name: None if o.ok else o.error for o in result.outcomes})
    finish_fleet(result, as_json=as_json, plain=lambda: _print_rollback(result))


def _print_rollback(result: FleetOutcome[RollbackOutcome]) -> None:
    for o in result.outcomes:
        if o.ok:
            device_line(o.name, "rolled back", "green", f"{o.previous} -> {o.current}"
                        + (f" ({o.error})" if o.error else ""))
        else:
            device_line(o.name, "failed", "red", o.error)


def _print_check(result: FleetResult) -> None:
    """push --check: per device, what would travel and be rebuilt."""
    for o in result.outcomes:
        if not o.ok or o.plan is None:
            stdout.print(f"[red]{shown(o.name)}[/red]: {shown(o.error or 'failed')}")
            continue
        plan = o.plan
        if not plan.new_release:
            stdout.print(f"{shown(o.name)}: up to date (release {shown(str(plan.current))}); nothing would change")
            continue
        stdout.print(f"{shown(o.name)}: a new release over {shown(str(plan.current or 'nothing deployed'))}")
        stdout.print(f"  would send {len(plan.upload)} file(s), link {len(plan.unchanged)} unchanged"
                     + "".join(f"\n    {shown(p)}" for p in plan.upload))
        if plan.removed:
            stdout.print(f"  would drop {len(plan.removed)} file(s): {shown(', '.join(plan.removed))}")
        stdout.print(f"  would rebuild {len(plan.rebuild)} program(s), reuse {len(plan.reuse)}"
                     + "".join(f"\n    {shown(k)}" for k in plan.rebuild))
    total = len(result.outcomes)
    stdout.print(f"checked {total - len(result.failed)}/{total} device(s); nothing was changed")


def _device_lines(o: DeviceOutcome) -> list[str]:
    """Below the table: each model's verdict and latency, and the start-up figures of the device."""
    lines = []
    for m in o.models:
        verdict = {True: "passed", False: "failed", None: "not run"}[m.ok]
        error = f", max abs error {m.max_abs_error:.2g}" if m.max_abs_error is not None else ""
        times = (f", first inference {m.first_inference_ms:.0f} ms, steady {m.steady_ms:.2f} ms"
                 if m.first_inference_ms is not None and m.steady_ms is not None else "")
        if m.ok is None and m.detail:
            verdict = m.detail  # "not run: <why>"
        lines.append(f"{o.name}: model {m.name} {verdict}{error}{times}")
    for key, how in o.origin.items():  # sharing meant but not done: the reason, e.g. a refused binary
        if how.startswith("compiled ("):
            lines.append(f"{o.name}: {key}: {how}")
    figures = o.startup.to_json() if o.startup else {}
    source, binary = figures.get("build_from_source_ms"), figures.get("load_from_binary_ms")
    if source is not None and binary is not None:
        lines.append(f"{o.name}: start-up of {len(figures['programs'])} programs: {source:.0f} ms from source, "
                     f"{binary:.0f} ms from the cached binaries")
    return lines


def _changes(o: DeviceOutcome) -> str:
    """What the push changed on the device: files sent and programs rebuilt, or none at all."""
    if o.plan is None:
        return "-"
    if not o.plan.new_release:
        return "none (its shell said so)" if o.shell_noop else "none"
    received = [how.split(" ", 1)[0] for how in o.origin.values() if how.startswith(("shared ", "from "))]
    given = f" ({received.count('shared')} shared, {received.count('from')} from store)" if received else ""
    return f"{len(o.plan.upload)} file(s), {len(o.plan.rebuild)} rebuilt{given}"


def _print_summary(result: FleetResult) -> None:
    from rich.table import Table

    from deployer.tasks.progress import human_bytes

    table = Table(title="deploy push", title_justify="left")
    for column in ("device", "status", "platform / driver", "built", "changes", "smoke", "sent", "compile s",
                   "total s"):
        table.add_column(column, no_wrap=column in ("device", "status"))
    for o in result.outcomes:
        fingerprint = o.fingerprint or {}
        platform = fingerprint.get("platform", {}).get("name", "-")
        driver = fingerprint.get("device", {}).get("driver_version", "")
        passed = sum(k.smoke == "passed" for k in o.kernels)
        skipped = sum(k.smoke == "skipped" for k in o.kernels)
        unchanged = sum(k.smoke == "unchanged" for k in o.kernels)
        smoke = (f"{passed}/{len(o.kernels) - skipped - unchanged}" + (f" +{unchanged} unchanged" if unchanged else "")
                 + (f" +{skipped} skipped" if skipped else ""))
        status = "[green]passed[/green]" if o.ok else f"[red]failed[/red] ({o.failed_stage})"
        table.add_row(shown(o.name), status, shown(f"{platform} / {driver}"), str(o.built), _changes(o), smoke,
                      human_bytes(o.bytes_sent),
                      f"{o.stages.get('compile', 0):.2f}", f"{sum(o.stages.values()):.2f}")
    stdout.print(table)
    for o in result.outcomes:
        for line in _device_lines(o):
            stdout.print(shown(line))
    for warning, names in _warnings_by_text(result.outcomes).items():
        stdout.print(f"[yellow]{shown(_names(names))}: warning:[/yellow] {shown(warning)}")
    for o in result.failed:
        stdout.print(f"[red]{shown(o.name)}[/red]: {shown(o.error or 'failed')}")
    total = len(result.outcomes)
    stdout.print(f"{total - len(result.failed)}/{total} device(s) passed "
                 "(seconds per stage: --json)")

CacheOption = Annotated[Path, typer.Option("--cache", help="Local per-device cache folder.")]


def _warnings_by_text(outcomes: Sequence[DeviceOutcome]) -> dict[str, list[str]]:
    """Each warning once, with the devices it applies to: a fleet of one kind says it once, not per board."""
    by_text: dict[str, list[str]] = {}
    for o in outcomes:
        for warning in o.warnings:
            by_text.setdefault(warning, []).append(o.name)
    return by_text


def _names(names: Sequence[str], shown_at_most: int = 4) -> str:
    if len(names) <= shown_at_most:
        return ", ".join(names)
    return f"{', '.join(names[:shown_at_most])} and {len(names) - shown_at_most} more"
