"""`deploy collect`: gather the caches apps wrote on the devices."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from deployer.cli.app import (
    AcceptNewOption,
    FleetFormatOption,
    FleetOption,
    ForksOption,
    JsonOption,
    LimitOption,
    QuietOption,
    WaitOption,
    app,
    select_devices,
    stdout,
)
from deployer.cli.push import CacheOption
from deployer.cli.render import finish_fleet, fleet_progress, shown
from deployer.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from deployer.tasks.collect import CollectOutcome


@app.command()
def collect(
    fleet: FleetOption,
    limit: LimitOption = None,
    fleet_format: FleetFormatOption = None,
    path: Annotated[list[str] | None, typer.Option("--path", "-p", help="Glob of cache files on the devices "
                    "(repeatable; `~` and `**` allowed); default: vars.collect_paths, else MACE's usual "
                    "places.")] = None,
    cache: CacheOption = Path("cache"),
    max_size: Annotated[int, typer.Option("--max-size", min=1, help="Refuse files larger than this (bytes), "
                        "before pulling.")] = 256 << 20,
    max_files: Annotated[int, typer.Option("--max-files", min=1, max=100000, help="Stop listing a device "
                         "after this many files.")] = 1000,
    forks: ForksOption = 16,
    accept_new_host_keys: AcceptNewOption = False,
    wait: WaitOption = 0.0,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Gather the cache files apps wrote on the devices; say which are stale and whether MACE would use them."""
    from deployer.cache.store import cache_lock
    from deployer.tasks.collect import CollectJob, collect_fleet

    for pattern in path or ():
        if not (pattern == "~" or pattern.startswith(("/", "~/"))):
            raise InputError(None, "path", f"{pattern!r} is relative: give an absolute glob, or one under ~/ "
                                           "(it is looked for on the devices, where no folder is current)")
    devices = select_devices(fleet, limit, form=fleet_format)
    job = CollectJob(cache=cache, patterns=tuple(path or ()), max_size=max_size, max_files=max_files,
                     accept_new_host_keys=accept_new_host_keys)
    with cache_lock(cache, wait=wait), fleet_progress(devices, "deploy collect", quiet) as progress:
        result = collect_fleet(devices, job, forks=forks, progress=progress)
    finish_fleet(result, as_json=as_json, plain=lambda: _print_collect(result.outcomes))


def _print_collect(outcomes: Sequence[CollectOutcome]) -> None:
    table = Table("device", "file", "status", "format", "programs", "MACE", "drift", title="deploy collect",
                  title_justify="left")
    for o in outcomes:
        if o.error:
            table.add_row(shown(o.name), "-", "[red]failed[/red]", "", "", "", shown(o.error))
        for f in o.files:
            record = f.record or {}
            verdict = record.get("verdict") or {}
            status = f.status if f.ok else f"[red]{f.status}[/red]: {shown(f.detail or '')}"
            table.add_row(shown(o.name), shown(f.remote_path), status, record.get("format", ""),
                          str(len(record.get("programs", []))) if record else "", verdict.get("mace", ""),
                          "yes" if verdict.get("drift") else ("no" if verdict else ""))
        if o.truncated:
            table.add_row(shown(o.name), "...", "[yellow]listing truncated[/yellow] (--max-files)", "", "", "", "")
    stdout.print(table)
    for o in outcomes:  # each warning once per device, whichever of its files it came with
        warnings = dict.fromkeys(w for f in o.files for w in (f.record or {}).get("warnings", []))
        for warning in warnings:
            stdout.print(f"[yellow]{shown(o.name)}: warning:[/yellow] {shown(warning)}")
