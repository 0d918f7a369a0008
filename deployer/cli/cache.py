"""`deploy cache ls|show|verify|prune|export|install`: the local per-device cache."""

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
    MaceFormat,
    QuietOption,
    WaitOption,
    app,
    select_devices,
    stdout,
)
from deployer.cli.push import CacheOption
from deployer.cli.render import device_line, emit_json, finish_fleet, fleet_progress, shown
from deployer.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from deployer.tasks.collect import InstallOutcome

cache_app = typer.Typer(no_args_is_help=True, help="The local per-device cache: list, show, verify, prune, "
                        "export; install on devices.")

app.add_typer(cache_app, name="cache")


def existing(cache: Path) -> Path:
    """A cache folder that exists: a mistyped --cache is an input error, not an empty cache."""
    if not cache.is_dir():
        raise InputError(None, "--cache", f"{cache}: no such cache folder (give the folder a push wrote)")
    return cache


@cache_app.command("ls")
def cache_ls(cache: CacheOption = Path("cache"), as_json: JsonOption = False) -> None:
    """List devices in the cache: fingerprint, programs, size and age, collected files."""
    from deployer.cache.admin import summary

    rows = summary(cache)
    if as_json:
        emit_json({"devices": rows})
        return
    table = Table("device", "fingerprint", "seen", "programs", "bytes", "age s", "collected")
    for r in rows:
        table.add_row(*(shown(str(r[k])) for k in ("name", "fingerprint_id", "fingerprints_seen", "programs",
                                                    "cache_bytes", "age_s", "collected")))
    stdout.print(table if rows else f"no devices in {cache}")


@cache_app.command("show")
def cache_show(device: Annotated[str, typer.Argument(help="Device name.")], cache: CacheOption = Path("cache")) -> None:
    """One device's fingerprint history, programs and collected files (JSON)."""
    from deployer.cache.admin import show

    emit_json(show(existing(cache), device))


@cache_app.command("verify")
def cache_verify(cache: CacheOption = Path("cache")) -> None:
    """Check every hash against its manifest or record and parse every file; exit 1 on any problem."""
    from deployer.cache.admin import device_names, verify

    problems = verify(existing(cache))
    for problem in problems:
        stdout.print(f"[red]problem[/red] {shown(problem)}")
    stdout.print(f"{len(device_names(cache))} device(s) checked, {len(problems)} problem(s)")
    raise typer.Exit(1 if problems else 0)


@cache_app.command("prune")
def cache_prune(
    cache: CacheOption = Path("cache"),
    older_than: Annotated[float | None, typer.Option("--older-than", help="Days.")] = None,
    stale: Annotated[bool, typer.Option("--stale", help="Collected files MACE would not use, or whose driver "
                     "changed since they were written.")] = False,
    wait: WaitOption = 0.0,
) -> None:
    """Remove collected files that are old or stale."""
    from deployer.cache.admin import prune
    from deployer.cache.store import cache_lock

    if older_than is None and not stale:
        raise InputError(None, "--older-than/--stale", "say what to prune")
    with cache_lock(existing(cache), wait=wait):  # never under a collect that is writing the same records
        removed = prune(cache, older_than_days=older_than, stale=stale)
    for line in removed:
        stdout.print(f"removed {shown(line)}")
    stdout.print(f"{len(removed)} collected file(s) removed")


@cache_app.command("export")
def cache_export(
    cache: CacheOption = Path("cache"),
    device: Annotated[str | None, typer.Option("--device", help="Export this device's cache file.")] = None,
    to: Annotated[Path, typer.Option("--to", help="File or folder to write.")] = Path("."),
    tarballs: Annotated[bool, typer.Option("--tarballs", help="One tarball per device model into --to.")] = False,
    mace_format: Annotated[MaceFormat | None, typer.Option("--mace-format", help="Convert to this container "
                           "(legacy: for apps on MACE v1.0.x).")] = None,
) -> None:
    """Export one device's `mace_cl_compiled_program.bin`, or a tarball per device model."""
    from deployer.cache.admin import export_file, export_tarballs

    if tarballs == (device is not None):
        raise InputError(None, "--device/--tarballs", "give exactly one of --device NAME and --tarballs")
    if device is not None:
        fmt = mace_format.value if mace_format else None
        stdout.print(f"wrote {export_file(existing(cache), device, to, fmt)}")
        return
    for item in export_tarballs(existing(cache), to):
        stdout.print(f"wrote {item['tarball']} ({len(item['devices'])} device(s), "
                     f"{item['distinct_files']} distinct file(s))")


@cache_app.command("install")
def cache_install(
    fleet: FleetOption,
    to: Annotated[str, typer.Option("--to", help="Path on each device where the app reads its cache file.")],
    limit: LimitOption = None,
    fleet_format: FleetFormatOption = None,
    cache: CacheOption = Path("cache"),
    forks: ForksOption = 16,
    accept_new_host_keys: AcceptNewOption = False,
    wait: WaitOption = 0.0,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Copy each device's cache file to where its app reads it, on devices whose driver still matches."""
    from deployer.cache.store import cache_lock
    from deployer.tasks.collect import install_fleet

    devices = select_devices(fleet, limit, cache, form=fleet_format)
    with cache_lock(cache, wait=wait), fleet_progress(devices, "deploy cache install", quiet) as progress:
        # a push or prune beside it never changes the files it sends
        result = install_fleet(devices, cache, to, forks=forks, progress=progress,
                               accept_new_host_keys=accept_new_host_keys)
    finish_fleet(result, as_json=as_json, plain=lambda: _print_install(result.outcomes))


def _print_install(outcomes: Sequence[InstallOutcome]) -> None:
    for o in outcomes:
        color = {"installed": "green", "skipped": "yellow"}.get(o.status, "red")
        device_line(o.name, o.status, color, o.detail or o.error)
