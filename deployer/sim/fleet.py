"""A simulated fleet: one real SSH server (OpenSSH `sshd` or dropbear) per device, each its own little board.

Each device runs in a private mount namespace (`unshare -m`) where:
- the login account `deploysim` (unprivileged, so permission faults are real) has its own home,
  bind-mounted from `D/devices/<name>/home`, with no shell start-up files to slow each command;
- optional faults are made real, not faked: an overlay whiteout hides `python3` or `libOpenCL.so.1`
  exactly as a board without them looks, and a size-capped tmpfs makes the remote dir fill up.
A network can be put between controller and devices (`deployer.netsim`): `rtt_ms` starts a delay proxy on
127.0.0.1 in front of each device; `rate_kbit` moves the device into a network namespace of its own, joined
by a veth pair shaped with tbf. The fleet writes `D/inventory.yml` (ready for `--fleet`), `D/known_hosts`
and the client key. Processes are stopped by the PIDs, namespaces deleted by the names, recorded in
`D/state.json`. This is the code behind `deploy sim` and the tests; docs/sim.md tells the whole story.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from shlex import quote
from typing import Any

import yaml

from deployer import child_env
from deployer.errors import InputError, SimError
from deployer.sim import netsim

SIM_USER = "deploysim"
SIM_HOME = Path("/home") / SIM_USER
SSHD = "/usr/sbin/sshd"
DROPBEAR = "/usr/sbin/dropbear"
SERVERS = ("openssh", "dropbear")
OPENSSH_LIBEXEC = "/usr/lib/openssh"  # sftp-server lives here; a dropbear device hides it
PYTHON_DIRS = ("/usr/bin", "/usr/local/bin")
OPENCL_LIB_DIR = "/usr/lib/x86_64-linux-gnu"
START_TIMEOUT_S = 15.0
THERMAL_DIR = "/sys/class/thermal"  # a folder of the device's own is bound here: `deploy sim set --temp-c`
POCL_DEVICES = ("pthread", "basic")
CPU_CGROUP = Path("/sys/fs/cgroup/cpu")  # cgroup v1: a quota here makes a simulated board slow
CPU_PERIOD_US = 10_000  # short: a kernel of a few ms is throttled inside itself, not only between runs
NORMAL_TEMP_MC = 45000  # millidegrees, as Linux prints them
POCL_CACHE_MOUNT = ".pocl-cache"


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """How one simulated board differs from a healthy one."""

    name: str
    pocl_device: str = "pthread"  # PoCL's POCL_DEVICES (POCL_DEVICES below): two fingerprints
    without_python: bool = False
    without_opencl: bool = False
    disk_kib: int = 0  # > 0: the remote dir is a tmpfs of this size
    server: str = "openssh"  # or "dropbear": no sftp-server, no SetEnv
    cut_after_bytes: int = 0  # > 0: a proxy in front resets each connection after this many bytes sent to it
    read_only: bool = False  # the remote dir is a read-only bind mount (of itself) in the device's namespace


@dataclass(slots=True)
class SimDevice:
    """One running device; `host`:`port` is what the inventory and known_hosts use (the proxy when present)."""

    spec: DeviceSpec
    port: int
    pid: int  # the server's (its process group); each connection's processes have their own sessions
    folder: str
    host: str = "127.0.0.1"
    server_host: str = "127.0.0.1"  # where the server itself listens (inside its namespace with rate_kbit)
    server_port: int = 0
    log: str = ""  # the server's log file
    proxy_pid: int | None = None
    proxy_stats: str | None = None  # the proxy's JSON counters (`proxy_stats`)
    netns: str | None = None  # the network namespace, and the host end of its veth pair (rate_kbit)
    veth: str | None = None
    rtt_ms: int = 0
    rate_kbit: int = 0


@dataclass(slots=True)
class Fleet:
    folder: Path
    devices: list[SimDevice] = field(default_factory=list)

    @property
    def inventory(self) -> Path:
        return self.folder / "inventory.yml"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    def device(self, name: str) -> SimDevice:
        return next(d for d in self.devices if d.spec.name == name)

    def stop(self) -> None:
        stop_fleet(self.folder)


def fleet_specs(count: int, *, mix: bool = False) -> list[DeviceSpec]:
    """`count` healthy devices; with `mix`, every second one uses PoCL's `basic` device."""
    return [
        DeviceSpec(f"sim-{i:02d}", pocl_device="basic" if mix and i % 2 == 0 else "pthread")
        for i in range(1, count + 1)
    ]


def _run(argv: Sequence[str]) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True)
    if result.returncode != 0:
        raise SimError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def ensure_sim_user() -> tuple[int, int]:
    """The unprivileged login account shared by all simulated devices (each sees its own home)."""
    try:
        entry = pwd.getpwnam(SIM_USER)
    except KeyError:
        _run(["useradd", "--no-create-home", "--home-dir", str(SIM_HOME), "--shell", "/bin/sh", SIM_USER])
        # "!" (locked) makes sshd refuse the account when PAM is off; "*" means "no password".
        _run(["usermod", "-p", "*", SIM_USER])
        entry = pwd.getpwnam(SIM_USER)
    SIM_HOME.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    return entry.pw_uid, entry.pw_gid


_HANDED_OUT: set[int] = set()  # ports given to a server or proxy of this process, which may not have bound yet


def _free_port() -> int:
    """A port free now and not handed out before by this process: a device's server binds its port only once
    it has started, and the kernel would hand that port out again meanwhile (a proxy of 32 devices once got
    the port of a server still starting, and failed with "address already in use")."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise SimError("no free port on 127.0.0.1 that this process has not handed out already")


def _keygen(path: Path, comment: str) -> None:
    if not path.exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _whiteouts(folder: Path, lower: str, names: Sequence[str]) -> str:
    """Mount commands for an overlay on `lower` in which `names` do not exist (char device 0/0)."""
    upper, work = folder / ("upper" + lower.replace("/", "_")), folder / ("work" + lower.replace("/", "_"))
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (upper / name).exists():
            os.mknod(upper / name, 0o600 | 0o020000, os.makedev(0, 0))
    if "," in str(folder) or ":" in str(folder):
        raise InputError(None, "dir", f"sim folder {folder} has ',' or ':', which overlay options cannot hold")
    return f"mount -t overlay overlay -o {quote(f'lowerdir={lower},upperdir={upper},workdir={work}')} {lower}"


def _python_names(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n == "python" or n.startswith("python3")] \
        if os.path.isdir(directory) else []


def _start_script(spec: DeviceSpec, device: SimDevice, ids: tuple[int, int], pocl_cache: Path | None) -> str:
    folder = Path(device.folder)
    lines = ["set -e", f"mount --bind {quote(str(folder / 'home'))} {SIM_HOME}"]
    if os.path.isdir(THERMAL_DIR):  # the board's temperature: a file the sim (and `deploy sim set`) writes
        lines.append(f"mount --bind {quote(str(folder / 'thermal'))} {THERMAL_DIR}")
    if pocl_cache is not None:
        # Bind-mounted, since the account cannot traverse a 0700 folder such as pytest's tmp.
        lines.append(f"mount --bind {quote(str(pocl_cache))} {SIM_HOME / POCL_CACHE_MOUNT}")
    if spec.without_python:
        lines += [_whiteouts(folder, d, _python_names(d)) for d in PYTHON_DIRS if _python_names(d)]
    if spec.without_opencl:
        libs = [n for n in os.listdir(OPENCL_LIB_DIR) if n.startswith("libOpenCL.so")]
        lines.append(_whiteouts(folder, OPENCL_LIB_DIR, libs))
    if spec.disk_kib:
        remote = SIM_HOME / ".deployer"
        lines += [
            f"mkdir -p {remote}",
            f"mount -t tmpfs -o size={spec.disk_kib}k,uid={ids[0]},gid={ids[1]},mode=0755 tmpfs {remote}",
        ]
    if spec.read_only:
        remote = SIM_HOME / ".deployer"
        lines += [f"mkdir -p {remote}", f"chown {ids[0]}:{ids[1]} {remote}", f"mount --bind {remote} {remote}",
                  f"mount -o remount,ro,bind {remote}"]
    log = quote(device.log)
    if spec.server == "dropbear":
        # A board with dropbear has no sftp-server (/usr/lib/sftp-server links into this folder). dropbear has
        # no SetEnv: it clears its children's environment unless -e, so it gets exactly this one (env -i).
        lines.append(f"mount -t tmpfs -o size=16k,mode=0755 tmpfs {OPENSSH_LIBEXEC}")
        env = " ".join(quote(v) for v in ["PATH=/usr/local/bin:/usr/bin:/bin", *_server_env(spec, pocl_cache)])
        lines.append(f"exec env -i {env} {DROPBEAR} -F -E -e -s -w -j -k -p {device.server_host}:"
                     f"{device.server_port} -r {quote(str(folder / 'host_ed25519.dropbear'))} "
                     f"-P {quote(str(folder / 'dropbear.pid'))} 2>>{log}")
    else:
        lines.append(f"exec {SSHD} -D -f {quote(str(folder / 'sshd_config'))} -E {log}")
    return "\n".join(lines) + "\n"


def _server_env(spec: DeviceSpec, pocl_cache: Path | None) -> list[str]:
    """What every command on the device sees (OpenSSH: SetEnv; dropbear: its own environment)."""
    env = [f"POCL_DEVICES={spec.pocl_device}"]
    if pocl_cache is not None:
        env.append(f"POCL_CACHE_DIR={SIM_HOME / POCL_CACHE_MOUNT}")
    return env


def _sshd_config(spec: DeviceSpec, device: SimDevice, pocl_cache: Path | None) -> str:
    folder = Path(device.folder)
    return "\n".join([
        f"Port {device.server_port}",
        f"ListenAddress {device.server_host}",
        f"HostKey {folder / 'host_ed25519'}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AllowUsers {SIM_USER}",
        "StrictModes no", "UsePAM no", "UseDNS no", "PrintMotd no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "LogLevel VERBOSE", "MaxStartups 100:30:200", "MaxSessions 50",
        f"Subsystem sftp {OPENSSH_LIBEXEC}/sftp-server",
        "SetEnv " + " ".join(_server_env(spec, pocl_cache)),
    ]) + "\n"


def _start_device(spec: DeviceSpec, fleet: Path, ids: tuple[int, int], pocl_cache: Path | None, *,
                  rtt_ms: int, rate_kbit: int, started: list[SimDevice], proxy: bool = False) -> None:
    """Start one device (its namespace, server and proxy), appending it to `started` as soon as there is
    anything to stop, so that a failure half-way is cleaned up too."""
    if spec.server not in SERVERS:
        raise InputError(None, "server", f"sim device {spec.name}: unknown server {spec.server!r} "
                                         f"(one of {', '.join(SERVERS)})")
    folder = fleet / "devices" / spec.name
    _make_home(folder / "home", (fleet / "client_key.pub").read_bytes(), ids)
    write_temperature(folder, NORMAL_TEMP_MC)
    _keygen(folder / "host_ed25519", spec.name)
    if spec.server == "dropbear" and not (folder / "host_ed25519.dropbear").exists():
        _run(["dropbearconvert", "openssh", "dropbear", str(folder / "host_ed25519"),
              str(folder / "host_ed25519.dropbear")])  # the same key: known_hosts needs no second format
    log = folder / ("dropbear.log" if spec.server == "dropbear" else "sshd.log")
    device = SimDevice(spec, 0, 0, str(folder), server_port=_free_port(), log=str(log), rtt_ms=rtt_ms,
                       rate_kbit=rate_kbit)
    started.append(device)
    prefix: list[str] = []
    if rate_kbit:
        try:
            link = netsim.make_link(spec.name, rate_kbit)
        except netsim.NetworkError as exc:
            raise SimError(f"sim network: {exc} (needs root and iproute2: bash scripts/install.sh)") from exc
        device.netns, device.veth, device.server_host = link.netns, link.veth, link.device_ip
        prefix = ["nsenter", f"--net=/run/netns/{link.netns}"]
    (folder / "sshd_config").write_text(_sshd_config(spec, device, pocl_cache))
    (folder / "start.sh").write_text(_start_script(spec, device, ids, pocl_cache))
    _launch(device, prefix)
    device.host, device.port = device.server_host, device.server_port
    if rtt_ms or spec.cut_after_bytes or proxy:
        device.host, device.port = "127.0.0.1", _free_port()
        _start_proxy(device)


def _launch(device: SimDevice, prefix: Sequence[str]) -> None:
    """Run the device's start script (its server) in a mount namespace of its own."""
    folder = Path(device.folder)
    with open(folder / "start.log", "wb") as out:
        device.pid = subprocess.Popen(
            [*prefix, "unshare", "-m", "--propagation", "private", "sh", str(folder / "start.sh")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        ).pid


def write_temperature(folder: Path, millidegrees: int) -> None:
    """The device's /sys/class/thermal/thermal_zone0/temp (its own folder is bound there), in place: the
    bind mount shows the same inode, so a rename would not be seen."""
    zone = folder / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    for path in (folder / "thermal", zone):
        os.chmod(path, 0o755)
    with open(zone / "temp", "w") as out:
        out.write(f"{millidegrees}\n")
    os.chmod(zone / "temp", 0o644)


def set_device(fleet: Fleet, name: str, *, temp_c: float | None = None, driver: str | None = None,
               down: bool = False, up: bool = False, cpu: float | None = None) -> SimDevice:
    """Change one running device between runs, as boards change: its temperature, its OpenCL driver
    (PoCL's device: a new fingerprint; OpenSSH re-reads its SetEnv on SIGHUP), down (its server and proxy
    stopped: connections are refused) or up again on the same address."""
    try:
        device = fleet.device(name)
    except StopIteration:
        raise InputError(None, "device", f"no simulated device {name!r} (devices: "
                                         f"{', '.join(d.spec.name for d in fleet.devices)})") from None
    folder = Path(device.folder)
    if temp_c is not None:
        write_temperature(folder, round(temp_c * 1000))
    if driver is not None:
        _change_driver(device, driver)
    if cpu is not None:
        set_cpu(device, cpu)
    if down and _alive(device.pid):
        stop_device(device)
    if up and not _alive(device.pid):
        if device.netns:  # stopping it removed its namespace and link
            raise SimError(f"sim device {name}: --up is not supported with --rate-kbit (restart the fleet)")
        _launch(device, [])
        if device.proxy_pid is not None:
            _start_proxy(device)
        _wait_ready(device, time.monotonic() + START_TIMEOUT_S)
    _save_state(fleet)
    return device


def _cgroup(device: SimDevice) -> Path:
    """Named by the device's folder too: two fleets (a test's own and the shared one) both have a sim-01."""
    folder = hashlib.sha256(device.folder.encode()).hexdigest()[:8]
    return CPU_CGROUP / f"deploy-sim-{folder}-{device.spec.name}"


def set_cpu(device: SimDevice, cpus: float) -> None:
    """Give the device `cpus` CPUs' worth of time (0.25: a quarter of one; 0: no limit) through a cgroup v1
    `cpu` group of its own: its server and every process in its namespace are moved in, and the processes
    its server starts later (each session, the agent, the OpenCL child) inherit it."""
    if not CPU_CGROUP.is_dir():
        raise SimError(f"no cgroup v1 cpu controller at {CPU_CGROUP}: a CPU quota needs one")
    if not 0 <= cpus <= 64:
        raise InputError(None, "--cpu", f"expected CPUs between 0 (no limit) and 64, got {cpus:g}")
    group = _cgroup(device)
    try:
        group.mkdir(exist_ok=True)
        quota = -1 if cpus == 0 else max(1000, round(cpus * CPU_PERIOD_US))
        (group / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
        for pid in [device.pid, *namespace_pids(device.pid)]:
            try:
                (group / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                pass  # ended meanwhile
    except OSError as exc:
        raise SimError(f"sim device {device.spec.name}: cannot set a CPU quota in {group}: {exc}") from exc


def _remove_cgroup(device: SimDevice) -> None:
    """A device's cpu group goes with it (its processes are gone; rmdir refuses a group still in use)."""
    group = _cgroup(device)
    for _ in range(50):  # the killed processes leave the group a moment after their signal: bounded retries
        if not group.is_dir():
            return
        try:
            group.rmdir()
        except OSError:
            time.sleep(0.02)


def _change_driver(device: SimDevice, driver: str) -> None:
    if driver not in POCL_DEVICES:
        raise InputError(None, "--driver", f"expected one of {', '.join(POCL_DEVICES)}, got {driver!r}")
    if device.spec.server != "openssh":
        raise SimError(f"sim device {device.spec.name}: only an OpenSSH device changes its driver in place "
                       "(dropbear keeps the environment it started with)")
    config = Path(device.folder) / "sshd_config"
    lines = config.read_text().splitlines()
    old = f"POCL_DEVICES={device.spec.pocl_device}"
    lines = [line.replace(old, f"POCL_DEVICES={driver}") if line.startswith("SetEnv ") else line for line in lines]
    config.write_text("\n".join(lines) + "\n")
    device.spec = replace(device.spec, pocl_device=driver)
    if _alive(device.pid):
        os.kill(device.pid, signal.SIGHUP)  # the script exec'd sshd: it re-executes itself, reads its config
        time.sleep(0.2)
        _wait_ready(device, time.monotonic() + START_TIMEOUT_S)


def _start_proxy(device: SimDevice) -> None:
    """The delay proxy on 127.0.0.1:`device.port` in front of the server; its own process and session."""
    folder = Path(device.folder)
    stats = folder / "proxy-stats.json"
    stats.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "deployer.sim.netsim", "proxy", "--listen", f"127.0.0.1:{device.port}",
            "--to", f"{device.server_host}:{device.server_port}", "--delay-ms", str(device.rtt_ms / 2),
            "--stats", str(stats), "--cut-after-bytes", str(device.spec.cut_after_bytes)]
    with open(folder / "proxy.log", "ab") as out:
        device.proxy_pid = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=child_env(), start_new_session=True).pid
    device.proxy_stats = str(stats)


def _make_home(home: Path, client_key: bytes, ids: tuple[int, int]) -> None:
    """The account's home as the device sees it: ~/.ssh/authorized_keys (OpenSSH and dropbear read it)."""
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    (home / POCL_CACHE_MOUNT).mkdir(exist_ok=True)
    (ssh / "authorized_keys").write_bytes(client_key)
    for path in (home, ssh, ssh / "authorized_keys", home / POCL_CACHE_MOUNT):
        os.chown(path, *ids)
    os.chmod(ssh, 0o700)
    os.chmod(ssh / "authorized_keys", 0o600)


def _wait_ready(device: SimDevice, deadline: float) -> None:
    """Bounded wait until the device's server sends its SSH banner, and its proxy (if any) listens."""
    while time.monotonic() < deadline:
        if not _alive(device.pid):
            logs = [Path(device.folder) / "start.log", Path(device.log)]
            text = " ".join(p.read_text()[-400:].strip() for p in logs if p.exists())
            raise SimError(f"sim device {device.spec.name} exited: {text}")
        try:
            with socket.create_connection((device.server_host, device.server_port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        raise SimError(f"sim device {device.spec.name} did not accept SSH within {START_TIMEOUT_S} s")
    if device.proxy_pid is not None:
        _wait_proxy(device, deadline)


def _wait_proxy(device: SimDevice, deadline: float) -> None:
    """The proxy writes its stats file once it listens (no probe connection, which it would count)."""
    assert device.proxy_pid is not None and device.proxy_stats is not None
    while time.monotonic() < deadline:
        if not _alive(device.proxy_pid):
            log = Path(device.folder) / "proxy.log"
            raise SimError(f"sim device {device.spec.name}: its proxy exited: "
                                  f"{log.read_text()[-400:].strip() if log.exists() else ''}")
        try:
            if netsim.read_stats(Path(device.proxy_stats)).get("pid") == device.proxy_pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise SimError(f"sim device {device.spec.name}: its proxy did not listen within {START_TIMEOUT_S} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still "exists": reap it if it has exited.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _host_pattern(host: str, port: int) -> str:
    """How known_hosts (and paramiko) name a host: bare on port 22, else `[host]:port`."""
    return host if port == 22 else f"[{host}]:{port}"


def _write_known_hosts(fleet: Fleet) -> None:
    lines = []
    for device in fleet.devices:
        key = (Path(device.folder) / "host_ed25519.pub").read_text().split()
        lines.append(f"{_host_pattern(device.host, device.port)} {key[0]} {key[1]}\n")
    fleet.known_hosts.write_text("".join(lines))


# MACE's programs enable cl_khr_fp16 (common.h), which PoCL lacks, and MACE builds them with -Werror: PoCL must
# drop warnings for them to build at all (it refuses -Wno-*). A fleet seen through an OpenCL library (the MACE
# shim) is one that builds MACE's programs.
MACE_POCL_ENV = {"POCL_EXTRA_BUILD_FLAGS": "-w"}


def _write_inventory(fleet: Fleet, opencl_library: str | None = None) -> None:
    defaults: dict[str, Any] = {
        "user": SIM_USER,
        "identity_file": str(fleet.folder / "client_key"),
        "remote_dir": "~/.deployer",
        "ssh": {"known_hosts": str(fleet.known_hosts)},
        "timeouts": {"connect": 10, "command": 300},
    }
    if opencl_library is not None:
        defaults["opencl"] = {"library": opencl_library}
        defaults["env"] = dict(MACE_POCL_ENV)
    inventory = {
        "defaults": defaults,
        "devices": [
            {"name": d.spec.name, "host": d.host, "port": d.port,
             "labels": {"pocl_device": d.spec.pocl_device, "server": d.spec.server}}
            for d in fleet.devices
        ],
        "groups": {"sim": {"members": [d.spec.name for d in fleet.devices]}},
    }
    text = "# written by `deploy sim up`: a simulated fleet of real SSH servers (docs/sim.md)\n"
    fleet.inventory.write_text(text + yaml.safe_dump(inventory, sort_keys=False))


def _save_state(fleet: Fleet) -> None:
    state = {"devices": [asdict(d) for d in fleet.devices]}
    temp = fleet.folder / "state.json.tmp"
    temp.write_text(json.dumps(state, indent=1))
    os.replace(temp, fleet.folder / "state.json")


def load_fleet(folder: Path) -> Fleet:
    path = folder / "state.json"
    if not path.exists():
        return Fleet(folder)
    state = json.loads(path.read_text())
    devices = [SimDevice(**{**d, "spec": DeviceSpec(**d["spec"])}) for d in state["devices"]]
    return Fleet(folder, devices)


def start_fleet(folder: Path, specs: Sequence[DeviceSpec], *, pocl_cache: Path | None = None, rtt_ms: int = 0,
                rate_kbit: int = 0, proxy: bool = False, opencl_library: str | None = None) -> Fleet:
    """Start one server per spec; return when every device answers SSH (or raise, stopping them).

    `rtt_ms` > 0 puts a delay proxy in front of each device (half of it each way); `proxy` puts one there
    even at 0 ms, to count bytes (the benchmarks); `rate_kbit` > 0 gives each device a network namespace
    whose veth pair is limited to that rate in each direction. `opencl_library`: the inventory's
    `opencl.library` for every device (an absolute path they can read), with MACE_POCL_ENV."""
    if rtt_ms < 0 or rate_kbit < 0:
        raise InputError(None, "rtt_ms", f"sim: rtt_ms and rate_kbit must not be negative (got {rtt_ms}, {rate_kbit})")
    folder = folder.resolve()
    if load_fleet(folder).devices:
        stop_fleet(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SimError(f"cannot create the sim folder {folder}: {exc.strerror}") from exc
    ids = ensure_sim_user()
    _keygen(folder / "client_key", "deploy-sim-client")
    if pocl_cache is not None:
        pocl_cache.mkdir(parents=True, exist_ok=True)
        os.chown(pocl_cache, *ids)
    fleet = Fleet(folder)
    try:
        for spec in specs:
            try:
                _start_device(spec, folder, ids, pocl_cache, rtt_ms=rtt_ms, rate_kbit=rate_kbit,
                              started=fleet.devices, proxy=proxy)
            finally:
                _save_state(fleet)
        deadline = time.monotonic() + START_TIMEOUT_S
        for device in fleet.devices:
            _wait_ready(device, deadline)
    except BaseException:
        stop_fleet(folder)
        raise
    _write_known_hosts(fleet)
    _write_inventory(fleet, opencl_library)
    return fleet


def restart_proxy(fleet: Fleet, name: str, *, cut_after_bytes: int = 0) -> SimDevice:
    """Replace a device's proxy by a new one on the same port (now cutting after `cut_after_bytes`, or not)."""
    device = fleet.device(name)
    if device.proxy_pid is None:
        raise SimError(f"sim device {name} has no proxy in front")
    _stop_pid(device.proxy_pid, group=False)
    device.spec = replace(device.spec, cut_after_bytes=cut_after_bytes)
    _start_proxy(device)
    _save_state(fleet)
    _wait_proxy(device, time.monotonic() + START_TIMEOUT_S)
    return device


def proxy_stats(device: SimDevice) -> dict[str, Any]:
    """The counters of the device's proxy: `connections`, `client_to_server_bytes`, `server_to_client_bytes`,
    `cuts`, ... (`deployer.netsim.Stats`); raises if no proxy is in front of it."""
    if device.proxy_stats is None:
        raise SimError(f"sim device {device.spec.name} has no proxy in front (start it with rtt_ms > 0)")
    try:
        return netsim.read_stats(Path(device.proxy_stats))
    except (OSError, ValueError) as exc:
        raise SimError(f"sim device {device.spec.name}: cannot read {device.proxy_stats}: {exc}") from exc


def _stop_pid(pid: int, *, group: bool, timeout: float = 5.0) -> None:
    """SIGTERM (to the process group when `group`), a bounded wait, then SIGKILL."""
    kill = os.killpg if group else os.kill
    try:
        kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def namespace_pids(pid: int) -> list[int]:
    """The processes in the mount namespace of `pid` (a device's server): the server, each connection's
    server processes (sshd puts them in sessions of their own) and what they run; [] if `pid` is gone."""
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        if namespace == os.readlink("/proc/self/ns/mnt"):
            return []  # not a device (its PID was reused by a process of ours): never the host's processes
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def stop_device(device: SimDevice, *, timeout: float = 5.0) -> None:
    """Stop one device: its server's process group, then the processes its connections left in its namespace
    (their own sessions), and its proxy by PID; then delete its network namespace and veth by name."""
    if device.pid:
        sessions = [p for p in namespace_pids(device.pid) if p != device.pid]
        _stop_pid(device.pid, group=True, timeout=timeout)
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if device.proxy_pid is not None:
        _stop_pid(device.proxy_pid, group=False, timeout=timeout)
    netsim.remove_link(device.netns, device.veth)
    _remove_cgroup(device)


def stop_fleet(folder: Path) -> int:
    """Stop every device recorded in `folder`; returns how many were running."""
    fleet = load_fleet(folder)
    running = [d for d in fleet.devices if d.pid and _alive(d.pid)]
    for device in fleet.devices:
        stop_device(device)
    state = folder / "state.json"
    if state.exists():
        state.unlink()
    return len(running)


def fleet_status(folder: Path) -> list[dict[str, object]]:
    fleet = load_fleet(folder)
    return [
        {"name": d.spec.name, "host": d.host, "port": d.port, "pid": d.pid, "running": _alive(d.pid),
         "pocl_device": d.spec.pocl_device, "server": d.spec.server, "server_address":
         f"{d.server_host}:{d.server_port}", "rtt_ms": d.rtt_ms, "rate_kbit": d.rate_kbit,
         "proxy_pid": d.proxy_pid, "proxy_running": d.proxy_pid is not None and _alive(d.proxy_pid),
         "netns": d.netns}
        for d in fleet.devices
    ]
