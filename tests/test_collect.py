"""`deploy collect`, `deploy cache ...` and the legacy container, against real simulated devices.

Hostile files are made real in a device's home (symlinks, odd names, a sparse 2 GiB file, a root-only
file, junk, thousands of files, a file growing while read); the device never writes outside its folder.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from deployer.cache.mace import (
    DEVICE_NAME_KEY,
    PLATFORM_INFO_KEY,
    decode_legacy,
    encode_legacy,
    encode_mace_pb,
    mace_verdict,
    parse_cache,
)
from deployer.config.inventory import load_inventory
from deployer.protocol.ops import Refused, check_found
from deployer.sim.fleet import DeviceSpec, Fleet, fleet_specs
from deployer.tasks.collect import CollectJob, collect_fleet, local_folder
from tests.conftest import KERNELS, REPO, Cli, StageHook
from tests.test_faults import MakeFleet

MACE_FILE = "mace_cl_compiled_program.bin"
SHA = "a" * 64


def home(fleet: Fleet, name: str = "sim-01") -> Path:
    return Path(fleet.device(name).folder) / "home"


def put(path: Path, data: bytes) -> Path:
    """A file in a device's home, as the device's account would own it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    owner = path.parent.parent.stat()
    for made in (path.parent, path):
        os.chown(made, owner.st_uid, owner.st_gid)
    return path


def platform_entry(version: str = "OpenCL 1.2 pocl 1.8") -> bytes:
    return f"Portable Computing Language, FULL_PROFILE, {version}, v1.1.1-0-g8c75d39".encode()


def collect(cli: Cli, fleet: Fleet, cache: Path, *extra: str | Path) -> tuple[int, dict[str, Any]]:
    run = cli("collect", "--fleet", fleet.inventory, "--cache", cache, "--json", *extra)
    assert "Traceback" not in run.err
    return run.code, {d["name"]: d for d in run.json()["devices"]}


def files_by_dir(device: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(f["remote_path"]).parent.name: f for f in device["files"]}


def test_push_install_collect_on_a_mixed_fleet(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet(fleet_specs(2, mix=True))
    cache = tmp_path / "cache"
    assert cli("push", "--fleet", fleet.inventory, "--kernels", KERNELS, "--cache", cache).code == 0
    run = cli("cache", "install", "--fleet", fleet.inventory, "--cache", cache, "--to", f"~/model/{MACE_FILE}")
    assert run.code == 0 and run.out.count("installed") == 2
    installed = home(fleet) / "model" / MACE_FILE
    assert installed.stat().st_nlink == 1 and not installed.is_symlink()  # a copy, never a link
    code, devices = collect(cli, fleet, cache)
    assert code == 0
    fingerprints = {name: d["fingerprint"]["id"] for name, d in devices.items()}
    assert fingerprints["sim-01"] != fingerprints["sim-02"]
    for name, device in devices.items():
        (found,) = device["files"]
        record = found["record"]
        assert found["status"] == "new" and record["format"] == "pb" and record["kind"] == "compiled_programs"
        assert {p["binary_kind"] for p in record["programs"]} == {"poclbin"}
        # PoCL is neither Adreno, Mali nor PowerVR: MACE v1.1 discards the file at every start
        assert record["verdict"]["mace"] == "cold" and record["verdict"]["drift"] is False
        stored = cache / name / "collected" / local_folder(found["remote_path"]) / "content.bin"
        assert stored.read_bytes() == installed.read_bytes() or name != "sim-01"
    code, again = collect(cli, fleet, cache)
    assert [f["status"] for f in again["sim-01"]["files"]] == ["unchanged"]


def test_hostile_files(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01")])
    h = home(fleet)
    valid = encode_mace_pb([(PLATFORM_INFO_KEY, platform_entry()), ("k -DX", b"poclbin\0...")])
    put(h / "ok" / MACE_FILE, valid)
    (h / "link").mkdir()
    (h / "link" / MACE_FILE).symlink_to("/etc/passwd")
    put(h / "odd\nname $(x) ;" / MACE_FILE, valid)
    with open(put(h / "big" / MACE_FILE, b""), "r+b") as big:
        big.truncate(2 << 30)  # sparse: 2 GiB that costs no disk
    put(h / "denied" / MACE_FILE, valid)
    os.chown(h / "denied" / MACE_FILE, 0, 0)
    os.chmod(h / "denied" / MACE_FILE, 0o600)
    put(h / "junk" / MACE_FILE, os.urandom(3000))
    put(h / "legacy" / MACE_FILE, encode_legacy([(PLATFORM_INFO_KEY, platform_entry()), ("k", b"\x7fELF")]))
    cache = tmp_path / "cache"
    code, devices = collect(cli, fleet, cache)
    files = files_by_dir(devices["sim-01"])
    assert code == 1
    assert files["ok"]["status"] == "new"
    assert files["link"]["status"] == "refused" and "symbolic link" in files["link"]["detail"]
    assert files["big"]["status"] == "refused" and "cap" in files["big"]["detail"]
    assert files["denied"]["status"] == "refused" and "Permission denied" in files["denied"]["detail"]
    assert files["junk"]["status"] == "failed" and "not a MACE container" in files["junk"]["detail"]
    assert files["legacy"]["record"]["format"] == "legacy"
    assert files["legacy"]["record"]["programs"] == [{"key": "k", "size": 4, "binary_kind": "ELF"}]
    odd = next(f for f in devices["sim-01"]["files"] if "odd" in f["remote_path"])
    assert odd["status"] == "new" and "\n" not in odd["remote_path"]
    # driver drift: the entry says pocl 1.8, the device runs PoCL 3.1
    verdict = files["ok"]["record"]["verdict"]
    assert verdict["drift"] is True and "pocl 1.8" in verdict["drift_reason"]
    assert verdict["mace"] == "cold"
    # nothing outside <cache>/<device>/, no junk, no temp files, odd names made safe
    written = [p for p in cache.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(cache / "sim-01") or p.name == ".lock" for p in written)
    assert not any(".tmp-" in p.name for p in written)
    assert all(p.name.isprintable() and " " not in p.name for p in (cache / "sim-01" / "collected").iterdir())
    assert len(list((cache / "sim-01" / "collected").iterdir())) == 3  # ok, odd, legacy


@pytest.mark.slow
def test_thousands_of_files_are_bounded(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01")])
    for i in range(1500):
        put(home(fleet) / "many" / f"d{i}" / "mace_run.config", b"\0" * 4)
    code, devices = collect(cli, fleet, tmp_path / "cache", "--max-files", "50")
    device = devices["sim-01"]
    assert device["truncated"] is True and len(device["files"]) == 50


def test_file_growing_while_read(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01")])
    target = put(home(fleet) / "grow" / MACE_FILE, encode_mace_pb([("a", b"xy")]))

    def grow(device: str, stage: str) -> None:
        if stage.startswith("read ") and "grow" in stage:
            with open(target, "ab") as out:
                out.write(b"more bytes written by the app")

    job = CollectJob(cache=tmp_path / "cache")
    (outcome,) = collect_fleet(load_inventory(fleet.inventory).devices, job, forks=1, progress=StageHook(grow)).outcomes
    (found,) = [f for f in outcome.files if "grow" in f.remote_path]
    assert found.status == "failed" and "changed while being read" in (found.detail or "")
    assert not (tmp_path / "cache" / "sim-01" / "collected").exists()


@pytest.mark.parametrize("entry, reason", [
    ({"path": "/home/x/../../etc/shadow", "kind": "file", "size": 4, "sha256": SHA}, "'..'"),
    ({"path": "relative/x", "kind": "file", "size": 4, "sha256": SHA}, "absolute"),
    ({"path": "/a/./b", "kind": "file", "size": 4, "sha256": SHA}, "normalised"),
    ({"path": "/a/b", "kind": "file", "size": 2**40, "sha256": SHA}, "refused before pulling"),
    ({"path": "/a/b", "kind": "file", "size": -1, "sha256": SHA}, "outside"),
    ({"path": "/a/b", "kind": "file", "size": 4, "sha256": "zz"}, "sha256"),
    ({"path": "/a/b", "kind": "symlink", "error": "a symbolic link (to /etc)"}, "symbolic link"),
    (["not", "a", "mapping"], "malformed"),
])
def test_device_sent_entries_are_checked(entry: Any, reason: str) -> None:
    """What a compromised agent could send (no real file produces it): refused, never followed."""
    result = check_found(entry, 1 << 20)
    assert isinstance(result, Refused) and reason in result.why


def test_legacy_push_and_container(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01")])
    run = cli("push", "--fleet", fleet.inventory, "--kernels", KERNELS, "--cache", tmp_path / "c",
              "--mace-format", "legacy", "--json")
    assert run.code == 0, run.json()["devices"][0]["error"]
    data = (tmp_path / "c" / "sim-01" / MACE_FILE).read_bytes()
    keys = [k for k, _ in decode_legacy(data)]
    assert PLATFORM_INFO_KEY in keys and DEVICE_NAME_KEY not in keys
    assert not any(k.startswith("program_hash_") for k in keys)
    cache = parse_cache(data)
    assert cache.format == "legacy" and "saxpy -DDATA_TYPE=float" in cache.programs


def test_legacy_golden_bytes() -> None:
    assert encode_legacy([("a", b"xy")]) == bytes.fromhex("0100000000000000" "01000000" "61" "02000000" "7879")
    assert decode_legacy(encode_legacy([])) == []


def test_verdict_rules() -> None:
    fingerprint = {"platform": {"name": "ARM Platform", "profile": "FULL_PROFILE", "version": "OpenCL 2.1 v1.r34p0"},
                   "device": {"name": "Mali-G610", "version": "OpenCL 2.1 v1.r34p0"}}
    entry = b"ARM Platform, FULL_PROFILE, OpenCL 2.1 v1.r34p0, v1.1.1-0-g8c75d39"
    good = [(PLATFORM_INFO_KEY, entry), (DEVICE_NAME_KEY, b"Mali-G610"), ("p", b"x"), ("program_hash_ p", b"0" * 10)]
    assert mace_verdict(parse_cache(encode_mace_pb(good)), fingerprint).warm
    updated = dict(fingerprint, platform=dict(fingerprint["platform"], version="OpenCL 2.1 v1.r40p0"))
    stale = mace_verdict(parse_cache(encode_mace_pb(good)), updated)
    assert not stale.warm and stale.drift and "r34p0" in stale.drift_reason
    other_gpu = mace_verdict(parse_cache(encode_mace_pb(good)), dict(fingerprint, device={"name": "Mali-G52"}))
    assert not other_gpu.warm and "device-name" in other_gpu.reason
    no_platform = mace_verdict(parse_cache(encode_mace_pb([("p", b"x")])), fingerprint)
    assert no_platform.warm and "without any check" in no_platform.reason


def test_cache_commands(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet(fleet_specs(3, mix=True))
    cache = tmp_path / "cache"
    assert cli("push", "--fleet", fleet.inventory, "--kernels", KERNELS, "--cache", cache).code == 0
    put(home(fleet, "sim-02") / "app" / MACE_FILE, encode_mace_pb([(PLATFORM_INFO_KEY, platform_entry()), ("k", b"x")]))
    assert collect(cli, fleet, cache)[0] == 0
    rows = cli("cache", "ls", "--cache", cache, "--json").json()["devices"]
    assert [r["name"] for r in rows] == ["sim-01", "sim-02", "sim-03"] and rows[1]["collected"] == 1
    assert len({r["fingerprint_id"] for r in rows}) == 2
    shown = json.loads(cli("cache", "show", "sim-02", "--cache", cache).out)
    assert shown["fingerprint_history"][0]["id"] == rows[1]["fingerprint_id"]
    assert cli("cache", "verify", "--cache", cache).code == 0
    exported = cli("cache", "export", "--cache", cache, "--device", "sim-01", "--to", tmp_path / "app.bin")
    assert exported.code == 0
    assert (tmp_path / "app.bin").read_bytes() == (cache / "sim-01" / MACE_FILE).read_bytes()
    legacy = cli("cache", "export", "--cache", cache, "--device", "sim-01", "--to", tmp_path / "v10.bin",
                 "--mace-format", "legacy")
    assert legacy.code == 0
    converted = parse_cache((tmp_path / "v10.bin").read_bytes())
    assert converted.format == "legacy" and converted.programs == parse_cache(exported_bytes(cache)).programs
    assert converted.device_name is None and converted.hashes == {}
    with open(cache / "sim-02" / "fingerprints.jsonl", "a") as history:  # an id written before ids were checked
        history.write(json.dumps({"seen_at": 1.0, "id": "../../x\u001b[2J", "fingerprint": {}}) + "\n")
    out = tmp_path / "tarballs"
    out.mkdir()
    assert cli("cache", "export", "--cache", cache, "--tarballs", "--to", out).code == 0
    assert "\x1b" not in cli("cache", "ls", "--cache", cache).out
    tarballs = sorted(out.glob("*.tar.gz"))
    assert len(tarballs) == 2  # one per fingerprint: sim-01 and sim-03 share one
    with tarfile.open(next(t for t in tarballs if "pthread" in t.name)) as tar:
        mapping = json.loads(tar.extractfile("devices.json").read())  # type: ignore[union-attr]
        assert sorted(mapping) == ["sim-01", "sim-03"]
    # tampering is found; stale collected files can be pruned
    content = next((cache / "sim-02" / "collected").iterdir()) / "content.bin"
    content.write_bytes(content.read_bytes()[:-1] + b"\0")
    verify = cli("cache", "verify", "--cache", cache)
    assert verify.code == 1 and "does not match its record" in verify.out
    pruned = cli("cache", "prune", "--cache", cache, "--stale")
    assert pruned.code == 0 and "1 collected file(s) removed" in pruned.out
    assert cli("cache", "verify", "--cache", cache).code == 0


def exported_bytes(cache: Path) -> bytes:
    return (cache / "sim-01" / MACE_FILE).read_bytes()


def test_a_second_run_on_the_same_cache_is_refused(fleet: Fleet, cli: Cli, tmp_path: Path) -> None:
    from deployer.cache.store import cache_lock

    cache = tmp_path / "cache"
    with cache_lock(cache):
        run = cli("collect", "--fleet", fleet.inventory, "--cache", cache, "--limit", "sim-01")
    assert run.code == 3 and "in use by another deploy run" in run.err
    assert [p.name for p in cache.iterdir()] == [".lock"]


def test_install_skips_a_device_whose_driver_changed(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01")])
    cache = tmp_path / "cache"
    assert cli("push", "--fleet", fleet.inventory, "--kernels", KERNELS, "--cache", cache).code == 0
    history = cache / "sim-01" / "fingerprints.jsonl"
    entry = json.loads(history.read_text().splitlines()[-1])
    history.write_text(json.dumps(dict(entry, id="0123456789abcdef")) + "\n")
    run = cli("cache", "install", "--fleet", fleet.inventory, "--cache", cache, "--to", f"~/m/{MACE_FILE}")
    assert "skipped" in run.out and "fingerprint changed" in run.out
    assert not (home(fleet) / "m").exists()


def _documented(command: str) -> dict[str, Any]:
    """The example document of `deploy <command> --json` in docs/json.md."""
    text = (REPO / "docs" / "json.md").read_text()
    section = text.split(f"## `deploy {command} --json`", 1)[1]
    example: dict[str, Any] = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    return example


def _same_shape(real: dict[str, Any], documented: dict[str, Any], where: str) -> None:
    """The same keys, and the same keys again in every nested object both have (first list items); the
    fingerprint, a verdict, the stages that ran and the programs' origins vary by device and run, and are
    documented in prose."""
    assert set(real) == set(documented), (where, set(real) ^ set(documented))
    for key, value in documented.items():
        if isinstance(value, dict) and isinstance(real[key], dict) and key not in ("fingerprint", "verdict", "stages",
                                                                                    "origin"):
            _same_shape(real[key], value, f"{where}.{key}")
        if isinstance(value, list) and value and isinstance(value[0], dict) and real[key]:
            _same_shape(real[key][0], value[0], f"{where}.{key}[]")


def test_the_json_of_push_collect_rollback_install_and_sim_status_is_the_documented_one(
        make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    """docs/json.md documents each command's document; the real ones have exactly those fields."""
    from tests.test_faults import _saxpy_only

    fleet = make_fleet([DeviceSpec("sim-01")])
    cache = tmp_path / "cache"
    for version in ("v1", "v2"):
        assert cli("push", "--fleet", fleet.inventory, "--kernels", _saxpy_only(tmp_path, version), "--cache",
                   cache, "-q").code == 0
    put(home(fleet) / "app" / MACE_FILE, encode_mace_pb([(PLATFORM_INFO_KEY, platform_entry()), ("k", b"x")]))
    documents = {
        "push": cli("push", "--fleet", fleet.inventory, "--kernels", _saxpy_only(tmp_path, "v3"), "--cache", cache,
                    "--json"),
        "collect": cli("collect", "--fleet", fleet.inventory, "--cache", cache, "--json"),
        "cache install": cli("cache", "install", "--fleet", fleet.inventory, "--cache", cache, "--to",
                             "~/app/installed.bin", "--json"),
        "rollback": cli("rollback", "--fleet", fleet.inventory, "--cache", cache, "--json"),
        "sim status": cli("sim", "status", "--dir", fleet.folder, "--json"),
    }
    for command, run in documents.items():
        assert run.code == 0, (command, run.err)
        _same_shape(run.json(), _documented(command), command)
    assert documents["collect"].json()["devices"][0]["files"], "the collect document has a file record"
