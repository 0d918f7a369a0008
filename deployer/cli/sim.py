"""`deploy sim up|status|down`: the simulated fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from deployer.cli.app import DEFAULT_SIM_DIR, JsonOption, SimDirOption, SimServer, sim_app, stdout
from deployer.cli.render import emit_json
from deployer.errors import InputError


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
    opencl_library: Annotated[Path | None, typer.Option("--opencl-library", help="The OpenCL library every "
                              "device's agent loads (inventory opencl.library), e.g. the MACE test shim; also "
                              "sets POCL_EXTRA_BUILD_FLAGS=-w, which MACE's programs need on PoCL.")] = None,
) -> None:
    """Start N devices, each a real SSH server with its own account home, host key and PoCL (docs/sim.md)."""
    from dataclasses import replace

    from deployer.sim.fleet import fleet_specs, start_fleet

    for option, value in (("--rtt-ms", rtt_ms), ("--rate-kbit", rate_kbit)):
        if value < 0:
            raise InputError(None, option, f"expected a whole number >= 0, got {value}")
    specs = {s.name: replace(s, server=server.value) for s in fleet_specs(devices, mix=mix)}
    faults = _sim_faults(specs, without_python or [], without_opencl or [], disk_kib or [])
    fleet = start_fleet(folder, [replace(s, **faults.get(n, {})) for n, s in specs.items()], pocl_cache=pocl_cache,
                        rtt_ms=rtt_ms, rate_kbit=rate_kbit,
                        opencl_library=str(opencl_library.resolve()) if opencl_library else None)
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


@sim_app.command("set")
def sim_set(
    name: Annotated[str, typer.Argument(help="The simulated device.")],
    folder: SimDirOption = DEFAULT_SIM_DIR,
    temp_c: Annotated[float | None, typer.Option("--temp-c", min=-60, max=200, help="What its "
                      "/sys/class/thermal/thermal_zone0/temp reads, in degrees C (45 at start).")] = None,
    driver: Annotated[str | None, typer.Option("--driver", help="Its PoCL device, pthread or basic: another "
                      "driver, another fingerprint (OpenSSH devices).")] = None,
    down: Annotated[bool, typer.Option("--down", help="Stop its server: connections are refused.")] = False,
    up: Annotated[bool, typer.Option("--up", help="Start a stopped device again on the same address.")] = False,
    cpu: Annotated[float | None, typer.Option("--cpu", min=0, max=64, help="CPUs' worth of time it gets (0.25: a "
                   "quarter of one, a slow board; 0: no limit), by a cgroup v1 CPU quota.")] = None,
) -> None:
    """Change one device between runs: hot, a new driver, slow, down or up again (docs/sim.md)."""
    from deployer.sim.fleet import load_fleet, set_device

    if down and up:
        raise InputError(None, "--down", "--down and --up together: choose one")
    fleet = load_fleet(folder.resolve())
    if not fleet.devices:
        raise InputError(None, "--dir", f"no simulated fleet in {folder} (deploy sim up first)")
    device = set_device(fleet, name, temp_c=temp_c, driver=driver, down=down, up=up, cpu=cpu)
    stdout.print(f"{name}: driver {device.spec.pocl_device}, " + ("down" if down else "up"))


@sim_app.command("status")
def sim_status(folder: SimDirOption = DEFAULT_SIM_DIR, as_json: JsonOption = False) -> None:
    """Show the simulated devices and whether each is running."""
    from deployer.sim.fleet import fleet_status

    rows = fleet_status(folder)
    if as_json:
        emit_json({"schema_version": 1, "devices": rows})
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
    from deployer.sim.fleet import stop_fleet

    stdout.print(f"stopped {stop_fleet(folder)} device(s)")
