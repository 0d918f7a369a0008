"""The proof: the cache files deployer writes are what a real MACE app loads.

A real libmace (built from ../shared/third_party by scripts/build_mace.sh, tests/mace_runtime.py) runs the
project's probe: a small net of MACE ops on MACE's OpenCL runtime, its cache at a path, under a simulated
board's driver configuration (PoCL's pthread or basic device, seen through the OpenCL shim as a PowerVR
GPU). The agent on those boards loads the same shim (inventory `opencl.library`), so both see one device.
What MACE did is read from its own log lines ("Program from Cache: <key>", "... from source: ...").
Skipped with the reason where the MACE sources are absent; DEPLOYER_REQUIRE_MACE=1 (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployer.cache.mace import mace_verdict, parse_cache
from deployer.sim.fleet import Fleet, fleet_specs, set_device
from deployer.tasks.collect import local_folder
from tests.conftest import Cli
from tests.mace_runtime import Mace, ProbeRun, app_with_kernels, built_mace, run_probe

# The first test may build libmace (scripts/check.sh builds it before the suite; a bare pytest run on a fresh
# clone does it here: 13 min on a loaded 2-core machine), past the suite's 300 s per test.
pytestmark = pytest.mark.timeout(1800)

APP_CACHE = "app/mace_cl_compiled_program.bin"
MakeFleet = Callable[..., Fleet]  # conftest's make_fleet, with start_fleet's keywords


@pytest.fixture(scope="module")
def mace() -> Mace:
    return built_mace()


def home(fleet: Fleet, name: str) -> Path:
    return Path(fleet.device(name).folder) / "home"


def app_cache(fleet: Fleet, name: str) -> Path:
    """Where the app keeps its cache on the board (the board's home is this folder on the controller)."""
    path = home(fleet, name) / APP_CACHE
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(path.parent, *_owner(home(fleet, name)))
    return path


def _owner(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_uid, stat.st_gid


def copy(src: Path, dst: Path) -> Path:
    """The probe's own copy: MACE rewrites its cache file whenever it compiled anything."""
    shutil.copyfile(src, dst)
    return dst


def assert_all_from(run: ProbeRun, origin: str, keys: list[str]) -> None:
    assert run.ok, run.log[-3000:]
    others = {o: run.programs(o) for o in ("cache", "precompiled", "source", "cache_failed") if o != origin}
    assert sorted(run.programs(origin)) == sorted(keys), run.log[-3000:]
    assert not any(others.values()), others


def pocl(fleet: Fleet, name: str) -> str:
    return fleet.device(name).spec.pocl_device


def test_the_probe_runs_on_the_real_runtime(mace: Mace, tmp_path: Path) -> None:
    """Cold: every program from source, output right, the file written; then every program from that file.
    Several kinds of op, so programs of one name with different options are among them."""
    cold = run_probe(mace, tmp_path / "cache.bin")
    assert cold.ok and not cold.programs("cache"), cold.log[-3000:]
    keys = cold.programs("source")
    names = [k.split(" ", 1)[0] for k in keys]
    assert {"activation", "eltwise", "buffer_to_image"} <= set(names) and names.count("activation") == 2, keys
    written = parse_cache((tmp_path / "cache.bin").read_bytes())
    assert sorted(written.programs) == sorted(keys) and written.device_name.startswith("PowerVR ")  # type: ignore[union-attr]
    assert_all_from(run_probe(mace, tmp_path / "cache.bin"), "cache", keys)


def collect_app_cache(cli: Cli, fleet: Fleet, cache: Path) -> dict[str, Any]:
    run = cli("collect", "--fleet", fleet.inventory, "--cache", cache, "--json", "--path", f"~/{APP_CACHE}")
    assert run.code == 0, run.out + run.err
    return {d["name"]: d for d in run.json()["devices"]}


def test_collected_and_pushed_caches_are_what_mace_loads(mace: Mace, make_fleet: MakeFleet, cli: Cli,
                                                         tmp_path: Path) -> None:
    """Proof 1 and 2 of issue 17, on a fleet of two fingerprints."""
    fleet = make_fleet(fleet_specs(2, mix=True), opencl_library=str(mace.shim))
    cache = tmp_path / "cache"
    # 1. the app runs cold on sim-01 and writes its cache there; deploy collect pulls it
    cold = run_probe(mace, app_cache(fleet, "sim-01"), pocl_device=pocl(fleet, "sim-01"))
    assert_all_from(cold, "source", cold.programs("source"))
    keys = cold.programs("source")
    collected = collect_app_cache(cli, fleet, cache)
    (found,) = collected["sim-01"]["files"]
    assert found["record"]["verdict"]["mace"] == "warm", found  # the agent sees the device MACE sees
    assert sorted(p["key"] for p in found["record"]["programs"]) == sorted(keys)
    pulled = cache / "sim-01" / "collected" / local_folder(found["remote_path"]) / "content.bin"
    assert pulled.read_bytes() == app_cache(fleet, "sim-01").read_bytes()
    assert_all_from(run_probe(mace, copy(pulled, tmp_path / "pulled.bin"), pocl_device=pocl(fleet, "sim-01")),
                    "cache", keys)
    # 2. deploy builds exactly those programs on both fingerprints; each board's pulled cache loads whole
    run = cli("push", "--fleet", fleet.inventory, "--cache", cache, "--json", "--mace-programs", pulled,
              "--mace-kernels", mace.kernels)
    assert run.code == 0, run.out + run.err
    devices = {d["name"]: d for d in run.json()["devices"]}
    assert len({d["fingerprint"]["id"] for d in devices.values()}) == 2
    for name, device in devices.items():
        assert device["fingerprint"]["device"]["name"].startswith("PowerVR ")
        assert sorted(k["program_key"] for k in device["kernels"]) == sorted(keys)
        assert not any("the name is empty" in w or "GPU devices" in w for w in device["warnings"])
        ours = copy(cache / name / "mace_cl_compiled_program.bin", tmp_path / f"{name}.bin")
        assert_all_from(run_probe(mace, ours, pocl_device=pocl(fleet, name)), "cache", keys)
        # the same file as MACE's read-only precompiled binary (SetOpenCLBinaryPaths), with no cache file
        precompiled = run_probe(mace, tmp_path / f"{name}-empty.bin", pocl_device=pocl(fleet, name),
                                binary=cache / name / "mace_cl_compiled_program.bin")
        assert_all_from(precompiled, "precompiled", keys)
    # 3. a cache built for the other fingerprint: MACE throws it away, every program from source ...
    other = run_probe(mace, copy(cache / "sim-01" / "mace_cl_compiled_program.bin", tmp_path / "other.bin"),
                      pocl_device=pocl(fleet, "sim-02"))
    assert_all_from(other, "source", keys)
    verdict = mace_verdict(parse_cache((cache / "sim-01" / "mace_cl_compiled_program.bin").read_bytes()),
                           devices["sim-02"]["fingerprint"])
    assert not verdict.warm and "device-name entry" in verdict.reason
    # ... and once sim-01's driver is the other one, deploy cache install had already refused the file
    set_device(fleet, "sim-01", driver=pocl(fleet, "sim-02"))
    before = app_cache(fleet, "sim-01").read_bytes()
    run = cli("cache", "install", "--fleet", fleet.inventory, "--cache", cache, "--limit", "sim-01",
              "--to", f"~/{APP_CACHE}")
    assert "skipped" in run.out and "fingerprint changed" in run.out, run.out
    assert app_cache(fleet, "sim-01").read_bytes() == before  # the app's own file stays as it was


def set_env(fleet: Fleet, **env: str) -> None:
    """Add to the inventory's `env:` for every device (the agent, so its fingerprint, sees it)."""
    inventory = yaml.safe_load(fleet.inventory.read_text())
    inventory["defaults"].setdefault("env", {}).update(env)
    fleet.inventory.write_text(yaml.safe_dump(inventory, sort_keys=False))


def test_another_mace_version_verdict_agrees_with_mace(mace: Mace, make_fleet: MakeFleet, cli: Cli,
                                                       tmp_path: Path) -> None:
    """Proof 4: a cache written for another MaceVersion() than the app's. MACE keeps it under REUSE_SAME_GPU
    only when field 2 of the platform entry split on ',' is the platform version, i.e. only when that
    version has no comma (PoCL's has; the shim rewrites it); never under REUSE_NONE. deploy's verdict, asked
    for the app's version and policy, agrees with what MACE did in each of the four cases."""
    fleet = make_fleet(fleet_specs(1), opencl_library=str(mace.shim))
    source = tmp_path / "app.bin"
    cold = run_probe(mace, source)  # the app's programs and its MaceVersion()
    keys, app_version = cold.programs("source"), cold.report["mace_version"]
    seen = {}
    for version in ("", "OpenCL 3.0 PoCL 3.1 (no commas)"):
        shim_env = {"OPENCL_SHIM_PLATFORM_VERSION": version} if version else {}
        set_env(fleet, **shim_env)
        cache = tmp_path / f"cache-{bool(version)}"
        run = cli("push", "--fleet", fleet.inventory, "--cache", cache, "--json", "--mace-programs", source,
                  "--mace-kernels", mace.kernels, "--mace-version", "v1.1.1-0-gdeadbee")
        assert run.code == 0, run.out + run.err
        (device,) = run.json()["devices"]
        platform_version = device["fingerprint"]["platform"]["version"]
        assert ("," in platform_version) == (not version), platform_version
        comma_warning = any("splits the platform entry on ','" in w for w in device["warnings"])
        assert comma_warning == (not version), device["warnings"]
        written = cache / "sim-01" / "mace_cl_compiled_program.bin"
        for policy in ("same", "none"):
            probe = run_probe(mace, copy(written, tmp_path / "probe.bin"), policy=policy, env=shim_env)
            assert probe.ok and not probe.programs("cache_failed"), probe.log[-3000:]
            mace_warm = sorted(probe.programs("cache")) == sorted(keys) and not probe.programs("source")
            mace_cold = sorted(probe.programs("source")) == sorted(keys) and not probe.programs("cache")
            assert mace_warm or mace_cold, probe.report  # MACE keeps or discards the whole file
            verdict = mace_verdict(parse_cache(written.read_bytes()), device["fingerprint"],
                                   mace_version=app_version, policy=policy)
            assert verdict.warm == mace_warm, (version, policy, verdict)
            seen[(bool(version), policy)] = mace_warm
    # what MACE did: only a comma-free platform version under the default policy keeps the file
    assert seen == {(False, "same"): False, (False, "none"): False, (True, "same"): True, (True, "none"): False}


def test_a_changed_kernel_source_rebuilds_that_program_only(mace: Mace, make_fleet: MakeFleet, cli: Cli,
                                                            tmp_path: Path) -> None:
    """Proof 3: the app's libmace is rebuilt with one MACE kernel source changed (eltwise.cl). With the old
    cache MACE rebuilds that program only; deploy refuses the old program list against the new folder
    (hash mismatch), and from the new app's list it rebuilds that one program too; then MACE loads all."""
    fleet = make_fleet(fleet_specs(1), opencl_library=str(mace.shim))
    old_src = tmp_path / "old-app.bin"
    keys = run_probe(mace, old_src).programs("source")
    cache = tmp_path / "cache"
    run = cli("push", "--fleet", fleet.inventory, "--cache", cache, "--json", "--mace-programs", old_src,
              "--mace-kernels", mace.kernels)
    assert run.code == 0, run.out + run.err
    pushed = cache / "sim-01" / "mace_cl_compiled_program.bin"
    changed = tmp_path / "cl"
    shutil.copytree(mace.kernels, changed)
    with open(changed / "eltwise.cl", "a") as source:
        source.write("// a change that only the hash sees\n")
    (eltwise,) = [k for k in keys if k.startswith("eltwise ")]
    new_app = app_with_kernels(mace, changed, tmp_path / "new-probe")
    # MACE: that program from source, the others from the cache deploy wrote
    new_src = copy(pushed, tmp_path / "new-app.bin")
    first = run_probe(new_app, new_src)
    assert first.ok and first.programs("source") == [eltwise], first.report
    assert sorted(first.programs("cache")) == sorted(k for k in keys if k != eltwise)
    # deploy: the old list does not fit the new folder; the new app's list (its rewritten cache) does
    run = cli("push", "--fleet", fleet.inventory, "--cache", cache, "--mace-programs", old_src, "--mace-kernels",
              changed)
    assert run.code == 2 and f"program {eltwise!r}" in " ".join(run.err.split()), run.err
    run = cli("push", "--fleet", fleet.inventory, "--cache", cache, "--json", "--mace-programs", new_src,
              "--mace-kernels", changed)
    assert run.code == 0, run.out + run.err
    (device,) = run.json()["devices"]
    assert device["plan"]["rebuild"] == [eltwise], device["plan"]
    assert_all_from(run_probe(new_app, copy(pushed, tmp_path / "probe.bin")), "cache", keys)


@pytest.mark.parametrize("required", [False, True])
def test_absent_sources_skip_or_fail_under_ci(required: bool, tmp_path: Path) -> None:
    """A clone without ../shared/third_party skips these tests, saying why; DEPLOYER_REQUIRE_MACE=1 (.ci/run)
    turns that into a failure. Run as pytest would in such a clone (its own process, no build folder)."""
    env = {k: v for k, v in os.environ.items() if k != "DEPLOYER_REQUIRE_MACE"}
    env.update(DEPLOYER_MACE_SOURCES=str(tmp_path / "no-third-party"), DEPLOYER_MACE_BUILD=str(tmp_path / "build"))
    if required:
        env["DEPLOYER_REQUIRE_MACE"] = "1"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             f"{__file__}::test_the_probe_runs_on_the_real_runtime"], capture_output=True, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    text = result.stdout + result.stderr
    assert "no MACE sources" in text and "no-third-party" in text, text[-2000:]
    if required:
        assert result.returncode == 1 and "1 error" in text and "DEPLOYER_REQUIRE_MACE=1" in text, text[-2000:]
    else:
        assert result.returncode == 0 and "1 skipped" in text, text[-2000:]
    assert not (tmp_path / "build" / "probe").exists()


def test_a_gpu_mace_cannot_name(mace: Mace, make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    """The warning "MACE clears the cache at every start" on a GPU that is not Adreno, Mali or PowerVR (the
    shim without its name prefix): MACE builds from source at every start, even from its own file, and
    loads deploy's file only as the precompiled binary, as the warning says."""
    unnamed = {"OPENCL_SHIM_NAME_PREFIX": ""}
    fleet = make_fleet(fleet_specs(1), opencl_library=str(mace.shim))
    set_env(fleet, **unnamed)
    own = tmp_path / "own.bin"
    keys = run_probe(mace, own, env=unnamed).programs("source")
    assert_all_from(run_probe(mace, own, env=unnamed), "source", keys)  # its own file, discarded again
    run = cli("push", "--fleet", fleet.inventory, "--cache", tmp_path / "cache", "--json", "--mace-programs", own,
              "--mace-kernels", mace.kernels)
    assert run.code == 0, run.out + run.err
    (device,) = run.json()["devices"]
    gpu = device["fingerprint"]["device"]
    assert gpu["type"] == ["GPU"] and not gpu["name"].startswith("PowerVR")
    assert any("the name is empty, so MACE clears the cache at every start" in w for w in device["warnings"])
    pushed = tmp_path / "cache" / "sim-01" / "mace_cl_compiled_program.bin"
    assert_all_from(run_probe(mace, copy(pushed, tmp_path / "as-cache.bin"), env=unnamed), "source", keys)
    assert_all_from(run_probe(mace, tmp_path / "none.bin", binary=pushed, env=unnamed), "precompiled", keys)
