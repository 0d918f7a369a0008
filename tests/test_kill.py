"""The commit rule under kills (docs/design.md, section 12): the controller SIGKILLed at each named phase and at
seeded random moments, two pushes at once, a device's sshd killed mid-run, a read-only remote dir.

Everything is real: `deploy push` runs as its own process (in its own process group, killed with SIGKILL), the
test-only phase hook (`DEPLOYER_TEST_PHASE_HOOK`) proves each phase was reached and pauses there, the devices are
sshd servers of `deployer.sim`. After every kill the test waits (bounded) until the device's agent has ended, then
checks: `current` is the old or the new release exactly as the rule says, every file under it matches the
release's index, no temp file or uncommitted release is left, the local cache file is the old or the new one
whole, and the next push completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deployer.sim.fleet import SIM_HOME, DeviceSpec, Fleet, namespace_pids, start_fleet
from tests.conftest import REPO, Cli
from tests.hooks.sitecustomize import ENV as PHASE_HOOK_ENV
from tests.test_faults import _saxpy_only, device_entry, edit_inventory
from tests.test_rollout import _namespace_processes

MakeFleet = Callable[..., Fleet]
HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py there installs the phase observer (PYTHONPATH)

AGENT_PHASES = ("rename", "commit", "fsync", "switch", "prune")
CONTROLLER_PHASES = ("plan", "upload", "local-cache rename")
# The commit rule (docs/design.md, section 12): what a controller killed at each phase leaves. Before the
# agent has read `commit`, `current` stays old (the agent sees its input end and deletes the release it
# began); once it has read it, the commit completes (stop signals wait until it is done): `current` is new.
# The local cache is written only after the commit reply: it stays old in every case.
EXPECTED = {"plan": "old", "upload": "old", "rename": "old", "commit": "new", "fsync": "new", "switch": "new",
            "prune": "new", "local-cache rename": "new"}
WAIT_S = 40.0  # every wait below is bounded by this (the hook's own pause is 30 s)


def wait_until(check: Callable[[], bool], seconds: float = WAIT_S, step: float = 0.02) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return check()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Rig:
    """One device of the test's own, a local cache, and the libraries pushed to it."""

    fleet: Fleet
    tmp: Path
    name: str = "sim-01"
    libraries: int = 0
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def cache(self) -> Path:
        return self.tmp / "cache"

    def remote(self, name: str | None = None) -> Path:
        return Path(self.fleet.device(name or self.name).folder) / "home" / ".deployer"

    def marker(self, name: str | None = None) -> Path:
        """The hook's marker file as this test sees it; the device sees it as /home/deploysim/phase-marker."""
        return Path(self.fleet.device(name or self.name).folder) / "home" / "phase-marker"

    def library(self) -> Path:
        """A new one-program library (quick to build): each push of one makes a new release."""
        self.libraries += 1
        return _saxpy_only(self.tmp, f"v{self.libraries}")

    def hooked_inventory(self, phase: str, names: Sequence[str] | None = None) -> Path:
        """The fleet's inventory with the agent-side hook installed: the devices' `python` is a wrapper that
        starts python3 with the hook on its PYTHONPATH (it must be there when the interpreter starts; the
        inventory's `env:` only reaches the agent after its hello)."""
        for name in names or [self.name]:
            self.marker(name).unlink(missing_ok=True)
            Path(f"{self.marker(name)}.continue").unlink(missing_ok=True)

            hooks = self.marker(name).parent / "hooks"  # the device sees it as /home/deploysim/hooks
            hooks.mkdir(exist_ok=True)
            shutil.copy(HOOKS / "sitecustomize.py", hooks / "sitecustomize.py")
            wrapper = self.marker(name).parent / "hooked-python"
            hook = shlex.quote(f"{phase}:{SIM_HOME / 'phase-marker'}")
            wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={SIM_HOME / 'hooks'} {PHASE_HOOK_ENV}={hook} "
                               f"exec python3 \"$@\"\n")
            wrapper.chmod(0o755)

        def change(doc: dict[str, Any]) -> None:
            for name in names or [self.name]:
                device_entry(doc, name)["python"] = str(SIM_HOME / "hooked-python")
        return edit_inventory(self.fleet, change)

    def start(self, library: Path, *, inventory: Path | None = None, cache: Path | None = None, hook: str | None = None,
              marker: Path | None = None, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """`deploy push --json` as a process of its own (its own session, so its whole group can be killed);
        `hook`: the controller-side phase to pause at."""
        env = {**os.environ, "PYTHONPATH": f"{REPO}:{HOOKS}"}
        env.pop(PHASE_HOOK_ENV, None)
        if hook is not None:
            assert marker is not None
            marker.unlink(missing_ok=True)
            env[PHASE_HOOK_ENV] = f"{hook}:{marker}"
        tag = len(self.runs)
        argv = [sys.executable, "-m", "deployer", "push", "--fleet", str(inventory or self.fleet.inventory),
                "--kernels", str(library), "--cache", str(cache or self.cache), "--json", *extra]
        with open(self.tmp / f"run{tag}.out", "wb") as out, open(self.tmp / f"run{tag}.err", "wb") as err:
            process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)
        self.runs.append(process)
        return process

    def output(self, process: subprocess.Popen[bytes]) -> tuple[str, str]:
        tag = self.runs.index(process)
        return (self.tmp / f"run{tag}.out").read_text(), (self.tmp / f"run{tag}.err").read_text()

    def finish(self, process: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, dict[str, Any]]:
        """Wait for a push process; its exit code and its devices by name (no traceback allowed)."""
        code = process.wait(timeout=timeout)
        out, err = self.output(process)
        assert "Traceback" not in err and out.startswith("{"), (code, out[-2000:], err[-2000:])
        return code, {d["name"]: d for d in json.loads(out)["devices"]}

    def stop_all(self) -> None:
        for process in self.runs:
            if process.poll() is None:
                kill_group(process)

    def agent_gone(self, name: str | None = None) -> bool:
        return not _namespace_processes(self.fleet.device(name or self.name).pid, b"/.deployer")


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the controller and everything in its process group (it leads its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture
def rig(make_fleet: MakeFleet, tmp_path: Path) -> Any:
    made = Rig(make_fleet([DeviceSpec("sim-01")]), tmp_path)
    yield made
    made.stop_all()


def marked(marker: Path, phase: str) -> bool:
    try:
        return phase in marker.read_text().splitlines()
    except OSError:
        return False


# --- what a device and a local cache must look like after anything ------------------------------------------


def releases(remote: Path) -> set[str]:
    folder = remote / "releases"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def current(remote: Path) -> str | None:
    try:
        target = os.readlink(remote / "current")
    except FileNotFoundError:
        return None
    assert target.startswith("releases/"), target
    return target.removeprefix("releases/")


def check_device(remote: Path, *, settled: bool = True) -> str | None:
    """Nothing partial on the device: every file under `current` matches its release's index (size and
    sha256), the build's cache file matches its manifest; once no session runs (`settled`), also: every
    release left was committed (has its index), no temp file anywhere under the remote dir. Returns the
    current release id."""
    if settled:
        leftovers = [str(p) for p in remote.rglob("*") if ".tmp-" in p.name]
        assert leftovers == [], leftovers
        uncommitted = [r for r in releases(remote) if not (remote / "releases" / r / "release.json").is_file()]
        assert uncommitted == [], uncommitted
    now = current(remote)
    if now is None:
        return None
    release = remote / "releases" / now
    assert release.is_dir(), f"current points at a missing release {now}"
    index = json.loads((release / "release.json").read_text())
    assert index["release"] == now
    for path, record in index["files"].items():
        data = (release / path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record["size"], record["sha256"]), path
    on_disk = {str(p.relative_to(release)) for p in release.rglob("*") if p.is_file()}
    unindexed = {p for p in on_disk - set(index["files"]) if p != "release.json" and not p.startswith("build/")}
    assert unindexed == set(), unindexed
    manifest = json.loads((release / "build" / "manifest.json").read_text())
    assert sha256(release / "build" / "mace_cl_compiled_program.bin") == manifest["cache_sha256"]
    return now


def device_cache_sha(remote: Path) -> str | None:
    now = current(remote)
    return sha256(remote / "releases" / now / "build" / "mace_cl_compiled_program.bin") if now else None


def local_cache_sha(cache: Path, name: str) -> str | None:
    """The local cache file's sha256 (None if absent), after checking it is whole: it equals the sha256 its
    manifest names, and no temp file shows under a real name."""
    folder = cache / name
    if not folder.is_dir():
        return None
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name and not p.name.startswith(".")] == []
    path = folder / "mace_cl_compiled_program.bin"
    if not path.exists():
        return None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sha256(path) == manifest["cache_sha256"]
    return sha256(path)


def settled(rig: Rig, name: str | None = None) -> None:
    """Bounded wait until the device's agent (and its OpenCL children) have ended."""
    assert wait_until(lambda: rig.agent_gone(name)), "the agent is still running"


def push_in_process(cli: Cli, rig: Rig, library: Path, *extra: str | Path) -> dict[str, Any]:
    run = cli("push", "--fleet", rig.fleet.inventory, "--kernels", library, "--cache", rig.cache, "--json", *extra)
    assert run.code == 0 and "Traceback" not in run.err, (run.code, run.out[-2000:], run.err[-2000:])
    device: dict[str, Any] = run.json()["devices"][0]
    return device


# --- the controller killed at each named phase --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["plan", "upload", "rename", "commit", "fsync", "switch", "prune",
                                   "local-cache rename"])
def test_controller_killed_at_phase(rig: Rig, cli: Cli, phase: str) -> None:
    remote = rig.remote()
    old = push_in_process(cli, rig, rig.library(), "--smoke", "never")["release"]
    old_local = local_cache_sha(rig.cache, rig.name)
    assert old_local == device_cache_sha(remote) and check_device(remote) == old

    library = rig.library()
    if phase in AGENT_PHASES:
        process = rig.start(library, inventory=rig.hooked_inventory(phase), extra=["--keep", "1"])
        marker = rig.marker()
    else:
        marker = rig.tmp / "phase-marker"
        process = rig.start(library, hook=phase, marker=marker, extra=["--keep", "1"])
    reached = wait_until(lambda: marked(marker, phase) or process.poll() is not None, 60)
    assert reached and marked(marker, phase), (process.poll(), rig.output(process))
    kill_group(process)
    settled(rig)

    now = check_device(remote)
    assert now is not None
    if EXPECTED[phase] == "old":
        assert now == old and releases(remote) == {old}  # the begun release was deleted
    else:
        assert now != old and releases(remote) == {now}  # --keep 1: the old one was pruned
    local = local_cache_sha(rig.cache, rig.name)
    assert local == old_local  # the local cache is written after the commit reply only: still the old file
    if phase == "local-cache rename":
        leftovers = [p.name for p in (rig.cache / rig.name).iterdir() if ".tmp-" in p.name]
        assert leftovers == [f".mace_cl_compiled_program.bin.tmp-{process.pid}"]  # SIGKILL: never renamed

    again = push_in_process(cli, rig, library)  # the next push, without the hook, completes
    assert check_device(remote) == again["release"]
    if EXPECTED[phase] == "new":
        assert again["release"] == now and not again["changed"]  # nothing left to do on the device...
    assert local_cache_sha(rig.cache, rig.name) == device_cache_sha(remote)  # ...and the cache follows it
    assert [p.name for p in (rig.cache / rig.name).iterdir() if ".tmp-" in p.name] == []


def heavy_library(folder: Path, variants: int = 40) -> Path:
    """A library that takes a while to build (~1 s a variant on these cores), never in a shared PoCL cache."""
    folder.mkdir()
    body = "".join(f"  a = a * {1 + i * 1e-6:.7f}f + sin(a * {i % 7 + 1}.0f);\n" for i in range(200))
    (folder / "heavy.cl").write_text(f"/* {folder} {time.time_ns()} */\n__kernel void heavy(__global float *x) {{\n"
                                     f"  float a = x[get_global_id(0)];\n{body}  x[get_global_id(0)] = a;\n}}\n")
    lines = ["seed: 1", "programs:", "  heavy:", "    source: heavy.cl", "    variants:"]
    lines += [f"      v{i}: {{dtype: float32, options: [-DV={i}]}}" for i in range(variants)]
    lines += ["    kernels:", "      - entry: heavy", "        sizes: {n: 64}", "        global: [n]", "        args:",
              "          - {out: x, shape: [n]}"]
    (folder / "kernels.yml").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow
def test_a_controller_killed_mid_compile_leaves_the_device_free_at_once(rig: Rig, cli: Cli) -> None:
    """The agent watches its input during an OpenCL step: when sshd closes the dead controller's channel it
    kills the compile, drops the release and the lock, so an immediate re-run is not refused as `locked`
    (it was, for as long as the orphaned build went on)."""
    process = rig.start(heavy_library(rig.tmp / "heavy"), extra=["--smoke", "never"])
    assert wait_until(lambda: "sim-01 compile" in rig.output(process)[1] or process.poll() is not None, 60)
    time.sleep(1.5)  # well inside the compile (40 variants)
    assert process.poll() is None, rig.output(process)
    kill_group(process)
    start = time.monotonic()
    assert wait_until(rig.agent_gone, 20)
    assert time.monotonic() - start < 5.0, time.monotonic() - start
    assert check_device(rig.remote()) is None  # nothing was committed, nothing is left
    device = push_in_process(cli, rig, rig.library())  # at once: the lock is free
    assert device["ok"] and check_device(rig.remote()) == device["release"]


@pytest.mark.slow
def test_ctrl_c_mid_compile_stops_the_push_and_keeps_the_old_release(rig: Rig, cli: Cli) -> None:
    """Ctrl-C (SIGINT to the controller's process group, as a terminal sends it): the run ends within a few
    seconds (it used to wait for every device to finish and commit), prints what each device did, exits 130;
    the device keeps its previous release and the next push is not refused."""
    old = push_in_process(cli, rig, rig.library(), "--smoke", "never")["release"]
    process = rig.start(heavy_library(rig.tmp / "heavy"), extra=["--smoke", "never"])
    assert wait_until(lambda: "sim-01 compile" in rig.output(process)[1] or process.poll() is not None, 60)
    time.sleep(1.0)
    assert process.poll() is None, rig.output(process)
    os.killpg(process.pid, signal.SIGINT)
    start = time.monotonic()
    code = process.wait(timeout=30)
    assert time.monotonic() - start < 5.0, time.monotonic() - start
    out, text = rig.output(process)
    assert code == 130 and "deploy: interrupted" in text and "Traceback" not in text, (code, text[-2000:])
    report = json.loads(out)
    assert report["interrupted"] is True and report["ok"] is False
    assert report["devices"][0]["error"].startswith("compile: interrupted (Ctrl-C)"), report["devices"][0]
    settled(rig)
    assert check_device(rig.remote()) == old  # the begun release was dropped
    last = json.loads((rig.cache / "last-run.json").read_text())
    assert last["devices"]["sim-01"]["ok"] is False  # @failed picks it up
    again = push_in_process(cli, rig, rig.library(), "--smoke", "never")
    assert check_device(rig.remote()) == again["release"] != old


def test_first_push_killed_leaves_nothing(rig: Rig, cli: Cli) -> None:
    """Killed before any commit on a device never pushed: no `current`, no release, and the next push works."""
    process = rig.start(rig.library(), inventory=rig.hooked_inventory("rename"))
    assert wait_until(lambda: marked(rig.marker(), "rename") or process.poll() is not None, 60)
    assert marked(rig.marker(), "rename"), rig.output(process)
    kill_group(process)
    settled(rig)
    remote = rig.remote()
    assert check_device(remote) is None and releases(remote) == set()
    assert local_cache_sha(rig.cache, rig.name) is None
    again = push_in_process(cli, rig, rig.library())
    assert check_device(remote) == again["release"]
    assert local_cache_sha(rig.cache, rig.name) == device_cache_sha(remote)


# --- the controller killed at 20 seeded random moments ------------------------------------------------------


@pytest.mark.slow
def test_controller_killed_at_random_moments(rig: Rig, cli: Cli) -> None:
    remote = rig.remote()
    start = time.monotonic()
    code, devices = rig.finish(rig.start(rig.library()))
    duration = time.monotonic() - start  # one whole push, process start to exit
    assert code == 0, devices
    rng = random.Random(20240605)
    moments = []
    for _ in range(12):  # random moments; each named phase has its own test above
        before, before_local, kept = check_device(remote), local_cache_sha(rig.cache, rig.name), releases(remote)
        library = rig.library()
        at = rng.uniform(0, 1.2 * duration)
        process = rig.start(library)
        time.sleep(at)
        finished = process.poll() is not None
        kill_group(process)
        settled(rig)
        moments.append((round(at, 2), finished))
        now = check_device(remote)  # nothing partial, whatever the moment
        assert now is not None and (now == before or now not in kept), (at, now, before)  # old or new
        if finished:
            assert now != before  # the push ended before the kill: committed
        assert local_cache_sha(rig.cache, rig.name) in (before_local, device_cache_sha(remote)), at
        again = push_in_process(cli, rig, library, "--smoke", "never")  # the next push completes (quicker without
        assert check_device(remote) == again["release"]                 # the smoke, which the kills did cover)
        assert local_cache_sha(rig.cache, rig.name) == device_cache_sha(remote)
    assert any(not f for _, f in moments), moments  # most kills land mid-push, not after it


# --- two pushes at once -------------------------------------------------------------------------------------


def test_second_push_on_the_same_cache_is_refused_at_once(rig: Rig) -> None:
    """One controller, one cache: while a push holds the cache lock (paused after its first put), a second
    push exits 3 at once with the lock message and touches no device; the first then completes."""
    marker = rig.tmp / "phase-marker"
    first = rig.start(rig.library(), hook="upload", marker=marker)
    assert wait_until(lambda: marked(marker, "upload") or first.poll() is not None, 60), rig.output(first)
    start = time.monotonic()
    second = rig.start(rig.library())
    assert second.wait(timeout=30) == 3
    assert time.monotonic() - start < 10
    out, err = rig.output(second)
    assert f"is in use by another deploy run (pid {first.pid})" in " ".join(err.split()), err
    assert "Traceback" not in err and out == ""
    Path(f"{marker}.continue").touch()
    code, devices = rig.finish(first)
    assert code == 0 and check_device(rig.remote()) == devices[rig.name]["release"]


def _holding(rig: Rig, process: subprocess.Popen[bytes], marker: Path, phase: str) -> None:
    assert wait_until(lambda: marked(marker, phase) or process.poll() is not None, 60), rig.output(process)
    assert marked(marker, phase), rig.output(process)


def test_two_controllers_one_holds_the_device_lock(rig: Rig, cli: Cli) -> None:
    """Two controllers (two caches), one device. A has sent `commit` and its agent is held there (the device
    lock taken); B planned on the old `current` and is held before `begin`; C starts meanwhile. C is refused
    with `locked`; once A has committed, B's `begin` finds its base moved and is refused with `moved`. Nothing
    partial at any point; B's next run completes on top of A's release."""
    remote = rig.remote()
    old = push_in_process(cli, rig, rig.library())["release"]
    a = rig.start(rig.library(), inventory=rig.hooked_inventory("commit"), cache=rig.tmp / "cache-a")
    _holding(rig, a, rig.marker(), "commit")
    b_marker = rig.tmp / "b-marker"
    b_library = rig.library()
    b = rig.start(b_library, cache=rig.tmp / "cache-b", hook="plan", marker=b_marker)
    _holding(rig, b, b_marker, "plan")
    code, devices = rig.finish(rig.start(rig.library(), cache=rig.tmp / "cache-c"))
    c = devices[rig.name]
    assert code == 1 and c["failed_stage"] == "upload" and "[locked]" in c["error"], c
    assert "another deploy is writing this device" in c["error"]
    assert check_device(remote, settled=False) == old  # A's release is begun, not committed: `current` is old

    Path(f"{rig.marker()}.continue").touch()  # A's agent goes on: the commit completes
    code, devices = rig.finish(a)
    new = devices[rig.name]["release"]
    assert code == 0 and new != old and check_device(remote) == new
    Path(f"{b_marker}.continue").touch()  # B goes on to `begin`, with a base that is no longer current
    code, devices = rig.finish(b)
    moved = devices[rig.name]
    assert code == 1 and moved["failed_stage"] == "upload" and "[moved]" in moved["error"], moved
    assert f"current is {new}, not {old} as planned" in moved["error"]
    assert check_device(remote) == new and releases(remote) == {old, new}

    again = rig.finish(rig.start(b_library, cache=rig.tmp / "cache-b"))[1][rig.name]
    assert again["ok"] and check_device(remote) == again["release"] != new
    assert local_cache_sha(rig.tmp / "cache-b", rig.name) == device_cache_sha(remote)


@pytest.mark.slow
def test_two_controllers_started_together(make_fleet: MakeFleet, tmp_path: Path) -> None:
    """Two controllers, two caches, two devices, started at the same moment: both finish; on each device
    `current` is the release of a push that passed there, fully committed; a loser is refused as `locked` or
    `moved`, never left half-written."""
    rig = Rig(make_fleet([DeviceSpec("sim-01"), DeviceSpec("sim-02")]), tmp_path)
    try:
        a = rig.start(rig.library(), cache=tmp_path / "cache-a")
        b = rig.start(rig.library(), cache=tmp_path / "cache-b")
        results = [rig.finish(a), rig.finish(b)]
    finally:
        rig.stop_all()
    for name in ("sim-01", "sim-02"):
        settled(rig, name)
        now = check_device(rig.remote(name))
        passed = [devices[name]["release"] for _, devices in results if devices[name]["ok"]]
        assert now in passed, (name, now, results)
        for _, devices in results:
            if not devices[name]["ok"]:
                assert "[locked]" in devices[name]["error"] or "[moved]" in devices[name]["error"], devices[name]


# --- one device's sshd killed mid-run ----------------------------------------------------------------------


def kill_sshd(fleet: Fleet, name: str) -> list[int]:
    """SIGKILL every sshd process of the device (its listener and each connection's), as a crash would; the
    commands they ran are left to notice on their own."""
    killed = []
    for pid in namespace_pids(fleet.device(name).pid):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (OSError, ProcessLookupError):
            continue
    return killed


@pytest.mark.slow
def test_sshd_killed_during_compile(make_fleet: MakeFleet, tmp_path: Path, cli: Cli, pocl_cache: Path) -> None:
    specs = [DeviceSpec("sim-01"), DeviceSpec("sim-02")]
    rig = Rig(make_fleet(specs), tmp_path)
    agent_pids: list[int] = []
    try:
        library = rig.library()
        process = rig.start(library, extra=["--smoke", "never"])
        assert wait_until(lambda: "sim-01 compile" in rig.output(process)[1] or process.poll() is not None, 60)
        assert process.poll() is None, rig.output(process)
        agent_pids = [p for p in namespace_pids(rig.fleet.device("sim-01").pid)
                      if b"/.deployer" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert kill_sshd(rig.fleet, "sim-01")
        code, devices = rig.finish(process)
    finally:
        rig.stop_all()
    assert code == 1 and devices["sim-02"]["ok"] is True
    lost = devices["sim-01"]
    assert lost["ok"] is False and lost["failed_stage"] == "compile", lost
    assert lost["error"].startswith("compile: device 'sim-01': connection lost while"), lost["error"]
    assert "()" not in lost["error"]
    # the agent outlives its sshd, finds its input gone when its build ends, and drops the release it began
    assert agent_pids and wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in agent_pids))
    remote = rig.remote("sim-01")
    assert check_device(remote) is None and releases(remote) == set()

    # restart the device: the same folder (homes and host keys kept), new servers; the next push completes
    rig.fleet = start_fleet(rig.fleet.folder, specs, pocl_cache=pocl_cache)
    run = cli("push", "--fleet", rig.fleet.inventory, "--kernels", library, "--cache", rig.cache, "--json",
              "--smoke", "never")
    assert run.code == 0, run.out[-2000:]
    devices = {d["name"]: d for d in run.json()["devices"]}
    assert check_device(remote) == devices["sim-01"]["release"]
    assert not devices["sim-02"]["changed"]  # it already had this release


# --- a read-only remote dir ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_read_only_remote_dir(make_fleet: MakeFleet, tmp_path: Path, cli: Cli, pocl_cache: Path) -> None:
    """The remote dir is a read-only bind mount: on a board never pushed the bootstrap cannot create it; on one
    pushed before (remounted read-only since) `begin` cannot take the lock. Each fails only its device, with
    an `io` error naming the path; the other device passes."""
    rig = Rig(make_fleet([DeviceSpec("sim-01", read_only=True), DeviceSpec("sim-02")]), tmp_path)
    run = cli("push", "--fleet", rig.fleet.inventory, "--kernels", rig.library(), "--cache", rig.cache, "--json")
    devices = {d["name"]: d for d in run.json()["devices"]}
    assert run.code == 1 and devices["sim-02"]["ok"] is True and "Traceback" not in run.err
    fresh = devices["sim-01"]
    assert fresh["failed_stage"] == "connect", fresh
    assert fresh["error"] == ("connect: cannot create the remote dir ~/.deployer: mkdir: cannot create directory "
                              "'/home/deploysim/.deployer/agent': Read-only file system [io]")

    specs = [DeviceSpec("sim-01"), DeviceSpec("sim-02")]
    rig.fleet = start_fleet(rig.fleet.folder, specs, pocl_cache=pocl_cache)  # writable again: one push lands
    assert cli("push", "--fleet", rig.fleet.inventory, "--kernels", rig.library(), "--cache", rig.cache).code == 0
    deployed = check_device(rig.remote())
    rig.fleet = start_fleet(rig.fleet.folder, [DeviceSpec("sim-01", read_only=True), specs[1]], pocl_cache=pocl_cache)
    run = cli("push", "--fleet", rig.fleet.inventory, "--kernels", rig.library(), "--cache", rig.cache, "--json")
    devices = {d["name"]: d for d in run.json()["devices"]}
    assert run.code == 1 and devices["sim-02"]["ok"] is True
    assert devices["sim-01"]["failed_stage"] == "upload"
    assert devices["sim-01"]["error"] == "upload: /home/deploysim/.deployer/.lock: Read-only file system [io]"
    assert check_device(rig.remote()) == deployed  # untouched
