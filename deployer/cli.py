"""`deploy`: the command line. The only module that prints or picks an exit code.

Exit codes: 0 every selected device passed; 1 some device failed (the summary says which and why);
2 bad input, found before any device is touched; 3 the local cache could not be written;
70 a bug (one line on screen, the traceback saved to a file); 130 interrupted.
Heavy modules (paramiko, numpy, the pipeline) are imported inside commands: `deploy --help` stays fast.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
import traceback
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deployer import DEFAULT_MACE_VERSION
from deployer.errors import DeployError, InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from deployer.inventory import Device
    from deployer.pipeline import DeviceOutcome, FleetResult
    from deployer.progress import Progress

DEFAULT_SIM_DIR = Path(".deploy-sim")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Push OpenCL kernels and models to a fleet of boards, compile them there, "
                       "cache the binaries in MACE's format and smoke-test them.")
inventory_app = typer.Typer(no_args_is_help=True, help="Check and list a device inventory.")
sim_app = typer.Typer(no_args_is_help=True, help="A simulated fleet of real SSH servers (sshd or dropbear).")
app.add_typer(inventory_app, name="inventory")
app.add_typer(sim_app, name="sim")

class SimServer(str, Enum):
    openssh = "openssh"
    dropbear = "dropbear"


class MaceFormat(str, Enum):
    pb = "pb"
    legacy = "legacy"


class SmokeMode(str, Enum):
    changed = "changed"
    always = "always"
    never = "never"


stderr = Console(stderr=True, highlight=False, soft_wrap=True)
# Off a terminal (logs, CI, pipes) Rich would assume 80 columns and fold the summary table.
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)

FleetOption = Annotated[Path, typer.Option("--fleet", "-f", help="Inventory YAML file.")]
LimitOption = Annotated[str | None, typer.Option("--limit", "-l", help="Devices: names, groups, globs, "
                                                 "a,b lists, !exclusions; @failed: those that failed the "
                                                 "last push on this cache.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (the summary or JSON "
                                       "still goes to stdout).")]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object on stdout (docs/json.md).")]
SimDirOption = Annotated[Path, typer.Option("--dir", help="Folder of the simulated fleet.")]
WaitOption = Annotated[float, typer.Option("--wait", min=0, help="If another run holds the cache, wait up to "
                                           "this many seconds for it instead of refusing at once.")]


def _select(fleet: Path, limit: str | None, cache: Path | None = None) -> list[Device]:
    """The devices of `--limit`; with a cache, `@failed`/`@passed` name the devices of its last run."""
    from deployer.cache import last_run_sets
    from deployer.inventory import load_inventory, select

    return list(select(load_inventory(fleet), limit, named_sets=last_run_sets(cache) if cache else None))


@inventory_app.command("check")
def inventory_check(fleet: FleetOption, limit: LimitOption = None, as_json: JsonOption = False) -> None:
    """Validate an inventory (and a --limit) without touching any device."""
    devices = _select(fleet, limit)
    if as_json:
        stdout.print_json(json.dumps({"ok": True, "devices": [d.name for d in devices]}))
    else:
        stdout.print(f"{fleet}: ok, {len(devices)} device(s) selected")


@inventory_app.command("list")
def inventory_list(fleet: FleetOption, limit: LimitOption = None, as_json: JsonOption = False) -> None:
    """List the selected devices with their resolved settings (secrets hidden)."""
    from deployer.inventory import describe

    devices = _select(fleet, limit)
    if as_json:
        stdout.print_json(json.dumps({"devices": [describe(d) for d in devices]}))
        return
    table = Table("device", "address", "user", "groups", "remote dir", "python")
    for d in devices:
        address = "local" if d.is_local else f"{d.host}:{d.port}"
        table.add_row(d.name, address, d.user, ",".join(d.groups), d.remote_dir, d.python)
    stdout.print(table)


@app.command()
def push(
    fleet: FleetOption,
    limit: LimitOption = None,
    model: Annotated[list[Path] | None, typer.Option("--model", "-m", help="A model file to push (repeatable); a "
                     "model of the deployer's format (docs/models.md) is also run on each device.")] = None,
    kernels: Annotated[Path, typer.Option("--kernels", help="Kernel library folder (with kernels.yml).")] = Path(
        "kernels"),
    cache: Annotated[Path, typer.Option("--cache", help="Local per-device cache folder.")] = Path("cache"),
    mace_version: Annotated[str | None, typer.Option("--mace-version", help="MaceVersion() of the app's libmace; "
                            f"default: the device's vars.mace_version, else {DEFAULT_MACE_VERSION}.")] = None,
    forks: Annotated[int, typer.Option("--forks", min=1, max=256, help="Devices worked on at once.")] = 16,
    keep: Annotated[int, typer.Option("--keep", min=1, help="Releases kept on each device.")] = 3,
    mace_format: Annotated[MaceFormat, typer.Option("--mace-format", help="Cache container: pb (MACE v1.1+) "
                           "or legacy (v1.0.x apps).")] = MaceFormat.pb,
    accept_new_host_keys: Annotated[bool, typer.Option("--accept-new-host-keys", help="Trust and record the key "
                                    "of a device never seen before (a changed key is always refused).")] = False,
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
    from deployer.cache import cache_lock, record_run
    from deployer.inventory import override
    from deployer.kernels import load_library
    from deployer.model import load_models, plan_model
    from deployer.pipeline import PushJob, release_paths, run_fleet
    from deployer.plan import HASH_INDEX, HashIndex, local_files
    from deployer.smoke import load_references, plan_smoke

    devices = [override(d, connect_retries=retries, deadline=deadline) for d in _select(fleet, limit, cache)]
    library = load_library(kernels)
    model_files, models = load_models(model or [])  # a model of our format: its graph and weights travel
    files = local_files(release_paths(library, model_files), HashIndex(None if check else cache / HASH_INDEX))
    job = PushJob(library=library, smoke=plan_smoke(library, load_references(library)),
                  files=files, cache=cache, mace_version=mace_version or "",
                  keep=keep, accept_new_host_keys=accept_new_host_keys, mace_format=mace_format.value,
                  models=tuple(plan_model(m, library) for m in models), smoke_mode=smoke.value, check=check,
                  max_fail_percentage=max_fail_percentage)
    if check:
        with _progress(devices, "deploy push --check", quiet) as progress:
            result = run_fleet(devices, job, forks=forks, progress=progress)
    else:
        with cache_lock(cache, wait=wait), _progress(devices, "deploy push", quiet) as progress:
            result = run_fleet(devices, job, forks=forks, progress=progress)
            record_run(cache, "push", str(fleet), {o.name: o.error for o in result.outcomes})
    if as_json:
        stdout.print_json(json.dumps(_push_json(result, check=check)))
    elif check:
        _print_check(result)
    else:
        _print_summary(result)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def rollback(
    fleet: FleetOption,
    limit: LimitOption = None,
    cache: Annotated[Path, typer.Option("--cache", help="Local per-device cache folder.")] = Path("cache"),
    forks: Annotated[int, typer.Option("--forks", min=1, max=256)] = 16,
    accept_new_host_keys: Annotated[bool, typer.Option("--accept-new-host-keys")] = False,
    wait: WaitOption = 0.0,
    as_json: JsonOption = False,
) -> None:
    """Switch each device back to its previous release; the local cache follows."""
    from deployer.cache import cache_lock, record_run
    from deployer.pipeline import rollback_fleet

    devices = _select(fleet, limit, cache)
    with cache_lock(cache, wait=wait):
        outcomes = rollback_fleet(devices, cache, forks=forks, accept_new_host_keys=accept_new_host_keys)
        record_run(cache, "rollback", str(fleet), {o.name: None if o.ok else o.error for o in outcomes})
    ok = all(o.ok for o in outcomes)
    if as_json:
        stdout.print_json(json.dumps({"schema_version": 1, "ok": ok, "devices": [o.to_json() for o in outcomes]}))
    else:
        for o in outcomes:
            if o.ok:
                stdout.print(f"{escape(o.name)}: [green]rolled back[/green] {escape(str(o.previous))} -> "
                             f"{escape(str(o.current))}" + (f" ({escape(o.error)})" if o.error else ""))
            else:
                stdout.print(f"{escape(o.name)}: [red]failed[/red] {escape(o.error or '')}")
    raise typer.Exit(0 if ok else 1)


def _progress(devices: Sequence[Device], title: str, quiet: bool) -> Progress:
    """A live table on a terminal, plain lines when stderr is a log, nothing with --quiet."""
    from deployer.progress import make_progress

    return make_progress(stderr, [d.name for d in devices], title=title, quiet=quiet)


PUSH_SCHEMA_VERSION = 1


def _push_json(result: FleetResult, *, check: bool = False) -> dict[str, Any]:
    return {"schema_version": PUSH_SCHEMA_VERSION, "ok": result.ok, "check": check,
            "devices": [o.to_json() for o in result.outcomes]}


def _print_check(result: FleetResult) -> None:
    """push --check: per device, what would travel and be rebuilt."""
    for o in result.outcomes:
        if not o.ok or o.plan is None:
            stdout.print(f"[red]{escape(o.name)}[/red]: {escape(o.error or 'failed')}")
            continue
        plan = o.plan
        if not plan.new_release:
            stdout.print(f"{escape(o.name)}: up to date (release {escape(str(plan.current))}); nothing would change")
            continue
        stdout.print(f"{escape(o.name)}: a new release over {escape(str(plan.current or 'nothing deployed'))}")
        stdout.print(f"  would send {len(plan.upload)} file(s), link {len(plan.unchanged)} unchanged"
                     + "".join(f"\n    {escape(p)}" for p in plan.upload))
        if plan.removed:
            stdout.print(f"  would drop {len(plan.removed)} file(s): {escape(', '.join(plan.removed))}")
        stdout.print(f"  would rebuild {len(plan.rebuild)} program(s), reuse {len(plan.reuse)}"
                     + "".join(f"\n    {escape(k)}" for k in plan.rebuild))
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
        return "none"
    return f"{len(o.plan.upload)} file(s), {len(o.plan.rebuild)} rebuilt"


def _print_summary(result: FleetResult) -> None:
    from deployer.progress import human_bytes

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
        table.add_row(escape(o.name), status, escape(f"{platform} / {driver}"), str(o.built), _changes(o), smoke,
                      human_bytes(o.bytes_sent),
                      f"{o.stages.get('compile', 0):.2f}", f"{sum(o.stages.values()):.2f}")
    stdout.print(table)
    for o in result.outcomes:
        for line in _device_lines(o):
            stdout.print(escape(line))
    for o in result.failed:
        stdout.print(f"[red]{escape(o.name)}[/red]: {escape(o.error or 'failed')}")
    total = len(result.outcomes)
    stdout.print(f"{total - len(result.failed)}/{total} device(s) passed "
                 "(seconds per stage: --json)")


CacheOption = Annotated[Path, typer.Option("--cache", help="Local per-device cache folder.")]


@app.command()
def collect(
    fleet: FleetOption,
    limit: LimitOption = None,
    path: Annotated[list[str] | None, typer.Option("--path", "-p", help="Glob of cache files on the devices "
                    "(repeatable; `~` and `**` allowed); default: vars.collect_paths, else MACE's usual "
                    "places.")] = None,
    cache: CacheOption = Path("cache"),
    max_size: Annotated[int, typer.Option("--max-size", min=1, help="Refuse files larger than this (bytes), "
                        "before pulling.")] = 256 << 20,
    max_files: Annotated[int, typer.Option("--max-files", min=1, max=100000, help="Stop listing a device "
                         "after this many files.")] = 1000,
    forks: Annotated[int, typer.Option("--forks", min=1, max=256)] = 16,
    accept_new_host_keys: Annotated[bool, typer.Option("--accept-new-host-keys")] = False,
    wait: WaitOption = 0.0,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Gather the cache files apps wrote on the devices; say which are stale and whether MACE would use them."""
    from deployer.cache import cache_lock
    from deployer.collect import CollectJob, collect_fleet

    devices = _select(fleet, limit)
    job = CollectJob(cache=cache, patterns=tuple(path or ()), max_size=max_size, max_files=max_files,
                     accept_new_host_keys=accept_new_host_keys)
    with cache_lock(cache, wait=wait):
        with _progress(devices, "deploy collect", quiet) as progress:
            outcomes = collect_fleet(devices, job, forks=forks, progress=progress)
    ok = all(o.ok for o in outcomes)
    if as_json:
        stdout.print_json(json.dumps({"schema_version": 1, "ok": ok, "devices": [o.to_json() for o in outcomes]}))
    else:
        _print_collect(outcomes)
    raise typer.Exit(0 if ok else 1)


def _print_collect(outcomes: list[Any]) -> None:
    table = Table("device", "file", "status", "format", "programs", "MACE", "drift", title="deploy collect",
                  title_justify="left")
    for o in outcomes:
        if o.error:
            table.add_row(escape(o.name), "-", "[red]failed[/red]", "", "", "", escape(o.error))
        for f in o.files:
            record = f.record or {}
            verdict = record.get("verdict") or {}
            status = f.status if f.ok else f"[red]{f.status}[/red]: {escape(f.detail or '')}"
            table.add_row(escape(o.name), escape(f.remote_path), status, record.get("format", ""),
                          str(len(record.get("programs", []))) if record else "", verdict.get("mace", ""),
                          "yes" if verdict.get("drift") else ("no" if verdict else ""))
        if o.truncated:
            table.add_row(escape(o.name), "...", "[yellow]listing truncated[/yellow] (--max-files)", "", "", "", "")
    stdout.print(table)


cache_app = typer.Typer(no_args_is_help=True, help="The local per-device cache: list, show, verify, prune, "
                        "export; install on devices.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(cache: CacheOption = Path("cache"), as_json: JsonOption = False) -> None:
    """List devices in the cache: fingerprint, programs, size and age, collected files."""
    from deployer.cache_admin import summary

    rows = summary(cache)
    if as_json:
        stdout.print_json(json.dumps({"devices": rows}))
        return
    table = Table("device", "fingerprint", "seen", "programs", "bytes", "age s", "collected")
    for r in rows:
        table.add_row(*(escape(str(r[k])) for k in ("name", "fingerprint_id", "fingerprints_seen", "programs",
                                                    "cache_bytes", "age_s", "collected")))
    stdout.print(table if rows else f"no devices in {cache}")


@cache_app.command("show")
def cache_show(device: Annotated[str, typer.Argument(help="Device name.")], cache: CacheOption = Path("cache")) -> None:
    """One device's fingerprint history, programs and collected files (JSON)."""
    from deployer.cache_admin import show

    stdout.print_json(json.dumps(show(cache, device)))


@cache_app.command("verify")
def cache_verify(cache: CacheOption = Path("cache")) -> None:
    """Check every hash against its manifest or record and parse every file; exit 1 on any problem."""
    from deployer.cache_admin import device_names, verify

    problems = verify(cache)
    for problem in problems:
        stdout.print(f"[red]problem[/red] {escape(problem)}")
    stdout.print(f"{len(device_names(cache))} device(s) checked, {len(problems)} problem(s)")
    raise typer.Exit(1 if problems else 0)


@cache_app.command("prune")
def cache_prune(
    cache: CacheOption = Path("cache"),
    older_than: Annotated[float | None, typer.Option("--older-than", help="Days.")] = None,
    stale: Annotated[bool, typer.Option("--stale", help="Collected files MACE would not use, or whose driver "
                     "changed since they were written.")] = False,
) -> None:
    """Remove collected files that are old or stale."""
    from deployer.cache_admin import prune

    if older_than is None and not stale:
        raise InputError(None, "--older-than/--stale", "say what to prune")
    for line in (removed := prune(cache, older_than_days=older_than, stale=stale)):
        stdout.print(f"removed {escape(line)}")
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
    from deployer.cache_admin import export_file, export_tarballs

    if tarballs == (device is not None):
        raise InputError(None, "--device/--tarballs", "give exactly one of --device NAME and --tarballs")
    if device is not None:
        fmt = mace_format.value if mace_format else None
        stdout.print(f"wrote {export_file(cache, device, to, fmt)}")
        return
    for item in export_tarballs(cache, to):
        stdout.print(f"wrote {item['tarball']} ({len(item['devices'])} device(s), "
                     f"{item['distinct_files']} distinct file(s))")


@cache_app.command("install")
def cache_install(
    fleet: FleetOption,
    to: Annotated[str, typer.Option("--to", help="Path on each device where the app reads its cache file.")],
    limit: LimitOption = None,
    cache: CacheOption = Path("cache"),
    forks: Annotated[int, typer.Option("--forks", min=1, max=256)] = 16,
    accept_new_host_keys: Annotated[bool, typer.Option("--accept-new-host-keys")] = False,
) -> None:
    """Copy each device's cache file to where its app reads it, on devices whose driver still matches."""
    from deployer.collect import install_fleet

    outcomes = install_fleet(_select(fleet, limit), cache, to, forks=forks,
                             accept_new_host_keys=accept_new_host_keys)
    for o in outcomes:
        color = {"installed": "green", "skipped": "yellow"}.get(o.status, "red")
        stdout.print(f"{escape(o.name)}: [{color}]{o.status}[/{color}] {escape(o.detail or '')}")
    raise typer.Exit(1 if any(o.status == "failed" for o in outcomes) else 0)


@sim_app.command("up")
def sim_up(
    devices: Annotated[int, typer.Option("--devices", "-n", min=1, max=128, help="How many devices.")] = 4,
    folder: SimDirOption = DEFAULT_SIM_DIR,
    mix: Annotated[bool, typer.Option("--mix", help="Every second device uses PoCL's 'basic' device: "
                                      "two fingerprints in one fleet.")] = False,
    without_python: Annotated[list[str] | None, typer.Option("--without-python", help="Device name whose "
                              "python3 is hidden (repeatable).")] = None,
    without_opencl: Annotated[list[str] | None, typer.Option("--without-opencl", help="Device name whose "
                              "libOpenCL.so.1 is hidden (repeatable).")] = None,
    disk_kib: Annotated[list[str] | None, typer.Option("--disk-kib", help="NAME=KIB: that device's remote dir "
                        "is a tmpfs of KIB KiB (repeatable).")] = None,
    pocl_cache: Annotated[Path | None, typer.Option("--pocl-cache", help="A PoCL kernel cache shared by all "
                          "devices (tests only: it turns source builds into cache hits).")] = None,
    server: Annotated[SimServer, typer.Option("--server", help="The SSH server of every device (dropbear: no "
                      "sftp-server).")] = SimServer.openssh,
    rtt_ms: Annotated[int, typer.Option("--rtt-ms", help="Round-trip time a delay proxy adds in front of "
                      "each device (0: none).")] = 0,
    rate_kbit: Annotated[int, typer.Option("--rate-kbit", help="Bandwidth of each device's link, each way, "
                         "in kbit/s (tbf on a veth into its own network namespace; 0: unlimited).")] = 0,
) -> None:
    """Start N devices, each a real SSH server with its own account home, host key and PoCL (docs/sim.md)."""
    from dataclasses import replace

    from deployer.sim import fleet_specs, start_fleet

    for option, value in (("--rtt-ms", rtt_ms), ("--rate-kbit", rate_kbit)):
        if value < 0:
            raise InputError(None, option, f"expected a whole number >= 0, got {value}")
    specs = {s.name: replace(s, server=server.value) for s in fleet_specs(devices, mix=mix)}
    faults = _sim_faults(specs, without_python or [], without_opencl or [], disk_kib or [])
    fleet = start_fleet(folder, [replace(s, **faults.get(n, {})) for n, s in specs.items()], pocl_cache=pocl_cache,
                        rtt_ms=rtt_ms, rate_kbit=rate_kbit)
    stdout.print(f"{len(fleet.devices)} device(s) up; inventory: {fleet.inventory}")


def _sim_faults(specs: dict[str, Any], no_python: list[str], no_opencl: list[str],
                disks: list[str]) -> dict[str, dict[str, Any]]:
    faults: dict[str, dict[str, Any]] = {}

    def mark(name: str, option: str, **change: Any) -> None:
        if name not in specs:
            raise InputError(None, option, f"no simulated device {name!r} (devices: {', '.join(specs)})")
        faults.setdefault(name, {}).update(change)

    for name in no_python:
        mark(name, "--without-python", without_python=True)
    for name in no_opencl:
        mark(name, "--without-opencl", without_opencl=True)
    for item in disks:
        name, _, size = item.partition("=")
        if not size.isdigit() or int(size) <= 0:
            raise InputError(None, "--disk-kib", f"expected NAME=KIB with KIB > 0, got {item!r}")
        mark(name, "--disk-kib", disk_kib=int(size))
    return faults


@sim_app.command("status")
def sim_status(folder: SimDirOption = DEFAULT_SIM_DIR, as_json: JsonOption = False) -> None:
    """Show the simulated devices and whether each is running."""
    from deployer.sim import fleet_status

    rows = fleet_status(folder)
    if as_json:
        stdout.print_json(json.dumps({"devices": rows}))
        return
    table = Table("device", "address", "pid", "running", "pocl device", "server", "rtt ms", "rate kbit")
    for row in rows:
        table.add_row(str(row["name"]), f"{row['host']}:{row['port']}",
                      *(str(row[k]) for k in ("pid", "running", "pocl_device", "server", "rtt_ms")),
                      str(row["rate_kbit"] or "-"))
    stdout.print(table if rows else f"no simulated fleet in {folder}")


@sim_app.command("down")
def sim_down(folder: SimDirOption = DEFAULT_SIM_DIR) -> None:
    """Stop every simulated device of the folder (by the PIDs it recorded)."""
    from deployer.sim import stop_fleet

    stdout.print(f"stopped {stop_fleet(folder)} device(s)")


def _report_bug() -> int:
    with tempfile.NamedTemporaryFile("w", prefix="deploy-crash-", suffix=".txt", delete=False) as out:
        traceback.print_exc(file=out)
    kind = sys.exc_info()[0]
    stderr.print(f"deploy: internal error ({kind.__name__ if kind else 'unknown'}); "
                 f"traceback saved to {out.name}; please report it")
    return 70


class Interrupted(BaseException):
    """Ctrl-C, raised past Typer's own handling (which would exit 1) so that we exit 130."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit).

    Typer runs in standalone mode: it prints usage errors itself and exits 2, as Click does."""
    previous = signal.signal(signal.SIGINT, _interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        app(args=argv, prog_name="deploy")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Interrupted:
        stderr.print("deploy: interrupted")
        return 130
    except DeployError as exc:
        stderr.print(f"deploy: {escape(str(exc))}")
        return exc.exit_code
    except Exception:
        return _report_bug()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


def console_main() -> None:
    sys.exit(main())

