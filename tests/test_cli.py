"""The command line: input errors, the local transport, the sim commands, a corrupted binary on a device."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployer.config.inventory import load_inventory
from deployer.config.kernels import load_library
from deployer.sim.fleet import DeviceSpec, Fleet, fleet_status
from deployer.tasks.plan import HashIndex, local_files
from deployer.tasks.push import PushJob, release_paths, run_fleet
from deployer.tasks.smoke import Smoke, load_references, plan_smoke
from tests.conftest import KERNELS, REPO, Cli, StageHook
from tests.test_faults import MakeFleet


def test_missing_inventory(cli: Cli, tmp_path: Path) -> None:
    run = cli("push", "--fleet", tmp_path / "nope.yml", "--cache", tmp_path / "cache")
    assert run.code == 2 and "nope.yml" in run.err and "Traceback" not in run.err
    assert not (tmp_path / "cache").exists()


def test_yaml_syntax_error_names_file_and_line(cli: Cli, tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.yml"
    inventory.write_text("devices:\n  - name: a\n    host: [unclosed\n")
    run = cli("inventory", "check", "--fleet", inventory)
    assert run.code == 2 and f"{inventory}:" in run.err and "Traceback" not in run.err


def test_misspelt_field_is_named_with_a_suggestion(cli: Cli, tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.yml"
    inventory.write_text("devices:\n  - name: a\n    host: 10.0.0.1\n    prot: 22\n")
    run = cli("inventory", "check", "--fleet", inventory)
    assert run.code == 2
    assert f"{inventory}:4" in run.err and "'prot'" in run.err and "port" in run.err


def test_bad_kernel_manifest_stops_before_any_device(cli: Cli, fleet: Fleet, tmp_path: Path,
                                                     kernels_copy: Path) -> None:
    manifest = kernels_copy / "kernels.yml"
    manifest.write_text(manifest.read_text().replace("    source: relu.cl", "    sourse: relu.cl"))
    line = next(i for i, t in enumerate(manifest.read_text().splitlines(), 1) if "sourse" in t)
    run = cli("push", "--fleet", fleet.inventory, "--kernels", kernels_copy, "--cache", tmp_path / "cache")
    assert run.code == 2 and f"kernels.yml:{line}" in run.err and "did you mean 'source'" in run.err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("pattern", ["model/*.bin", "./x.bin", "~pi/x.bin"])
def test_a_relative_collect_path_is_an_input_error(cli: Cli, tmp_path: Path, pattern: str) -> None:
    """Found before any device is touched (it used to reach the boards and fail there, exit 1)."""
    inventory = tmp_path / "fleet.yml"
    inventory.write_text("devices:\n  - name: a\n    host: 10.255.255.1\n")  # never reached
    run = cli("collect", "--fleet", inventory, "--path", "/data/mace_cl_compiled_program.bin", "--path", pattern,
              "--cache", tmp_path / "cache")
    assert run.code == 2 and f"field 'path': {pattern!r} is relative" in run.err, run.err
    assert not (tmp_path / "cache").exists()


def test_a_bug_in_the_references_is_an_input_error(cli: Cli, tmp_path: Path, kernels_copy: Path) -> None:
    """The user's reference.py raising is their input, not our bug: exit 2 naming the file, line and case
    (it was exit 70, "internal error, please report it"), found before any device is touched."""
    references = kernels_copy / "reference.py"
    text = references.read_text().replace("def saxpy(a, x, y, n):\n", "def saxpy(a, x, y, n):\n    1 / 0\n")
    references.write_text(text)
    line = text.splitlines().index("    1 / 0") + 1
    inventory = tmp_path / "fleet.yml"
    inventory.write_text("devices:\n  - name: a\n    host: 10.255.255.1\n")  # never reached
    run = cli("push", "--fleet", inventory, "--kernels", kernels_copy, "--cache", tmp_path / "cache")
    assert run.code == 2, run.err
    assert f"{references}:{line}: field 'reference': saxpy[f32]: saxpy() raised ZeroDivisionError" in run.err, run.err
    assert "internal error" not in run.err and not (tmp_path / "cache").exists()


def test_missing_model_is_an_input_error(cli: Cli, fleet: Fleet, tmp_path: Path) -> None:
    run = cli("push", "--fleet", fleet.inventory, "--model", tmp_path / "absent.bin", "--cache", tmp_path / "c")
    assert run.code == 2 and "absent.bin" in run.err and "Traceback" not in run.err


def test_inventory_list_json_hides_env_values(cli: Cli, fleet: Fleet, tmp_path: Path) -> None:
    document = yaml.safe_load(fleet.inventory.read_text())
    document["devices"][0]["env"] = {"API_TOKEN": "s3cret-value"}
    inventory = tmp_path / "fleet.yml"
    inventory.write_text(yaml.safe_dump(document))
    run = cli("inventory", "list", "--fleet", inventory, "--json")
    assert run.code == 0 and "s3cret-value" not in run.out
    assert [d["name"] for d in run.json()["devices"]] == ["sim-01", "sim-02", "sim-03"]


def test_local_transport(cli: Cli, tmp_path: Path) -> None:
    """`host: local`: the controller itself is a device, through the same agent and protocol."""
    inventory = tmp_path / "local.yml"
    # A PoCL cache of its own: this device runs as root, whose cache folders (mode 700) in the fleet's
    # shared cache would make the simulated devices' builds fail when a hash prefix folder collides.
    inventory.write_text(yaml.safe_dump({"devices": [{
        "name": "controller", "host": "local", "remote_dir": str(tmp_path / "remote"),
        "env": {"POCL_CACHE_DIR": str(tmp_path / "pocl-cache")}}]}))
    run = cli("push", "--fleet", inventory, "--kernels", KERNELS, "--cache", tmp_path / "cache", "--json")
    device = run.json()["devices"][0]
    assert run.code == 0, device["error"]
    assert device["fingerprint"]["platform"]["name"] == "Portable Computing Language"
    assert (tmp_path / "remote" / "current").is_symlink()
    assert (tmp_path / "cache" / "controller" / "mace_cl_compiled_program.bin").exists()


def test_sim_commands(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "sim"
    run = cli("sim", "up", "--devices", "2", "--dir", folder, "--without-python", "sim-02")
    try:
        assert run.code == 0 and (folder / "inventory.yml").exists()
        devices = load_inventory(folder / "inventory.yml").devices
        assert [d.name for d in devices] == ["sim-01", "sim-02"]
        # written exactly as a healthy board would be: the fault is in the device, not the inventory
        assert devices[0].python == devices[1].python
        status = cli("sim", "status", "--dir", folder, "--json").json()["devices"]
        assert [d["running"] for d in status] == [True, True]
    finally:
        down = cli("sim", "down", "--dir", folder)
    assert down.code == 0 and "stopped 2 device(s)" in down.out
    assert fleet_status(folder) == []


def test_sim_up_rejects_unknown_device(cli: Cli, tmp_path: Path) -> None:
    run = cli("sim", "up", "--devices", "2", "--dir", tmp_path / "sim", "--without-opencl", "sim-07")
    assert run.code == 2 and "sim-07" in run.err


def test_a_sim_that_cannot_start_is_not_a_cache_error(cli: Cli, tmp_path: Path) -> None:
    """`deploy sim` failing is exit 1 naming the folder: neither 3 ("the local cache could not be written")
    nor 70 (an OSError escaping as a bug)."""
    run = cli("sim", "up", "--devices", "1", "--dir", "/proc/deployer-sim")
    assert run.code == 1 and "cannot create the sim folder /proc/deployer-sim" in run.err, run.err
    assert "internal error" not in run.err


def test_flipped_byte_on_the_device_fails_that_device(make_fleet: MakeFleet, tmp_path: Path) -> None:
    """A byte of the device's cache file flips between pull and smoke: the device refuses it, naming the
    program, before any driver sees it; the other device passes."""
    fleet = make_fleet([DeviceSpec("sim-01"), DeviceSpec("sim-02")])
    library = load_library(KERNELS)
    job = PushJob(library=library, smoke=Smoke(library, plan_smoke(library, load_references(library))),
                  files=local_files(release_paths(library, []), HashIndex(None)), cache=tmp_path / "cache",
                  mace_version="")
    release_dir = Path(fleet.device("sim-01").folder) / "home" / ".deployer" / "releases"
    flipped: list[str] = []

    def flip_before_smoke(device: str, stage: str) -> None:
        if device == "sim-01" and stage == "smoke":
            cache_file = next(release_dir.glob("*/build/mace_cl_compiled_program.bin"))
            data = bytearray(cache_file.read_bytes())
            binary = data.find(b"poclbin")  # the first program's binary: flip a byte inside it
            data[binary + 200] ^= 0x01
            cache_file.write_bytes(bytes(data))
            flipped.append(hashlib.sha256(data).hexdigest())

    result = run_fleet(load_inventory(fleet.inventory).devices, job, forks=2, progress=StageHook(flip_before_smoke))
    assert flipped
    bad, good = result.outcomes
    assert good.ok and not bad.ok and bad.failed_stage == "smoke"
    assert "[binary_mismatch]" in (bad.error or "") and "-DDATA_TYPE=float" in (bad.error or "")
    assert not (tmp_path / "cache" / "sim-01" / "mace_cl_compiled_program.bin").exists()


def test_usage_errors_exit_2(cli: Cli) -> None:
    missing = cli("push")
    assert missing.code == 2 and "--fleet" in missing.err and "Traceback" not in missing.err
    assert cli("push", "--fleet", "x.yml", "--forks", "0").code == 2


@pytest.mark.slow
def test_ctrl_c_exits_130(tmp_path: Path) -> None:
    """SIGINT while a device is still connecting: the run stops, says so, and exits 130."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(0)
    fillers = [socket.socket() for _ in range(8)]
    for filler in fillers:  # fill the accept queue: later connects hang
        filler.setblocking(False)
        filler.connect_ex(stalled.getsockname())
    inventory = tmp_path / "fleet.yml"
    inventory.write_text(yaml.safe_dump({"devices": [{"name": "slow", "host": "127.0.0.1",
                                                      "port": stalled.getsockname()[1], "timeouts": {"connect": 5}}]}))
    process = subprocess.Popen([sys.executable, "-m", "deployer", "push", "--fleet", str(inventory), "--kernels",
                                str(KERNELS), "--cache", str(tmp_path / "cache")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        time.sleep(2.0)
        process.send_signal(signal.SIGINT)
        start = time.monotonic()
        out, err = process.communicate(timeout=20)
        stopped_s = time.monotonic() - start
    finally:
        process.kill()
        for sock in [stalled, *fillers]:
            sock.close()
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert stopped_s < 3.0, stopped_s  # the connect in progress is dropped, not waited out (it was ~13 s)
    assert "slow: connect: interrupted (Ctrl-C)" in out and "0/1 device(s) passed" in out, out  # the summary


@pytest.mark.parametrize("command", [["verify"], ["show", "pi-01"], ["prune", "--stale"],
                                     ["export", "--device", "pi-01", "--to", "x"]])
def test_a_mistyped_cache_folder_is_an_input_error(cli: Cli, tmp_path: Path, command: list[str]) -> None:
    """`cache verify --cache /typo` said "0 device(s) checked" and exited 0."""
    run = cli("cache", *command, "--cache", tmp_path / "typo")
    assert run.code == 2 and "no such cache folder" in run.err, run.err
    assert not (tmp_path / "typo").exists()


def test_cache_prune_waits_for_the_cache_lock(cli: Cli, tmp_path: Path) -> None:
    """prune took no lock: beside a collect writing the same records it could fail healthy devices."""
    from deployer.cache.store import cache_lock

    cache = tmp_path / "cache"
    cache.mkdir()
    with cache_lock(cache):  # another run holds the cache
        run = cli("cache", "prune", "--stale", "--cache", cache)
    assert run.code == 3 and "in use by another deploy run" in run.err, run.err
    assert cli("cache", "prune", "--stale", "--cache", cache).code == 0


def test_a_missing_kernel_library_names_the_flag(cli: Cli, tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.yml"
    inventory.write_text("devices:\n  - name: a\n    host: 10.255.255.1\n")
    run = cli("push", "--fleet", inventory, "--kernels", tmp_path / "nowhere", "--cache", tmp_path / "c")
    assert run.code == 2 and "--kernels DIR" in run.err, run.err


def test_every_fleet_command_explains_its_shared_flags(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """push, rollback, collect and cache install share one runner and one renderer: the same flags, with the
    same meaning (--quiet: no progress; --json: the document; --wait: queue behind the cache's holder)."""
    for command in (["push"], ["rollback"], ["collect"], ["cache", "install"]):
        text = " ".join(cli(*command, "--help").out.split())
        assert "Devices worked on at once" in text and "never seen before" in text, (command, text)
        assert "No progress on stderr" in text and "One JSON object on stdout" in text, (command, text)
        assert "wait up to this many seconds" in text, (command, text)


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, sub in getattr(group, "commands", {}).items():
        yield (*path, name)
        yield from _commands(sub, (*path, name))


def test_every_command_is_in_the_table_that_loads_it() -> None:
    """cli/app.py COMMANDS names each top-level command's module: a command missing there would be listed by
    `deploy --help` and yet unknown to `deploy <it>`."""
    import typer

    from deployer.cli.app import COMMANDS, app
    from deployer.cli.main import load_commands

    load_commands([])
    group: Any = typer.main.get_command(app)
    assert sorted(group.commands) == sorted(COMMANDS)
    assert group.list_commands(None) == list(COMMANDS)  # `deploy --help` lists them in the table's order


def test_help_at_80_columns_keeps_every_flag_whole(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal of 80 columns cut long flags (`--accept-new-host-k…`) and showed Typer's type placeholders
    (`<bool>`, `<int range>`, `<list[Path]>`): each command's help now fits and names every flag whole."""
    import typer

    from deployer.cli.app import app
    from deployer.cli.main import load_commands

    monkeypatch.setenv("COLUMNS", "80")
    load_commands([])  # every command's module: each adds its commands
    commands = list(_commands(typer.main.get_command(app)))
    assert ("push",) in commands and ("history", "merge") in commands and ("sim", "set") in commands
    for command in commands:
        run = cli(*command, "--help")
        assert run.code == 0, (command, run.err)
        lines = run.out.splitlines()
        assert all(len(line) <= 80 for line in lines), (command, run.out)
        assert not re.search(r"…|<bool>|<int|<float|list\[", run.out), (command, run.out)
        flags = {flag for param in _params(command) for flag in param.opts}
        shown = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", run.out))
        assert flags <= shown, (command, flags - shown)


def _params(command: tuple[str, ...]) -> list[Any]:
    import typer

    from deployer.cli.app import app
    from deployer.cli.main import load_commands

    load_commands([])  # every command's module: each adds its commands

    node: Any = typer.main.get_command(app)
    for name in command:
        node = node.commands[name]
    return [p for p in node.params if p.param_type_name == "option"]


def test_inventory_commands_offer_no_failed_set(cli: Cli, fleet: Fleet) -> None:
    """`inventory check/list` read no cache: their help offers no @failed, and asking for it says why."""
    for command in ("check", "list"):
        assert "@failed" not in cli("inventory", command, "--help").out
        run = cli("inventory", command, "--fleet", fleet.inventory, "--limit", "@failed")
        assert run.code == 2 and "@failed" in run.err and "Traceback" not in run.err, run.err
