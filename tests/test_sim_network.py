"""The simulated network (docs/sim.md), measured on real servers through real proxy processes.

- `--rtt-ms`: a delay proxy adds the round trip it is asked for, and counts the bytes of a push;
- `--rate-kbit`: tbf on a veth into the device's network namespace limits a transfer to that rate;
- `--server dropbear`: a push works on a board with no sftp-server;
- a connection cut mid-transfer fails only that device, leaves its `current` alone, and the next push works.
Every fleet is stopped by the PIDs (and namespaces) it recorded, even when a test fails; every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest

from deployer.sim.fleet import SIM_USER, DeviceSpec, Fleet, proxy_stats, restart_proxy, set_device
from tests.conftest import Cli
from tests.test_faults import _saxpy_only

MakeFleet = Callable[..., Fleet]


def push(cli: Cli, fleet: Fleet, tmp_path: Path, *extra: str | Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """`deploy push --json` of a one-program library (quick to build): exit code and the devices by name."""
    library = tmp_path / "lib-one" if (tmp_path / "lib-one").is_dir() else _saxpy_only(tmp_path, "one")
    run = cli("push", "--fleet", fleet.inventory, "--kernels", library, "--cache", tmp_path / "cache", "--json",
              *extra)
    assert "Traceback" not in run.err and run.out.startswith("{"), (run.code, run.err)
    return run.code, {d["name"]: d for d in run.json()["devices"]}


def connect(fleet: Fleet, name: str) -> paramiko.SSHClient:
    """An SSH client to the device at the inventory's address, host key checked, TCP_NODELAY on."""
    device = fleet.device(name)
    sock = socket.create_connection((device.host, device.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = paramiko.SSHClient()
    client.load_host_keys(str(fleet.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(device.host, device.port, username=SIM_USER, key_filename=str(fleet.folder / "client_key"),
                   sock=sock, allow_agent=False, look_for_keys=False, timeout=10)
    return client


def echo_rtt_ms(client: paramiko.SSHClient, rounds: int = 7) -> float:
    """Median time for one byte to go to `cat` on the device and back, over an already-open channel."""
    transport = client.get_transport()
    assert transport is not None
    channel = transport.open_session()
    channel.settimeout(10)
    channel.exec_command("cat")
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        channel.sendall(b"x")
        assert channel.recv(1) == b"x"
        times.append((time.perf_counter() - start) * 1000)
    # End `cat` before closing: dropbear may drop the next channel opened while one whose command still
    # runs is being closed ("Unable to open channel").
    channel.shutdown_write()
    assert channel.recv_exit_status() == 0
    channel.close()
    return statistics.median(times)


def stream_seconds(client: paramiko.SSHClient, size: int) -> float:
    """Seconds to send `size` random bytes to `cat > /dev/null` on the device, until it answers."""
    stdin, stdout, _ = client.exec_command("cat > /dev/null && echo done", timeout=30)
    data = os.urandom(size)
    start = time.perf_counter()
    stdin.write(data)
    stdin.channel.shutdown_write()
    assert stdout.read() == b"done\n"
    return time.perf_counter() - start


def wait_until(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_rtt_proxy_adds_the_round_trip(make_fleet: MakeFleet) -> None:
    direct = make_fleet([DeviceSpec("sim-01")])
    delayed = make_fleet([DeviceSpec("sim-02")], rtt_ms=40)
    assert direct.device("sim-01").proxy_pid is None and delayed.device("sim-02").proxy_pid is not None
    with connect(direct, "sim-01") as client:
        without = echo_rtt_ms(client)
    with connect(delayed, "sim-02") as client:
        with_proxy = echo_rtt_ms(client)
    assert without < 10, without
    assert 40 <= with_proxy < 80, with_proxy
    stats = proxy_stats(delayed.device("sim-02"))
    assert stats["delay_ms"] == 20 and stats["connections"] == 1


def test_proxy_counts_the_bytes_of_a_push(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01")], rtt_ms=10)
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(256 << 10))
    code, devices = push(cli, fleet, tmp_path, "--model", model)
    assert code == 0, devices
    device = fleet.device("sim-01")
    assert wait_until(lambda: proxy_stats(device)["active"] == 0, 5)  # written at each connection's close
    stats = proxy_stats(device)
    sent, received = devices["sim-01"]["bytes_sent"], devices["sim-01"]["bytes_received"]
    assert stats["connections"] == 1  # one SSH connection per device for the whole push
    assert stats["client_to_server_bytes"] > model.stat().st_size
    # the proxy sees the agent channel's payload plus SSH framing, MACs and the handshake
    assert sent < stats["client_to_server_bytes"] < sent * 1.1 + (32 << 10)
    assert received < stats["server_to_client_bytes"] < received * 1.1 + (32 << 10)


def test_a_send_may_wait_for_a_slow_board_as_long_as_the_command_timeout(
        make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    """A board slow to take what is sent (here 3% of a CPU: the agent reads, hashes and writes the model
    slowly) lets the SSH window (2 MiB) fill, and each send waits for it. A read before it (every reply) had
    left the channel's timeout at the 0.1 s stderr poll, so the upload failed within a fraction of a second,
    saying "could not send within 300 s" (seen on a loaded machine pushing 16 MiB models to 8 boards)."""
    fleet = make_fleet([DeviceSpec("sim-01")])
    set_device(fleet, "sim-01", cpu=0.03)
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(6 << 20))
    code, devices = push(cli, fleet, tmp_path, "--model", model, "--smoke", "never")
    assert code == 0, devices["sim-01"]["error"]


def test_rate_limit_alone_and_with_rtt(make_fleet: MakeFleet) -> None:
    size = 1 << 20
    limited = make_fleet([DeviceSpec("sim-01")], rate_kbit=2000)
    device = limited.device("sim-01")
    assert device.netns and device.proxy_pid is None and device.host == device.server_host != "127.0.0.1"
    with connect(limited, "sim-01") as client:
        slow = stream_seconds(client, size)
    both = make_fleet([DeviceSpec("sim-02")], rate_kbit=2000, rtt_ms=20)
    with connect(both, "sim-02") as client:
        rtt = echo_rtt_ms(client)
        slow_quarter = stream_seconds(client, size // 4)
    free = make_fleet([DeviceSpec("sim-03")])
    with connect(free, "sim-03") as client:
        fast = stream_seconds(client, size)
    assert 3.5 <= slow < 10, slow  # 1 MiB at 2000 kbit/s is 4.2 s
    assert 20 <= rtt < 60 and 0.9 <= slow_quarter < 4, (rtt, slow_quarter)
    assert fast < 1, fast


def _namespaces() -> set[str]:
    names = Path("/run/netns")
    return {p.name for p in names.iterdir()} if names.is_dir() else set()


def test_stop_removes_namespaces_and_proxies(make_fleet: MakeFleet) -> None:
    fleet = make_fleet([DeviceSpec("sim-01"), DeviceSpec("sim-02", server="dropbear")], rate_kbit=8000, rtt_ms=4)
    recorded = [(d.netns, d.veth, d.proxy_pid, d.pid) for d in fleet.devices]
    assert all(netns in _namespaces() and Path("/sys/class/net", str(veth)).exists()
               for netns, veth, _, _ in recorded)
    fleet.stop()
    for netns, veth, proxy, server in recorded:
        assert netns not in _namespaces() and not Path("/sys/class/net", str(veth)).exists()
        for pid in (proxy, server):
            assert not Path(f"/proc/{pid}").exists(), pid  # stopped and reaped by stop_device


def test_push_to_openssh_and_dropbear(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01"), DeviceSpec("sim-02", server="dropbear", pocl_device="basic")])
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(64 << 10))
    code, devices = push(cli, fleet, tmp_path, "--model", model)
    assert code == 0, devices
    assert [devices[n]["ok"] for n in ("sim-01", "sim-02")] == [True, True]
    # dropbear passed POCL_DEVICES on (it has no SetEnv): the two devices have different fingerprints
    assert devices["sim-01"]["fingerprint"]["id"] != devices["sim-02"]["fingerprint"]["id"]
    dropbear = fleet.device("sim-02")
    assert "dropbear" in Path(dropbear.log).name and "auth succeeded" in Path(dropbear.log).read_text()
    current = Path(dropbear.folder) / "home" / ".deployer" / "current"
    assert os.readlink(current) == f"releases/{devices['sim-02']['release']}"
    assert [p.read_bytes() for p in current.rglob("model.bin")] == [model.read_bytes()]
    with connect(fleet, "sim-01") as client:
        client.open_sftp().close()  # OpenSSH has an sftp-server...
    with connect(fleet, "sim-02") as client, pytest.raises(paramiko.SSHException, match="EOF during negotiation"):
        client.open_sftp()  # ...the dropbear board has none, and the push above never needed one


def _remote(fleet: Fleet, name: str) -> Path:
    return Path(fleet.device(name).folder) / "home" / ".deployer"


def _releases(remote: Path) -> set[str]:
    return {p.name for p in (remote / "releases").iterdir()} if (remote / "releases").is_dir() else set()


def _leftovers(remote: Path) -> list[Path]:
    return [p for p in remote.rglob("*") if ".tmp-" in p.name]


def test_connection_dropped_mid_transfer(make_fleet: MakeFleet, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01"), DeviceSpec("sim-02")], rtt_ms=2)
    code, devices = push(cli, fleet, tmp_path)
    assert code == 0, devices
    first = devices["sim-02"]["release"]
    remote = _remote(fleet, "sim-02")
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(1 << 20))

    restart_proxy(fleet, "sim-02", cut_after_bytes=256 << 10)  # past the handshake and kernels: in the model
    code, devices = push(cli, fleet, tmp_path, "--model", model)
    assert code == 1 and devices["sim-01"]["ok"] is True
    failed: dict[str, Any] = devices["sim-02"]
    assert failed["ok"] is False and failed["failed_stage"] == "upload", failed
    assert "connection" in failed["error"] and "Traceback" not in failed["error"]
    assert proxy_stats(fleet.device("sim-02"))["cuts"] == 1
    # the agent saw its input end before `commit`: it deletes the release it began; `current` never moved
    assert wait_until(lambda: _releases(remote) == {first} and not _leftovers(remote), 10), \
        (_releases(remote), _leftovers(remote))
    assert os.readlink(remote / "current") == f"releases/{first}"

    restart_proxy(fleet, "sim-02")  # the network is back
    code, devices = push(cli, fleet, tmp_path, "--model", model)
    assert code == 0, devices
    assert os.readlink(remote / "current") == f"releases/{devices['sim-02']['release']}"
    assert proxy_stats(fleet.device("sim-02"))["cuts"] == 0


def test_sim_cli_flags(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "sim"
    for flag in ("--rtt-ms", "--rate-kbit"):
        bad = cli("sim", "up", "--devices", "1", "--dir", folder, flag, "-5")
        assert bad.code == 2 and f"field '{flag}': expected a whole number >= 0, got -5" in bad.err
    assert cli("sim", "up", "--dir", folder, "--server", "telnetd").code == 2
    assert not (folder / "state.json").exists()  # refused before anything started
    run = cli("sim", "up", "--devices", "1", "--dir", folder, "--server", "dropbear", "--rtt-ms", "10",
              "--rate-kbit", "8000")
    try:
        assert run.code == 0, run.err
        [status] = cli("sim", "status", "--dir", folder, "--json").json()["devices"]
        assert (status["server"], status["rtt_ms"], status["rate_kbit"]) == ("dropbear", 10, 8000)
        assert status["running"] and status["proxy_running"] and status["netns"].startswith("deploysim-sim-01-")
        table = cli("sim", "status", "--dir", folder).out
        assert "dropbear" in table and "8000" in table and f"127.0.0.1:{status['port']}" in table
    finally:
        down = cli("sim", "down", "--dir", folder)
    assert down.code == 0 and "stopped 1 device(s)" in down.out
    assert status["netns"] not in _namespaces()
