"""What the connection master (`connect/master.py`) and its clients (`connect/mux.py`) share: where its socket
lives and how a client makes sure it is ours, the frames on that socket, and a device's connection settings
and errors as JSON (docs/design.md section 15).

The socket is the master's only door, and whoever can open it runs commands on every board the master holds:
so its folder must be the user's own (mode 0700, as tmux and OpenSSH's ControlPath expect), and each end
asks the kernel who the other is (SO_PEERCRED) and talks only to its own user.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any

from deployer.config.inventory import Device, OpenCLSelection, SshOptions, Timeouts
from deployer.config.sshconfig import JumpHost
from deployer.errors import AuthError, CommandTimeout, ConnectError, HostKeyError, TransportError, Where

PROTOCOL = 1
MAX_LINE = 1 << 16  # a request or answer line (a device's settings and a command: a few KiB)
MAX_FRAME = 1 << 20
HEADER = struct.Struct("!cI")  # a frame: its kind (one byte) and payload length

# Frames. Client to master: stdin data, stdin closed. Master to client: stdout data, stderr data, stdout
# ended, exit status (4 bytes, signed), connection lost (its reason).
STDIN, STDIN_END = b"d", b"e"
STDOUT, STDERR, STDOUT_END, STATUS, LOST = b"o", b"x", b"E", b"s", b"L"

_ERRORS: dict[str, type[TransportError]] = {
    cls.__name__: cls for cls in (TransportError, ConnectError, AuthError, HostKeyError, CommandTimeout)
}


class Foreign(Exception):
    """The socket, its folder or whoever answers on it is not this user's master: never used."""


def socket_folder() -> Path:
    """`DEPLOY_MUX_DIR`, else `$XDG_RUNTIME_DIR/deployer` (per user, on tmpfs), else /tmp/deployer-UID."""
    chosen = os.environ.get("DEPLOY_MUX_DIR")
    if chosen:
        return Path(chosen)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "deployer" if runtime else Path(f"/tmp/deployer-{os.getuid()}")


@functools.cache
def _source_digest() -> str:
    """deployer/connect's source, read once a process (a run asks for every device it connects to)."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.name.encode() + b"\0" + module.read_bytes())
    return digest.hexdigest()


def code_digest() -> str:
    """A digest of the code both ends run and of what a connection depends on beyond its device's settings
    (the Python, the SSH agent): a master started by other code or for another agent is not spoken to."""
    parts = f"{PROTOCOL} {sys.executable} {os.environ.get('SSH_AUTH_SOCK', '')} {_source_digest()}"
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


def socket_path(digest: str) -> Path:
    return socket_folder() / f"master-{digest}.sock"


def own_folder(folder: Path, *, create: bool) -> None:
    """Make sure `folder` is this user's alone (created 0700 if `create`); Foreign if not."""
    if create:
        try:
            folder.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise Foreign(f"{folder} is not a folder of this user's alone (owner uid {info.st_uid}, mode "
                      f"{stat.S_IMODE(info.st_mode):o}; it must be uid {os.getuid()}, mode 700)")


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket, as the kernel knows it."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def send_line(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def read_line(sock: socket.socket, rest: bytearray) -> dict[str, Any]:
    """One JSON line; bytes after it stay in `rest` (the first frames may come in the same read)."""
    while b"\n" not in rest:
        if len(rest) > MAX_LINE:
            raise ValueError("a line longer than the protocol allows")
        chunk = sock.recv(MAX_LINE)
        if not chunk:
            raise EOFError("the other end closed the socket")
        rest += chunk
    end = rest.index(b"\n")
    message = json.loads(bytes(rest[:end]))
    del rest[: end + 1]
    if not isinstance(message, dict):
        raise ValueError("a line that is not a JSON object")
    return message


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def next_frame(buffer: bytearray) -> tuple[bytes, bytes] | None:
    """The first whole frame in `buffer` (taken out of it), or None while it is incomplete."""
    if len(buffer) < HEADER.size:
        return None
    kind, size = HEADER.unpack_from(buffer)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes")
    if len(buffer) < HEADER.size + size:
        return None
    payload = bytes(buffer[HEADER.size: HEADER.size + size])
    del buffer[: HEADER.size + size]
    return kind, payload


def device_wire(device: Device) -> dict[str, Any]:
    """What reaching `device` depends on (its connection's key at the master); nothing else of it."""
    return {
        "name": device.name, "host": device.host, "port": device.port, "user": device.user,
        "identity_file": device.identity_file,
        "jumps": [[j.spec, j.host, j.port, j.user, j.identity_file] for j in device.jumps],
        "known_hosts": device.ssh.known_hosts, "host_key_checking": device.ssh.host_key_checking,
        "agent": device.ssh.agent, "connect": device.timeouts.connect, "command": device.timeouts.command,
        "retries": device.connect_retries,
    }


def device_from_wire(wire: dict[str, Any]) -> Device:
    """The device a master connects to: the settings `device_wire` sent, nothing else set."""
    return Device(
        name=str(wire["name"]), host=str(wire["host"]), port=int(wire["port"]), user=str(wire["user"]),
        identity_file=wire["identity_file"], python="python3", remote_dir="~/.deployer",
        opencl=OpenCLSelection(),
        ssh=SshOptions(str(wire["known_hosts"]), str(wire["host_key_checking"]), {}, bool(wire["agent"])),
        timeouts=Timeouts(float(wire["connect"]), float(wire["command"])),
        env={}, labels={}, vars={}, groups=(), where=Where("<connection master>"), proxy_jump=None,
        is_local=False, connect_retries=int(wire["retries"]),
        jumps=tuple(JumpHost(str(s), str(h), int(p), str(u), i) for s, h, p, u, i in wire["jumps"]),
    )


def connection_key(wire: dict[str, Any], accept_new: bool) -> str:
    """Requests with the same key share one connection (as OpenSSH's ControlPath `%C`)."""
    shared = {k: v for k, v in wire.items() if k not in ("name", "command")}
    return hashlib.sha256(json.dumps([shared, accept_new], sort_keys=True).encode()).hexdigest()


def error_wire(exc: TransportError) -> dict[str, Any]:
    kind = type(exc).__name__ if type(exc).__name__ in _ERRORS else "TransportError"
    return {"class": kind, "message": exc.message, "transient": bool(getattr(exc, "transient", False))}


def error_from_wire(wire: object) -> TransportError:
    """The error the master met, as the same class a direct connection raises; anything malformed is a
    TransportError saying so (the master is ours, but its answer is still checked)."""
    if not (isinstance(wire, dict) and isinstance(wire.get("message"), str) and wire.get("class") in _ERRORS):
        return TransportError(f"the connection master answered with a malformed error: {str(wire)[:200]}")
    error = _ERRORS[wire["class"]](wire["message"])
    if isinstance(error, ConnectError):
        error.transient = bool(wire.get("transient"))
    return error
