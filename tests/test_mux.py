"""The connection master (`ssh.persist`): real sshd devices, real runs of `deploy` as separate processes (a
master outlives the run that started it, and serves the next one), each test with a socket folder of its own.

What sshd logs is the witness: "Accepted publickey" is one SSH connection, "Starting session" one command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployer.config.inventory import load_inventory
from deployer.connect import mux
from deployer.connect import muxwire as wire
from deployer.connect.transport import open_transport
from deployer.errors import TransportError
from deployer.sim.fleet import DeviceSpec, Fleet, start_fleet
from tests.conftest import KERNELS, REPO, Cli
from tests.test_kill import Rig, check_device, heavy_library, push_in_process, wait_until

NAMES = ("mux-01", "mux-02")


@dataclass
class Setup:
    fleet: Fleet
    kernels: Path
    cache: Path
    folder: Path

    def inventory(self, persist: float, **ssh: Any) -> Path:
        data = yaml.safe_load(self.fleet.inventory.read_text())
        data["defaults"]["ssh"].update(persist=persist, **ssh)
        path = self.folder / f"inventory-{persist:g}-{len(ssh)}.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def sshd(self) -> dict[str, tuple[int, int]]:
        """Per device: (connections accepted, commands started) so far."""
        counts = {}
        for name in NAMES:
            log = (Path(self.fleet.device(name).folder) / "sshd.log").read_text()
            counts[name] = (log.count("Accepted publickey"), log.count("Starting session: command"))
        return counts


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, pocl_cache: Path) -> Iterator[Setup]:
    folder = tmp_path_factory.mktemp("mux")
    fleet = start_fleet(folder / "fleet", [DeviceSpec(n) for n in NAMES], pocl_cache=pocl_cache)
    kernels = folder / "kernels"  # the library's first program only: what is pushed does not matter here
    shutil.copytree(KERNELS, kernels)
    manifest = (kernels / "kernels.yml").read_text()
    (kernels / "kernels.yml").write_text(manifest[: manifest.index("\n  relu:")] + "\n")
    state = Setup(fleet, kernels, folder / "cache", folder)
    try:
        code, _, err = push(state, state.inventory(0), folder / "no-mux")
        assert code == 0, err
        yield state
    finally:
        fleet.stop()


def push(setup: Setup, inventory: Path, mux_dir: Path) -> tuple[int, dict[str, Any], str]:
    """`deploy push` as a process of its own (each run finds the master anew, as a user's next run does)."""
    env = {**os.environ, "DEPLOY_MUX_DIR": str(mux_dir), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "deployer", "push", "--fleet", str(inventory), "--kernels",
                           str(setup.kernels), "--cache", str(setup.cache), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout) if done.stdout else {}, done.stderr


def master_path(mux_dir: Path) -> Path:
    return mux_dir / wire.socket_path(wire.code_digest()).name


def running(pid: int) -> bool:
    """Whether `pid` is alive (a zombie no one reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_gone(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while running(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not running(pid)


@pytest.fixture
def mux_dir(tmp_path: Path) -> Iterator[Path]:
    """A socket folder of the test's own; whatever master came to serve there is stopped by PID after."""
    folder = tmp_path / "mux"
    pids: set[int] = set()
    yield folder
    for log in folder.glob("*.pid-seen"):
        pids.add(int(log.read_text()))
    path = master_path(folder)
    try:
        answer = mux.hello(path, wire.code_digest()) if path.exists() else None
    except wire.Foreign:
        answer = None
    if answer:
        pids.add(int(answer["pid"]))
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGTERM)
            if not wait_gone(pid, 10):
                os.kill(pid, signal.SIGKILL)


def master_pid(folder: Path) -> int:
    answer = mux.hello(master_path(folder), wire.code_digest())
    assert answer is not None
    pid = int(answer["pid"])
    (folder / f"{pid}.pid-seen").write_text(str(pid))  # for the fixture to stop, whatever the test does to it
    return pid


def delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> set[tuple[int, int]]:
    return {(after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in NAMES}


def test_runs_share_one_connection_per_device(setup: Setup, mux_dir: Path) -> None:
    inventory, before = setup.inventory(60), setup.sshd()
    for _ in range(3):
        code, report, err = push(setup, inventory, mux_dir)
        assert code == 0, err
        assert [d["shell_noop"] for d in report["devices"]] == [True, True]  # the board's shell answered
    assert delta(before, setup.sshd()) == {(1, 3)}  # one connection for three runs; a command each
    pid = master_pid(mux_dir)
    info = os.stat(mux_dir)
    assert info.st_mode & 0o777 == 0o700 and os.stat(master_path(mux_dir)).st_mode & 0o777 == 0o600
    code, shown = connections(mux_dir, "--json")
    assert code == 0 and shown["running"] and shown["pid"] == pid
    assert (shown["held"], shown["handshakes"], shown["reuses"]) == (2, 2, 4)
    assert sorted(c["device"].split(" ")[0] for c in shown["connections"]) == list(NAMES)
    assert all(c["users"] == 0 and c["persist_s"] == 60 for c in shown["connections"])
    code, shown = connections(mux_dir, "--stop", "--json")
    assert code == 0 and shown["stopped"] and not shown["running"]
    assert wait_gone(pid, 10) and not master_path(mux_dir).exists()
    assert connections(mux_dir, "--json") == (0, {**shown, "stopped": False, **dict.fromkeys(
        ("pid", "held", "handshakes", "reuses", "connections"))})


def connections(mux_dir: Path, *args: str) -> tuple[int, dict[str, Any]]:
    env = {**os.environ, "DEPLOY_MUX_DIR": str(mux_dir), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "deployer", "connections", *args], capture_output=True, text=True,
                          env=env, timeout=60)
    assert "Traceback" not in done.stderr
    return done.returncode, json.loads(done.stdout) if done.returncode == 0 else {"stderr": done.stderr}


def test_a_stale_socket_is_replaced_by_a_new_master(setup: Setup, mux_dir: Path) -> None:
    mux_dir.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(master_path(mux_dir)))  # a socket file nobody listens on: its master died
    dead.close()
    code, report, err = push(setup, setup.inventory(60), mux_dir)
    assert code == 0 and "not keeping connections open" not in err, err
    assert all(d["ok"] for d in report["devices"])
    master_pid(mux_dir)  # a master answers there now


def test_a_master_killed_between_runs_costs_only_a_new_connection(setup: Setup, mux_dir: Path) -> None:
    inventory = setup.inventory(60)
    assert push(setup, inventory, mux_dir)[0] == 0
    first = master_pid(mux_dir)
    os.kill(first, signal.SIGKILL)
    assert wait_gone(first, 10)
    before = setup.sshd()
    code, _, err = push(setup, inventory, mux_dir)
    assert code == 0 and "not keeping connections open" not in err, err
    assert master_pid(mux_dir) != first and delta(before, setup.sshd()) == {(1, 1)}


class NotAMaster:
    """Something else listening on the master's socket: it answers every line with a line of its own."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(8)
        self.server.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            with client:
                client.settimeout(2)
                try:
                    client.recv(4096)
                    client.sendall(b"SSH-2.0-something-else\n")
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.server.close()


@pytest.mark.parametrize("foreign", ["folder open to others", "socket of another user", "not a master"])
def test_a_foreign_socket_is_never_used(setup: Setup, mux_dir: Path, foreign: str) -> None:
    mux_dir.mkdir(mode=0o700)
    path, fake = master_path(mux_dir), None
    expected = {"folder open to others": "it must be uid", "socket of another user": "not a socket of this user's",
                "not a master": "does not answer as a connection master"}[foreign]
    if foreign == "folder open to others":
        mux_dir.chmod(0o755)
    elif foreign == "socket of another user":
        planted = socket.socket(socket.AF_UNIX)
        planted.bind(str(path))
        planted.close()
        os.chown(path, 65534, 65534)
    else:
        fake = NotAMaster(path)
    try:
        before = setup.sshd()
        code, report, err = push(setup, setup.inventory(60), mux_dir)
        assert code == 0, err
        assert "not keeping connections open (ssh.persist)" in err and expected in err and "connecting directly" in err
        assert all(d["ok"] for d in report["devices"])
        assert delta(before, setup.sshd()) == {(1, 1)}  # a connection of the run's own
        assert not [p for p in mux_dir.iterdir() if p.suffix == ".lock"]  # no master was started beside it
        code, shown = connections(mux_dir, "--stop")  # nor is it asked to stop: local state unusable, said
        assert code == 3 and expected in shown["stderr"]
    finally:
        if fake is not None:
            fake.stop()


def test_the_master_speaks_only_to_its_own_user(setup: Setup, mux_dir: Path) -> None:
    assert push(setup, setup.inventory(60), mux_dir)[0] == 0
    pid = master_pid(mux_dir)
    path = master_path(mux_dir)
    path.chmod(0o666)  # let another user reach the socket at all (a link outside the 0700 folders of
    door = Path(tempfile.mkdtemp(prefix="mux-door-"))  # pytest's): the master itself must refuse
    try:
        door.chmod(0o711)
        os.link(path, door / "master.sock")
        script = ("import socket,sys\ns=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)\n"
                  "try:\n s.sendall(b'{\"op\":\"hello\"}\\n'); print(repr(s.recv(4096)))\n"
                  "except (BrokenPipeError, ConnectionResetError): print('closed')")
        done = subprocess.run(["/usr/bin/python3", "-c", script, str(door / "master.sock")], capture_output=True,
                              text=True, timeout=30, user=65534, group=65534)
    finally:
        shutil.rmtree(door)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("b''", "closed")  # connected, then closed without a word
    assert running(pid)


def test_an_idle_master_closes_its_connections_and_exits(setup: Setup, mux_dir: Path) -> None:
    assert push(setup, setup.inventory(1), mux_dir)[0] == 0
    pid = master_pid(mux_dir)
    assert wait_gone(pid, 1 + 2 + 10)  # persist, the master's grace, and a margin for a loaded machine
    assert not master_path(mux_dir).exists()


def test_a_refused_host_key_reads_the_same_through_the_master(setup: Setup, mux_dir: Path) -> None:
    empty = setup.folder / "empty_known_hosts"
    empty.write_text("")
    direct = push(setup, setup.inventory(0, known_hosts=str(empty)), mux_dir)
    through = push(setup, setup.inventory(60, known_hosts=str(empty)), mux_dir)
    assert direct[0] == through[0] != 0
    errors = [[d["error"] for d in run[1]["devices"]] for run in (direct, through)]
    assert errors[0] == errors[1] and all("unknown host key for" in e for e in errors[0])
    master_pid(mux_dir)


# --- interruptions through the master (tests/test_kill.py's rig: a device of the test's own) ------------------


@pytest.fixture
def persisted_rig(make_fleet: Any, tmp_path: Path, mux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    """test_kill's rig, its inventory saying `ssh.persist`, every run (in-process or not) on `mux_dir`."""
    monkeypatch.setenv("DEPLOY_MUX_DIR", str(mux_dir))
    made = Rig(make_fleet([DeviceSpec("sim-01")]), tmp_path)
    data = yaml.safe_load(made.fleet.inventory.read_text())
    data["defaults"]["ssh"]["persist"] = 60
    made.fleet.inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    yield made
    made.stop_all()


def _compiling(rig: Rig) -> subprocess.Popen[bytes]:
    process = rig.start(heavy_library(rig.tmp / "heavy"), extra=["--smoke", "never"])
    assert wait_until(lambda: "sim-01 compile" in rig.output(process)[1] or process.poll() is not None, 60)
    time.sleep(1.0)  # well inside the compile
    assert process.poll() is None, rig.output(process)
    return process


@pytest.mark.slow
def test_ctrl_c_through_the_master_stops_the_board_and_keeps_the_connection(persisted_rig: Rig, cli: Cli,
                                                                            mux_dir: Path) -> None:
    """Ctrl-C closes the run's sockets: the master closes the command's channel (the agent sees its input end,
    drops the release it began), and keeps the connection for the next run."""
    rig = persisted_rig
    old = push_in_process(cli, rig, rig.library(), "--smoke", "never")["release"]
    pid = master_pid(mux_dir)
    process = _compiling(rig)
    os.killpg(process.pid, signal.SIGINT)
    start = time.monotonic()
    code = process.wait(timeout=30)
    assert time.monotonic() - start < 5.0, time.monotonic() - start
    out, err = rig.output(process)
    assert code == 130 and json.loads(out)["devices"][0]["error"].startswith("compile: interrupted (Ctrl-C)"), err
    assert wait_until(rig.agent_gone, 10)
    assert check_device(rig.remote()) == old
    answer = mux.hello(master_path(mux_dir), wire.code_digest())
    assert answer is not None and answer["pid"] == pid and answer["held"] == 1
    again = push_in_process(cli, rig, rig.library(), "--smoke", "never")
    assert check_device(rig.remote()) == again["release"] != old
    assert mux.hello(master_path(mux_dir), wire.code_digest())["handshakes"] == 1  # type: ignore[index]


@pytest.mark.slow
def test_a_master_killed_mid_compile_fails_the_run_at_once(persisted_rig: Rig, cli: Cli, mux_dir: Path) -> None:
    """The master SIGKILLed while a command of the run is on its connection: the device fails with the lost
    connection within seconds (not at the command's timeout), the board's agent ends with the connection,
    and the next run starts a master of its own."""
    rig = persisted_rig
    old = push_in_process(cli, rig, rig.library(), "--smoke", "never")["release"]
    first = master_pid(mux_dir)
    process = _compiling(rig)
    os.kill(first, signal.SIGKILL)
    start = time.monotonic()
    code, devices = rig.finish(process, timeout=60)
    assert time.monotonic() - start < 5.0, time.monotonic() - start
    assert code == 1 and "connection lost" in devices["sim-01"]["error"], devices
    assert wait_until(rig.agent_gone, 20) and check_device(rig.remote()) == old
    again = push_in_process(cli, rig, rig.library(), "--smoke", "never")
    assert check_device(rig.remote()) == again["release"] and master_pid(mux_dir) != first


def test_a_refused_session_leaves_the_commands_running_on_the_connection(make_fleet: Any, mux_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """sshd refuses a session past its MaxSessions (50 in the sim) on a held connection: that command fails,
    and the 50 running on the same connection (other runs' commands, say) go on to their end."""
    monkeypatch.setenv("DEPLOY_MUX_DIR", str(mux_dir))
    fleet = make_fleet([DeviceSpec("sim-01")])
    data = yaml.safe_load(fleet.inventory.read_text())
    data["defaults"]["ssh"]["persist"] = 60
    fleet.inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    transport = open_transport(load_inventory(fleet.inventory).devices[0])
    assert isinstance(transport, mux.MuxTransport)
    try:
        running = [transport.exec("read line; echo \"$line\"") for _ in range(50)]
        with pytest.raises(TransportError, match="cannot start a command"):
            transport.exec("true")
        for number, channel in enumerate(running):
            channel.write(f"{number}\n".encode())
            assert channel.read_line(100) == f"{number}\n".encode()
            assert channel.finish(10)[0] == 0
        second = transport.exec("echo again")  # the connection is still the one held
        assert second.read_line(100) == b"again\n" and second.finish(10)[0] == 0
    finally:
        transport.close()
    answer = mux.hello(master_path(mux_dir), wire.code_digest())
    assert answer is not None and answer["handshakes"] == 1
    master_pid(mux_dir)
