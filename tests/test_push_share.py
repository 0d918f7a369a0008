"""Build sharing on real sim boards (docs/design.md section 11, docs/inventory.md "Sharing builds"): one board
of a fingerprint compiles, the others receive its binaries and smoke-test them on their own drivers; the local
binary store serves a later push; a damaged store entry, a binary the driver refuses and a builder lost
mid-compile each end with the program compiled where it is needed, and the JSON's `origin` saying why.
The bookkeeping alone (who waits, limits, a failed builder) is tests/test_share.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployer.cache.binaries import STORE, BinaryStore
from deployer.sim.fleet import DeviceSpec, Fleet, start_fleet
from tests.conftest import KERNELS, Cli
from tests.test_faults import device_entry, edit_inventory
from tests.test_kill import Rig, kill_sshd, wait_until

MakeFleet = Callable[[Sequence[DeviceSpec]], Fleet]


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[MakeFleet]:
    """conftest's make_fleet, but each board keeps its own PoCL cache, as real boards do: boards that load one
    shared binary at once race in a cache they share (PoCL unpacks a binary there: "Can't get stat() on
    .../last_accessed", SIGABRT), which only the sim's shared cache can make happen."""
    started: list[Fleet] = []

    def make(specs: Sequence[DeviceSpec]) -> Fleet:
        folder = tmp_path / f"fleet{len(started)}"
        started.append(Fleet(folder))
        started[-1] = start_fleet(folder, specs)
        return started[-1]

    yield make
    for fleet in started:
        fleet.stop()


def two_programs(tmp_path: Path) -> Path:
    """saxpy and relu only: two programs (relu's f16 variant is skipped on PoCL without cl_khr_fp16)."""
    folder = tmp_path / "lib"
    folder.mkdir()
    for name in ("common.h", "reference.py", "saxpy.cl", "relu.cl"):
        (folder / name).write_bytes((KERNELS / name).read_bytes())
    manifest = (KERNELS / "kernels.yml").read_text()
    (folder / "kernels.yml").write_text(manifest[: manifest.index("\n  matmul:")] + "\n")
    return folder


def sharing(fleet: Any, names: list[str] | None = None) -> Path:
    """The fleet's inventory with `share_builds: true` fleet-wide (or for `names` only)."""
    def change(doc: dict[str, Any]) -> None:
        if names is None:
            doc.setdefault("defaults", {})["share_builds"] = True
        for name in names or []:
            device_entry(doc, name)["share_builds"] = True
    return edit_inventory(fleet, change)


def push(cli: Cli, inventory: Path, library: Path, cache: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    run = cli("push", "--fleet", inventory, "--kernels", library, "--cache", cache, "--json", *extra)
    assert "Traceback" not in run.err and run.out.startswith("{"), (run.code, run.err[-2000:])
    return run.code, {d["name"]: d for d in run.json()["devices"]}


def test_one_board_compiles_the_others_receive_and_the_store_serves_a_new_board(
        make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01"), DeviceSpec("sim-02"), DeviceSpec("sim-03"), DeviceSpec("sim-04")])
    library, cache = two_programs(tmp_path), tmp_path / "cache"
    inventory = sharing(fleet)
    code, devices = push(cli, inventory, library, cache, "--limit", "sim-01,sim-02,sim-03")
    assert code == 0, {n: d["error"] for n, d in devices.items()}
    programs = sorted(devices["sim-01"]["origin"])
    assert programs == ["relu -DDATA_TYPE=float", "saxpy -DDATA_TYPE=float"]
    for key in programs:  # each program compiled once; the two others got that board's binary
        origins = sorted(d["origin"][key] for d in devices.values())
        builder = next(n for n, d in devices.items() if d["origin"][key] == "compiled")
        assert origins == ["compiled", f"shared from {builder}", f"shared from {builder}"], origins
    for device in devices.values():  # and every board smoke-tested what it got, on its own driver
        assert {k["smoke"] for k in device["kernels"] if k["built"]} == {"passed"}, device["kernels"]
        assert device["plan"]["rebuild"] and device["ok"]
    assert len(list((cache / STORE).glob("*.bin"))) == 2

    # A new board of the same fingerprint compiles nothing: both binaries come from the store.
    code, devices = push(cli, inventory, library, cache)
    assert code == 0
    assert set(devices["sim-04"]["origin"].values()) == {"from store"}
    assert {k["smoke"] for k in devices["sim-04"]["kernels"] if k["built"]} == {"passed"}
    assert set(devices["sim-01"]["origin"].values()) == {"reused"}  # a no-op there

    # One kernel changed: its program is compiled once for the fleet, the other binaries stay the boards' own
    # (the build request holds the given binary and keeps the others from the current release).
    relu = library / "relu.cl"
    original = relu.read_text()
    relu.write_text(original + "\n/* changed */\n")
    code, devices = push(cli, inventory, library, cache)
    assert code == 0, {n: d["error"] for n, d in devices.items()}
    relus = sorted(d["origin"]["relu -DDATA_TYPE=float"] for d in devices.values())
    assert relus.count("compiled") == 1 and all(r.startswith("shared from sim-") for r in relus if r != "compiled")
    assert {d["origin"]["saxpy -DDATA_TYPE=float"] for d in devices.values()} == {"reused"}
    assert all(d["plan"]["rebuild"] == ["relu -DDATA_TYPE=float"] for d in devices.values())

    # Sharing is a per-device trust decision: without it, a board compiles its own, whatever the store holds.
    relu.write_text(original)  # the store holds this relu's binary (the first push's)
    code, devices = push(cli, fleet.inventory, library, cache, "--limit", "sim-04", "--smoke", "never")
    assert code == 0 and devices["sim-04"]["origin"]["relu -DDATA_TYPE=float"] == "compiled"


def test_a_damaged_store_entry_and_a_refused_binary_are_compiled_again(
        make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01"), DeviceSpec("sim-02")])
    library, cache = two_programs(tmp_path), tmp_path / "cache"
    inventory = sharing(fleet)
    code, devices = push(cli, inventory, library, cache, "--limit", "sim-01")
    assert code == 0 and set(devices["sim-01"]["origin"].values()) == {"compiled"}
    store = cache / STORE
    records = {json.loads(p.read_text())["key"]: p for p in store.glob("*.json")}
    saxpy, relu = records["saxpy -DDATA_TYPE=float"], records["relu -DDATA_TYPE=float"]
    damaged = saxpy.with_suffix(".bin")
    data = damaged.read_bytes()
    damaged.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # a flipped byte: its sha256 no longer matches
    # a whole, consistent entry whose bytes no driver loads (what a broken or hostile builder could leave)
    BinaryStore(cache).put(relu.stem, "relu -DDATA_TYPE=float", b"poclbin? no: junk " * 16, "sim-01")

    code, devices = push(cli, inventory, library, cache, "--limit", "sim-02")
    assert code == 0, devices["sim-02"]["error"]
    origin = devices["sim-02"]["origin"]
    assert origin["saxpy -DDATA_TYPE=float"] == "compiled (its stored binary was damaged: deleted, never used)"
    refused = origin["relu -DDATA_TYPE=float"]
    assert refused.startswith("compiled (this driver refused the binary from store: "), refused
    assert "sharing stopped for fingerprint" in refused
    assert {k["smoke"] for k in devices["sim-02"]["kernels"] if k["built"]} == {"passed"}
    assert json.loads(saxpy.read_text())["built_by"] == "sim-02"  # rebuilt, and kept whole again


@pytest.mark.slow
def test_the_builder_lost_mid_compile_the_other_board_compiles_for_itself(
        make_fleet: MakeFleet, tmp_path: Path) -> None:
    """Both boards' agents pause as a build starts (the tests' phase hook): only the builder gets there while
    the other waits for its binaries. Its sshd is killed there, as a crash would: the waiter builds for itself
    and passes, nobody waits for the lost one, and the push names both."""
    rig = Rig(make_fleet([DeviceSpec("sim-01"), DeviceSpec("sim-02")]), tmp_path)
    hooked = rig.hooked_inventory("build", ["sim-01", "sim-02"])
    inventory = tmp_path / "shared.yml"
    doc = yaml.safe_load(hooked.read_text())
    doc.setdefault("defaults", {})["share_builds"] = True
    inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        process = rig.start(two_programs(tmp_path), inventory=inventory, extra=["--smoke", "never"])
        assert wait_until(lambda: any(rig.marker(n).exists() for n in ("sim-01", "sim-02")), 60), rig.output(process)
        builder = next(n for n in ("sim-01", "sim-02") if rig.marker(n).exists())
        waiter = "sim-02" if builder == "sim-01" else "sim-01"
        # the other reaches its compile stage and waits there, in the controller, its agent not building
        assert wait_until(lambda: f"{waiter} compile" in rig.output(process)[1], 60), rig.output(process)
        assert not rig.marker(waiter).exists()
        assert kill_sshd(rig.fleet, builder)
        for name in ("sim-01", "sim-02"):
            Path(f"{rig.marker(name)}.continue").touch()
        code, devices = rig.finish(process)
    finally:
        rig.stop_all()
    assert code == 1
    assert devices[builder]["ok"] is False and devices[builder]["failed_stage"] == "compile"
    assert devices[waiter]["ok"] is True, devices[waiter]["error"]
    assert set(devices[waiter]["origin"].values()) == {f"compiled (its builder {builder} failed)"}
