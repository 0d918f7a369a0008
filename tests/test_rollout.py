"""Controlling a rollout: `--wait` for the cache lock, `--max-fail-percentage`, per-device deadlines.

Real parts only: a second process that really holds the cache's flock, simulated devices that really lack
python3, an agent process really stopped with SIGSTOP (found by its mount namespace, continued after).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployer.cache.store import cache_lock
from deployer.config.inventory import parse_inventory
from deployer.connect.deadline import deadline_scope
from deployer.connect.transport import open_transport
from deployer.errors import AgentError, DeadlineExceeded, LocalStateError
from deployer.sim.fleet import DeviceSpec, Fleet
from deployer.tasks import runner
from deployer.tasks.fleet import fail_limit, fan_out
from deployer.tasks.progress import Progress
from deployer.tasks.runner import DeviceWork, Outcome
from tests.conftest import Cli
from tests.test_connect import connections
from tests.test_faults import _saxpy_only, device_entry, edit_inventory

MakeFleet = Callable[[Sequence[DeviceSpec]], Fleet]

# --- --wait: a real second process holds the cache lock ---------------------------------------------------

HOLDER = """
import fcntl, os, sys, time
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.seek(0); lock.truncate(); lock.write(f"pid {os.getpid()}"); lock.flush()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def hold_lock(tmp_path: Path) -> Iterator[Callable[[Path, float], subprocess.Popen[str]]]:
    """Start a process that holds `<cache>/.lock` for some seconds; stopped by PID afterwards."""
    started: list[subprocess.Popen[str]] = []

    def hold(cache: Path, seconds: float) -> subprocess.Popen[str]:
        cache.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache / ".lock"), str(seconds)],
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None and process.stdout.readline() == "locked\n"
        return process

    yield hold
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_wait_gets_the_lock_when_the_other_run_ends_in_time(tmp_path: Path, hold_lock: Callable[..., Any]) -> None:
    holder = hold_lock(tmp_path / "cache", 1.0)
    start = time.monotonic()
    with cache_lock(tmp_path / "cache", wait=20):
        waited = time.monotonic() - start
        assert (tmp_path / "cache" / ".lock").read_text() == f"pid {os.getpid()}"
    assert holder.wait(timeout=10) == 0
    assert 0.5 <= waited < 10


def test_wait_gives_up_with_the_same_message(tmp_path: Path, hold_lock: Callable[..., Any]) -> None:
    holder = hold_lock(tmp_path / "cache", 60)
    start = time.monotonic()
    with pytest.raises(LocalStateError) as caught:
        with cache_lock(tmp_path / "cache", wait=0.5):
            pass
    assert 0.5 <= time.monotonic() - start < 3
    assert str(caught.value) == (f"cache {tmp_path / 'cache'} is in use by another deploy run (pid {holder.pid}); "
                                 "wait for it to finish (still held after waiting 0.5 s)")


def test_cli_wait_refuses_before_touching_any_device(tmp_path: Path, hold_lock: Callable[..., Any],
                                                     cli: Cli) -> None:
    inventory = tmp_path / "fleet.yml"
    inventory.write_text("devices:\n  - {name: far, host: 192.0.2.1}\nssh_config: null\n")  # TEST-NET: never used
    hold_lock(tmp_path / "cache", 60)
    for command in ("rollback", "collect"):
        start = time.monotonic()
        run = cli(command, "--fleet", inventory, "--cache", tmp_path / "cache", "--wait", "0.3")
        assert run.code == 3 and "still held after waiting 0.3 s" in run.err, run.err
        assert time.monotonic() - start < 3
    run = cli("rollback", "--fleet", inventory, "--cache", tmp_path / "cache")
    assert run.code == 3 and "or queue with --wait SECONDS" in run.err


# --- --max-fail-percentage ---------------------------------------------------------------------------------


@dataclass
class Done:
    name: str
    ok: bool


def test_fan_out_stop_rule_starts_no_more_devices() -> None:
    """The rule on its own (pure): with one fork, devices run in order and each sees the ones before it."""
    devices = [Done(f"d{i}", i >= 2) for i in range(6)]
    started: list[str] = []

    def work(device: Done) -> Done:
        started.append(device.name)
        return device

    out = fan_out(devices, work, forks=1, label="t", stop=fail_limit(30, len(devices)),
                  not_started=lambda d, why: Done(d.name + ":" + why, False))
    assert started == ["d0", "d1"]  # 1 of 6 is 16.7% (go on); 2 of 6 is 33.3% > 30% (stop)
    assert [o.name for o in out[2:]] == [f"d{i}:rollout stopped: 2 of 6 devices failed (> 30%)" for i in range(2, 6)]
    assert fail_limit(0, 4)([Done("a", True)]) is None and fail_limit(0, 4)([Done("a", False)]) is not None
    assert fail_limit(100, 4)([Done("a", False)] * 4) is None


def test_a_bug_in_one_devices_work_ends_that_device_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner turns whatever a device's work raises into that device's outcome: a device error, a local
    state error, a bug (its traceback saved to a file the outcome names); the others pass, in order."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    entries = "".join(f"  - {{name: d{i}, host: 127.0.0.1}}\n" for i in range(4))
    devices = parse_inventory("devices:\n" + entries).devices

    def work(context: DeviceWork[Outcome]) -> None:
        with context.stage("step"):
            name = context.device.name
            if name == "d1":
                raise ZeroDivisionError("a bug")
            if name == "d2":
                raise AgentError("the board said no", kind="io")
            if name == "d3":
                raise LocalStateError("disk full")

    result = runner.run_fleet(devices, Outcome, lambda d: runner.run_device(d, Outcome(d.name), work,
                                                                            progress=Progress()),
                              forks=2, progress=Progress(), label="t")
    by_name = {o.name: o for o in result.outcomes}
    assert [o.name for o in result.outcomes] == ["d0", "d1", "d2", "d3"] and not result.interrupted
    assert by_name["d0"].ok and by_name["d0"].error is None and set(by_name["d0"].stages) == {"step"}
    bug = by_name["d1"]
    assert not bug.ok and bug.failed_stage == "internal" and "a bug in deploy" in (bug.error or "")
    (crash,) = tmp_path.glob("deploy-crash-*.txt")
    assert crash.name in (bug.error or "") and "ZeroDivisionError: a bug" in crash.read_text()
    assert "'d1'" in crash.read_text()
    assert (by_name["d2"].failed_stage, by_name["d2"].error) == ("step", "the board said no [io]")
    assert (by_name["d3"].failed_stage, by_name["d3"].error) == ("step", "local cache: disk full")
    assert [o.to_json()["failed_stage"] for o in result.outcomes] == [None, "internal", "step", "step"]


def test_max_fail_percentage_stops_the_rollout(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01", without_python=True), DeviceSpec("sim-02", without_python=True),
                        DeviceSpec("sim-03"), DeviceSpec("sim-04")])
    before = {name: connections(fleet, name) for name in ("sim-03", "sim-04")}
    run = cli("push", "--fleet", fleet.inventory, "--kernels", _saxpy_only(tmp_path, "stop"), "--cache",
              tmp_path / "cache", "--forks", "1", "--max-fail-percentage", "25", "--json")
    assert run.code == 1
    devices = {d["name"]: d for d in run.json()["devices"]}
    assert [devices[n]["failed_stage"] for n in ("sim-01", "sim-02")] == ["connect", "connect"]
    for name in ("sim-03", "sim-04"):
        assert devices[name]["ok"] is False and devices[name]["failed_stage"] == "not_started"
        assert devices[name]["error"] == "rollout stopped: 2 of 4 devices failed (> 25%)"
        assert connections(fleet, name) == before[name]  # never contacted
    human = cli("push", "--fleet", fleet.inventory, "--kernels", _saxpy_only(tmp_path, "stop2"), "--cache",
                tmp_path / "cache", "--forks", "1", "--max-fail-percentage", "25", "--limit", "@failed")
    assert human.code == 1 and "failed (not_started)" in human.out
    assert "sim-04: rollout stopped: 2 of 4 devices failed (> 25%)" in human.out


def push(cli: Cli, inventory: Path, tmp_path: Path, *extra: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """A push of a one-program library (fast to build), its exit code and devices by name."""
    run = cli("push", "--fleet", inventory, "--kernels", _saxpy_only(tmp_path, str(len(list(tmp_path.iterdir())))),
              "--cache", tmp_path / "cache", "--json", *extra)
    assert "Traceback" not in run.err
    return run.code, {d["name"]: d for d in run.json()["devices"]}


# --- per-device deadline ------------------------------------------------------------------------------------


def test_deadline_interrupts_a_local_command() -> None:
    """`host: local`: at the deadline the command is killed and the read says why (a real `sleep`)."""
    device = parse_inventory("devices:\n  - {name: here, host: local}\n").devices[0]
    start = time.monotonic()
    with deadline_scope(0.5):
        channel = open_transport(device).exec("sleep 30")
        with pytest.raises(DeadlineExceeded, match=r"^deadline of 0.5 s exceeded"):
            channel.read_line(100)
        channel.close()
    assert time.monotonic() - start < 3


def _namespace_processes(pid: int, marker: bytes) -> list[int]:
    """Processes in the mount namespace of `pid` whose command line holds `marker` (sshd's excepted)."""
    namespace = os.readlink(f"/proc/{pid}/ns/mnt")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/mnt") != namespace:
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and b"sshd" not in cmdline:
            found.append(int(entry))
    return found


class Staller:
    """Stops (SIGSTOP) the first session process that appears on a simulated device; continues it at the end."""

    def __init__(self, fleet: Fleet, name: str) -> None:
        self._pid = fleet.device(name).pid
        self.stopped: list[int] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        end = time.monotonic() + 60
        while not self._done.is_set() and time.monotonic() < end:
            pids = _namespace_processes(self._pid, b"/.deployer")
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                self.stopped = pids
                return
            time.sleep(0.005)

    def release(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_deadline_fails_a_stalled_device_without_holding_up_the_others(
        make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01"), DeviceSpec("sim-02")])
    inventory = edit_inventory(fleet, lambda doc: device_entry(doc, "sim-01").update(timeouts={"device": 3}))
    staller = Staller(fleet, "sim-01")
    start = time.monotonic()
    try:
        code, devices = push(cli, inventory, tmp_path)
    finally:
        staller.release()
    wall = time.monotonic() - start
    assert staller.stopped, "the device's session was never seen"
    assert code == 1 and devices["sim-02"]["ok"] is True
    late = devices["sim-01"]
    assert late["ok"] is False and late["failed_stage"] in ("connect", "upload", "fingerprint", "compile")
    assert late["error"] == f"{late['failed_stage']}: deadline of 3 s exceeded: the connection was closed"
    assert sum(late["stages"].values()) < 3 + 1.5
    assert wall < 3 + 15  # sim-02's push, not a stall: nothing waited on the command timeout (300 s)
    # Continued, the stopped session finds its input closed: nothing is committed, no release is left.
    remote = Path(fleet.device("sim-01").folder) / "home" / ".deployer"
    end = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in staller.stopped) and time.monotonic() < end:
        time.sleep(0.05)
    assert not (remote / "current").exists()
    assert (list((remote / "releases").iterdir()) if (remote / "releases").exists() else []) == []


def test_deadline_flag_overrides_the_inventory(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01")])
    staller = Staller(fleet, "sim-01")
    try:
        code, devices = push(cli, fleet.inventory, tmp_path, "--deadline", "1.5", "--retries", "0")
    finally:
        staller.release()
    assert code == 1 and devices["sim-01"]["error"].endswith("deadline of 1.5 s exceeded: the connection was closed")
