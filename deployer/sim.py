"""A simulated fleet: one real OpenSSH `sshd` per device on 127.0.0.1, each its own little board.

Each device runs in a private mount namespace (`unshare -m`) where:
- the login account `deploysim` (unprivileged, so permission faults are real) has its own home,
  bind-mounted from `D/devices/<name>/home`, with no shell start-up files to slow each command;
- optional faults are made real, not faked: an overlay whiteout hides `python3` or `libOpenCL.so.1`
  exactly as a board without them looks, and a size-capped tmpfs makes the remote dir fill up.
The fleet writes `D/inventory.yml` (ready for `--fleet`), `D/known_hosts` and the client key. Processes
are stopped by the PIDs recorded in `D/state.json`. This is the code behind `deploy sim` and the tests.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from shlex import quote

import yaml

from deployer.errors import LocalStateError

SIM_USER = "deploysim"
SIM_HOME = Path("/home") / SIM_USER
SSHD = "/usr/sbin/sshd"
PYTHON_DIRS = ("/usr/bin", "/usr/local/bin")
OPENCL_LIB_DIR = "/usr/lib/x86_64-linux-gnu"
START_TIMEOUT_S = 15.0
POCL_CACHE_MOUNT = ".pocl-cache"


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """How one simulated board differs from a healthy one."""

    name: str
    pocl_device: str = "pthread"  # PoCL's POCL_DEVICES: "pthread" or "basic" give two fingerprints
    without_python: bool = False
    without_opencl: bool = False
    disk_kib: int = 0  # > 0: the remote dir is a tmpfs of this size


@dataclass(slots=True)
class SimDevice:
    spec: DeviceSpec
    port: int
    pid: int
    folder: str


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
        raise LocalStateError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
        raise LocalStateError(f"sim folder {folder} has ',' or ':', which overlay options cannot hold")
    return f"mount -t overlay overlay -o {quote(f'lowerdir={lower},upperdir={upper},workdir={work}')} {lower}"


def _python_names(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n == "python" or n.startswith("python3")] \
        if os.path.isdir(directory) else []


def _start_script(spec: DeviceSpec, folder: Path, uid: int, gid: int, pocl_cache: Path | None) -> str:
    home = folder / "home"
    lines = ["set -e", f"mount --bind {quote(str(home))} {SIM_HOME}"]
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
            f"mount -t tmpfs -o size={spec.disk_kib}k,uid={uid},gid={gid},mode=0755 tmpfs {remote}",
        ]
    lines.append(f"exec {SSHD} -D -f {quote(str(folder / 'sshd_config'))} -E {quote(str(folder / 'sshd.log'))}")
    return "\n".join(lines) + "\n"


def _sshd_config(spec: DeviceSpec, folder: Path, port: int, pocl_cache: Path | None) -> str:
    env = [f"POCL_DEVICES={spec.pocl_device}"]
    if pocl_cache is not None:
        env.append(f"POCL_CACHE_DIR={SIM_HOME / POCL_CACHE_MOUNT}")
    return "\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {folder / 'host_ed25519'}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AllowUsers {SIM_USER}",
        "StrictModes no", "UsePAM no", "UseDNS no", "PrintMotd no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "LogLevel VERBOSE", "MaxStartups 100:30:200", "MaxSessions 50",
        "Subsystem sftp /usr/lib/openssh/sftp-server",
        "SetEnv " + " ".join(env),
    ]) + "\n"


def _start_device(spec: DeviceSpec, fleet: Path, ids: tuple[int, int], pocl_cache: Path | None) -> SimDevice:
    folder = fleet / "devices" / spec.name
    home = folder / "home"
    _make_home(home, (fleet / "client_key.pub").read_bytes(), ids)
    _keygen(folder / "host_ed25519", spec.name)
    port = _free_port()
    (folder / "sshd_config").write_text(_sshd_config(spec, folder, port, pocl_cache))
    (folder / "start.sh").write_text(_start_script(spec, folder, *ids, pocl_cache))
    log = open(folder / "start.log", "wb")
    process = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", str(folder / "start.sh")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    return SimDevice(spec, port, process.pid, str(folder))


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
    """Bounded wait until the device's sshd sends its SSH banner."""
    while time.monotonic() < deadline:
        if not _alive(device.pid):
            logs = [Path(device.folder) / name for name in ("start.log", "sshd.log")]
            text = " ".join(p.read_text()[-400:].strip() for p in logs if p.exists())
            raise LocalStateError(f"sim device {device.spec.name} exited: {text}")
        try:
            with socket.create_connection(("127.0.0.1", device.port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise LocalStateError(f"sim device {device.spec.name} did not accept SSH within {START_TIMEOUT_S} s")


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


def _write_known_hosts(fleet: Fleet) -> None:
    lines = []
    for device in fleet.devices:
        key = (Path(device.folder) / "host_ed25519.pub").read_text().split()
        lines.append(f"[127.0.0.1]:{device.port} {key[0]} {key[1]}\n")
    fleet.known_hosts.write_text("".join(lines))


def _write_inventory(fleet: Fleet) -> None:
    inventory = {
        "defaults": {
            "user": SIM_USER,
            "identity_file": str(fleet.folder / "client_key"),
            "remote_dir": "~/.deployer",
            "ssh": {"known_hosts": str(fleet.known_hosts)},
            "timeouts": {"connect": 10, "command": 300},
        },
        "devices": [
            {"name": d.spec.name, "host": "127.0.0.1", "port": d.port,
             "labels": {"pocl_device": d.spec.pocl_device}}
            for d in fleet.devices
        ],
        "groups": {"sim": {"members": [d.spec.name for d in fleet.devices]}},
    }
    text = "# written by `deploy sim up`: a simulated fleet of real sshd servers on 127.0.0.1\n"
    fleet.inventory.write_text(text + yaml.safe_dump(inventory, sort_keys=False))


def _save_state(fleet: Fleet) -> None:
    state = {"devices": [asdict(d) for d in fleet.devices]}
    (fleet.folder / "state.json").write_text(json.dumps(state, indent=1))


def load_fleet(folder: Path) -> Fleet:
    path = folder / "state.json"
    if not path.exists():
        return Fleet(folder)
    state = json.loads(path.read_text())
    devices = [SimDevice(DeviceSpec(**d["spec"]), d["port"], d["pid"], d["folder"]) for d in state["devices"]]
    return Fleet(folder, devices)


def start_fleet(folder: Path, specs: Sequence[DeviceSpec], *, pocl_cache: Path | None = None) -> Fleet:
    """Start one sshd per spec; return when every device answers SSH (or raise, stopping them)."""
    folder = folder.resolve()
    if load_fleet(folder).devices:
        stop_fleet(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = ensure_sim_user()
    _keygen(folder / "client_key", "deploy-sim-client")
    if pocl_cache is not None:
        pocl_cache.mkdir(parents=True, exist_ok=True)
        os.chown(pocl_cache, *ids)
    fleet = Fleet(folder)
    try:
        for spec in specs:
            fleet.devices.append(_start_device(spec, folder, ids, pocl_cache))
        _save_state(fleet)
        deadline = time.monotonic() + START_TIMEOUT_S
        for device in fleet.devices:
            _wait_ready(device, deadline)
    except BaseException:
        stop_fleet(folder)
        raise
    _write_known_hosts(fleet)
    _write_inventory(fleet)
    return fleet


def stop_device(device: SimDevice, *, timeout: float = 5.0) -> None:
    """Stop one device's sshd (and its sessions: they share its process group) by PID."""
    try:
        os.killpg(device.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while _alive(device.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(device.pid):
        os.killpg(device.pid, signal.SIGKILL)


def stop_fleet(folder: Path) -> int:
    """Stop every device recorded in `folder`; returns how many were running."""
    fleet = load_fleet(folder)
    running = [d for d in fleet.devices if _alive(d.pid)]
    for device in fleet.devices:
        stop_device(device)
    state = folder / "state.json"
    if state.exists():
        state.unlink()
    return len(running)


def fleet_status(folder: Path) -> list[dict[str, object]]:
    fleet = load_fleet(folder)
    return [
        {"name": d.spec.name, "port": d.port, "pid": d.pid, "running": _alive(d.pid),
         "pocl_device": d.spec.pocl_device}
        for d in fleet.devices
    ]
