"""A device's commands run through the connection master (`connect/master.py`), which keeps its SSH
connection open between runs, as OpenSSH's ControlMaster does (docs/design.md section 15).

The first run that needs the master starts it, detached; later runs find its socket and check it is this
user's own. A socket nobody answers on (its master died) is stale: a new master replaces it. A socket or
folder of another user, or something else answering there, is foreign: it is never used, the run says so
once and connects directly. A master that goes away between two commands costs nothing but a fresh
connection: nothing had run on the command it was asked for.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from deployer import child_env
from deployer.config.inventory import Device
from deployer.connect import muxwire as wire
from deployer.connect.channel import READ_CHUNK, STDERR_TAIL, BufferedReader, Channel, Transport
from deployer.connect.deadline import Deadline, backoff_delays, current_deadline, raise_if_expired
from deployer.errors import CommandTimeout, TransportError

MASTER_START_S = 10.0  # a new master answers within this (a Python start and Paramiko's import), or none is used
HELLO_TIMEOUT_S = 5.0
SEND_SLICE = 1 << 18

_lock = threading.Lock()
_found: dict[str, Path | None] = {}  # this process's answer, by socket path: the master's socket, or None


def master_socket() -> Path | None:
    """The socket of this user's master for this code, started if none answers; None (said once, on stderr)
    when none can be used: the devices are then reached directly."""
    digest = wire.code_digest()
    path = wire.socket_path(digest)
    with _lock:
        if str(path) not in _found:
            _found[str(path)] = _find_or_start(path, digest)
        return _found[str(path)]


def forget(path: Path) -> None:
    """The master at `path` is gone: the next `master_socket()` looks (and starts one) again."""
    with _lock:
        _found.pop(str(path), None)


def _note(message: str) -> None:
    print(f"deploy: {message}", file=sys.stderr)


def _find_or_start(path: Path, digest: str) -> Path | None:
    try:
        wire.own_folder(path.parent, create=True)
        if hello(path, digest) is None:
            start_master(path)
            end = time.monotonic() + MASTER_START_S
            while hello(path, digest) is None:
                if time.monotonic() > end:
                    raise wire.Foreign(f"no connection master answered at {path} within {MASTER_START_S:g} s "
                                       f"(see {path.with_suffix('.log')})")
                time.sleep(0.02)
        return path
    except (wire.Foreign, OSError) as exc:
        _note(f"not keeping connections open (ssh.persist): {exc}; connecting directly")
        return None


def dial(path: Path) -> socket.socket | None:
    """A connection to the master at `path`, checked to be this user's; None if nobody listens (stale or
    absent); Foreign if the socket or its peer is someone else's."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise wire.Foreign(f"{path} is not a socket of this user's (owner uid {info.st_uid})")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    if wire.peer_uid(sock) != os.getuid():
        sock.close()
        raise wire.Foreign(f"the process listening on {path} runs as another user")
    return sock


def _exchange(sock: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    """One request to the master on `sock` (closed after) and its answer line."""
    with sock:
        sock.settimeout(HELLO_TIMEOUT_S)
        wire.send_line(sock, request)
        return wire.read_line(sock, bytearray())


def hello(path: Path, digest: str) -> dict[str, Any] | None:
    """The master's hello (its pid, connections held, handshakes, reuses); None if none listens."""
    sock = dial(path)
    if sock is None:
        return None
    try:
        answer = _exchange(sock, {"op": "hello"})
    except (OSError, EOFError, ValueError) as exc:
        raise wire.Foreign(f"what listens on {path} does not answer as a connection master ({exc})") from exc
    if answer.get("deployer_master") != wire.PROTOCOL or answer.get("digest") != digest:
        raise wire.Foreign(f"what listens on {path} is not this deploy's connection master")
    return answer


def start_master(path: Path) -> subprocess.Popen[bytes]:
    """The master, detached from this run (its own session: Ctrl-C here does not reach it); its stderr goes
    to a log beside the socket. It imports the deployer this run imports."""
    with open(path.with_suffix(".log"), "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "deployer.connect.master", str(path)], cwd="/", env=child_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True, close_fds=True)


def stop_master(path: Path, digest: str) -> dict[str, Any] | None:
    """Ask the master at `path` to close its connections and exit; its hello, or None if none was there."""
    answer = hello(path, digest)
    sock = dial(path) if answer else None
    if sock is not None:
        _exchange(sock, {"op": "stop"})
    return answer


class MuxTransport:
    """A device's commands through the master; a direct connection once the master cannot be reached."""

    def __init__(self, device: Device, path: Path, *, accept_new_host_keys: bool = False) -> None:
        self._device, self._path, self._accept_new = device, path, accept_new_host_keys
        self._what = f"device {device.name!r}"
        self._deadline = current_deadline()
        self._lock = threading.Lock()
        self._channels: list[MuxChannel] = []
        self._direct: Transport | None = None
        self._closed = False
        self._unwatch = self._deadline.on_expiry(self.close) if self._deadline else None

    def exec(self, command: str) -> Channel:
        if self._direct is not None:
            return self._direct.exec(command)
        sock = self._dial()
        if sock is None:  # the master went away since this run found it: nothing ran yet, so a new master
            forget(self._path)  # (this run's next devices find it too), else a connection of this run's own
            path = master_socket()
            sock = self._dial() if path == self._path else None
        if sock is None:
            from deployer.connect.ssh import SshTransport  # Paramiko: only when needed (~50 ms)

            self._direct = SshTransport(self._device, accept_new_host_keys=self._accept_new)
            return self._direct.exec(command)
        channel = MuxChannel(sock, self._what, self._device.timeouts.command, self._deadline)
        with self._lock:
            self._channels.append(channel)
            closed = self._closed
        if closed:
            channel.close()
        channel.start({"op": "exec", "device": wire.device_wire(self._device), "accept_new": self._accept_new,
                       "persist": self._device.ssh.persist, "command": command}, self._answer_within())
        return channel

    def _dial(self) -> socket.socket | None:
        try:
            return dial(self._path)
        except (wire.Foreign, OSError):
            return None

    def _answer_within(self) -> float:
        """How long the master may take to answer: its connect, with every retry and backoff, and a margin."""
        device = self._device
        return (device.timeouts.connect * (device.connect_retries + 1)
                + sum(backoff_delays(device.connect_retries, device.timeouts.connect, jitter=False)) + HELLO_TIMEOUT_S)

    def close(self) -> None:
        """Close this run's channels (the master then closes theirs; the connection stays held); any thread."""
        with self._lock:
            self._closed = True
            channels, self._channels = self._channels, []
            unwatch, self._unwatch = self._unwatch, None
        for channel in channels:
            channel.close()
        if self._direct is not None:
            self._direct.close()
        if unwatch is not None:
            unwatch()


class MuxChannel(BufferedReader):
    """A command the master runs on the device, with the same interface as an SSH channel."""

    def __init__(self, sock: socket.socket, what: str, timeout: float, deadline: Deadline | None) -> None:
        super().__init__(what, timeout)
        self._sock, self._deadline = sock, deadline
        self._rx, self._out, self._stderr = bytearray(), bytearray(), bytearray()
        self._ended = False
        self._status: int | None = None
        self.bytes_sent = 0

    def start(self, request: dict[str, Any], within: float) -> None:
        """Send the request and read the master's answer. The master's connect error is raised as the same
        error a direct connect raises."""
        try:
            self._sock.settimeout(within)
            wire.send_line(self._sock, request)
            answer = wire.read_line(self._sock, self._rx)
        except TimeoutError as exc:
            raise_if_expired(self._deadline, exc)
            raise TransportError(f"{self._what}: the connection master did not answer within {within:g} s") from exc
        except (OSError, EOFError, ValueError) as exc:
            raise_if_expired(self._deadline, exc)
            raise TransportError(f"{self._what}: the connection master broke off ({exc})") from exc
        if answer.get("ok") is not True:
            raise wire.error_from_wire(answer.get("error"))

    def _frame(self, end: float) -> tuple[bytes, bytes] | None:
        """The next frame from the master, or None if none came by `end`."""
        while True:
            try:
                parsed = wire.next_frame(self._rx)
            except ValueError as exc:
                raise TransportError(f"{self._what}: the connection master sent a broken frame ({exc})") from exc
            if parsed is not None:
                return parsed
            left = end - time.monotonic()
            if left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(READ_CHUNK)
            except TimeoutError:
                return None
            except OSError as exc:
                raise_if_expired(self._deadline, exc)
                raise TransportError(f"{self._what}: connection lost while reading ({exc})") from exc
            if not chunk:
                raise_if_expired(self._deadline)
                raise TransportError(f"{self._what}: connection lost while reading (the connection master went away)")
            self._rx += chunk

    def _take(self, kind: bytes, payload: bytes) -> None:
        if kind == wire.STDOUT:
            self._out += payload
        elif kind == wire.STDERR:
            self._stderr += payload
            del self._stderr[:-STDERR_TAIL]
        elif kind == wire.STDOUT_END:
            self._ended = True
        elif kind == wire.STATUS and len(payload) == 4:
            self._status, self._ended = struct.unpack("!i", payload)[0], True
        elif kind == wire.LOST:
            raise_if_expired(self._deadline)
            cause = payload.decode("utf-8", "replace")[:500]
            raise TransportError(f"{self._what}: connection lost while reading ({cause})")
        else:
            raise TransportError(f"{self._what}: the connection master sent an unknown frame {kind!r}")

    def _recv(self, size: int, wait: float) -> bytes:
        end = time.monotonic() + wait
        while not self._out and not self._ended:
            parsed = self._frame(end)
            if parsed is None:
                raise_if_expired(self._deadline)
                raise CommandTimeout(f"{self._what}: no answer within {self._timeout:g} s")
            self._take(*parsed)
        data = bytes(self._out[:size])
        del self._out[:size]
        return data

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            self._sock.settimeout(self._timeout)
            for offset in range(0, len(view), SEND_SLICE):
                self._sock.sendall(wire.frame(wire.STDIN, bytes(view[offset: offset + SEND_SLICE])))
        except TimeoutError as exc:
            raise_if_expired(self._deadline, exc)
            raise CommandTimeout(f"{self._what}: could not send within {self._timeout:g} s") from exc
        except OSError as exc:
            raise_if_expired(self._deadline, exc)
            raise TransportError(f"{self._what}: connection lost while sending ({exc})") from exc
        self.bytes_sent += len(data)

    def close_input(self) -> None:
        try:
            self._sock.sendall(wire.frame(wire.STDIN_END))
        except OSError:
            pass

    def finish(self, timeout: float) -> tuple[int | None, str]:
        end = time.monotonic() + timeout
        try:
            while self._status is None:
                parsed = self._frame(end)
                if parsed is None:
                    break
                if parsed[0] != wire.STDOUT:  # what the caller did not read is dropped, not kept
                    self._take(*parsed)
        except TransportError:
            pass
        return self._status, self._stderr[-4096:].decode("utf-8", "replace")

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread
        except OSError:
            pass
        self._sock.close()
