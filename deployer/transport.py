"""Reaching a device: one SSH connection (Paramiko) or the controller itself, and exec channels on it.

This is the only module that catches Paramiko, socket and OS errors; each becomes a `TransportError`
subclass that names the device and says what to do. Host keys are checked strictly against known_hosts:
an unknown key is refused with its fingerprint unless the device opts into accept-new (as OpenSSH's
`StrictHostKeyChecking=accept-new`), and a changed key is always refused.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import paramiko

from deployer.errors import AuthError, CommandTimeout, ConnectError, HostKeyError, TransportError
from deployer.inventory import Device

READ_CHUNK = 1 << 16

# Paramiko logs tracebacks of its own failures (a missing banner, a reset); ours say what happened, and
# Python's last-resort handler would otherwise print theirs on the user's terminal.
_paramiko_log = logging.getLogger("paramiko")
_paramiko_log.addHandler(logging.NullHandler())
_paramiko_log.propagate = False


class Channel(Protocol):
    """A running remote command: its stdin, stdout, exit status and stderr."""

    bytes_sent: int
    bytes_received: int

    def write(self, data: bytes) -> None: ...
    def read_line(self, limit: int) -> bytes: ...
    def read_exact(self, size: int) -> bytes: ...
    def close_input(self) -> None: ...
    def finish(self, timeout: float) -> tuple[int | None, str]: ...
    def close(self) -> None: ...


class Transport(Protocol):
    def exec(self, command: str) -> Channel: ...
    def close(self) -> None: ...


class _BufferedReader:
    """Line and exact-size reads over a `recv(n) -> bytes` function that returns b"" at EOF."""

    def __init__(self, what: str, timeout: float) -> None:
        self._buffer = bytearray()
        self._what, self._timeout = what, timeout
        self.bytes_received = 0

    def _recv(self, size: int) -> bytes:  # overridden
        raise NotImplementedError

    def _fill(self) -> bool:
        chunk = self._recv(READ_CHUNK)
        self.bytes_received += len(chunk)
        self._buffer += chunk
        return bool(chunk)

    def read_line(self, limit: int) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > limit:
                raise TransportError(f"{self._what}: a line longer than {limit} bytes")
            if not self._fill():
                line = bytes(self._buffer)
                self._buffer.clear()
                return line

    def read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                raise TransportError(
                    f"{self._what}: stream ended after {len(self._buffer)} of {size} bytes"
                )
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


class SshChannel(_BufferedReader):
    def __init__(self, channel: paramiko.Channel, what: str, timeout: float) -> None:
        super().__init__(what, timeout)
        self._channel = channel
        self._channel.settimeout(timeout)
        self.bytes_sent = 0

    def _recv(self, size: int) -> bytes:
        try:
            data = self._channel.recv(size)
        except TimeoutError as exc:
            raise CommandTimeout(f"{self._what}: no answer within {self._timeout:g} s") from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._lost("reading", exc) from exc
        if not data and not self._channel.eof_received:
            # Closed without the server's EOF: the connection itself died (a reset, a cut cable), not the
            # command; reporting it as the command's exit status (-1) would blame the agent.
            raise self._lost("reading", None)
        return data

    def write(self, data: bytes) -> None:
        try:
            self._channel.sendall(data)
        except TimeoutError as exc:
            raise CommandTimeout(f"{self._what}: could not send within {self._timeout:g} s") from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:  # paramiko raises a bare EOFError on a reset
            raise self._lost("sending", exc) from exc
        self.bytes_sent += len(data)

    def _lost(self, doing: str, exc: BaseException | None) -> TransportError:
        """The connection died: say so, with the socket's own error when paramiko kept it."""
        cause = str(exc or "") or getattr(self._channel.get_transport(), "saved_exception", None)
        return TransportError(f"{self._what}: connection lost while {doing}{f' ({cause})' if cause else ''}")

    def close_input(self) -> None:
        try:
            self._channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def finish(self, timeout: float) -> tuple[int | None, str]:
        """Exit status (None if it did not end within `timeout`) and the tail of stderr."""
        deadline = time.monotonic() + timeout
        while not self._channel.exit_status_ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        status = self._channel.recv_exit_status() if self._channel.exit_status_ready() else None
        stderr = b""
        try:
            while self._channel.recv_stderr_ready():
                stderr += self._channel.recv_stderr(READ_CHUNK)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        return status, stderr[-4096:].decode("utf-8", "replace")

    def close(self) -> None:
        try:
            self._channel.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the connection is already gone: nothing left to close politely


class LocalChannel(_BufferedReader):
    """A command run by `sh -c` on the controller, with the same interface as an SSH channel."""

    def __init__(self, command: str, what: str, timeout: float) -> None:
        super().__init__(what, timeout)
        self._process = subprocess.Popen(
            ["sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.bytes_sent = 0

    def _recv(self, size: int) -> bytes:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self._timeout)
        if not ready:
            raise CommandTimeout(f"{self._what}: no answer within {self._timeout:g} s")
        return os.read(fd, size)

    def write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(data)
            self._process.stdin.flush()
        except BrokenPipeError as exc:
            raise TransportError(f"{self._what}: the command closed its input") from exc
        self.bytes_sent += len(data)

    def close_input(self) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass

    def finish(self, timeout: float) -> tuple[int | None, str]:
        try:
            status: int | None = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        assert self._process.stderr is not None
        stderr = b""
        if status is not None:
            stderr = self._process.stderr.read()
        return status, stderr[-4096:].decode("utf-8", "replace")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if stream is not None:
                stream.close()


class LocalTransport:
    """`host: local`: the controller is the device; commands run under `sh -c`."""

    def __init__(self, device: Device) -> None:
        self._device = device

    def exec(self, command: str) -> LocalChannel:
        return LocalChannel(command, f"device {self._device.name!r}", self._device.timeouts.command)

    def close(self) -> None:
        pass


def known_hosts_name(host: str, port: int) -> str:
    """The name OpenSSH files a host under in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


def key_fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside `path`, so parallel workers never interleave known_hosts lines."""
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class SshTransport:
    """One SSH connection to one device, opened at construction, reused for every channel."""

    def __init__(self, device: Device, *, accept_new_host_keys: bool = False) -> None:
        self._device = device
        self._what = f"{device.host}:{device.port}"
        self._accept_new = accept_new_host_keys or device.ssh.host_key_checking == "accept-new"
        self._transport = self._connect()

    def _open_socket(self) -> socket.socket:
        device, timeout = self._device, self._device.timeouts.connect
        if device.proxy_jump:
            # Connecting directly instead would bypass what the user's ssh config asks for.
            raise ConnectError(f"{self._what} is reached through ProxyJump {device.proxy_jump!r}, "
                               "which deploy does not support yet")
        try:
            sock = socket.create_connection((device.host, device.port), timeout=timeout)
        except TimeoutError as exc:
            raise ConnectError(f"connect to {self._what} timed out after {timeout:g} s") from exc
        except ConnectionRefusedError as exc:
            raise ConnectError(f"connection to {self._what} refused (is sshd running?)") from exc
        except socket.gaierror as exc:
            raise ConnectError(f"cannot resolve host {device.host!r}: {exc.strerror}") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self._what}: {exc.strerror or exc}") from exc
        # Without TCP_NODELAY every request/reply exchange waits ~40 ms for a delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _connect(self) -> paramiko.Transport:
        timeout = self._device.timeouts.connect
        sock = self._open_socket()
        transport = paramiko.Transport(sock)
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        transport.auth_timeout = timeout
        known = self._load_known_hosts()
        names = known.lookup(known_hosts_name(self._device.host, self._device.port))
        if names:
            # Ask for a key type we already know, so a server with several keys shows the known one.
            transport.get_security_options().key_types = [t for t in names.keys()] + [
                t for t in transport.get_security_options().key_types if t not in names.keys()
            ]
        try:
            transport.start_client(timeout=timeout)
            # start_client returns quietly when its timeout ends first: check the session exists.
            transport.get_remote_server_key()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            transport.close()
            raise ConnectError(
                f"{self._what} accepted the TCP connection but the SSH handshake failed "
                f"within {timeout:g} s ({exc or type(exc).__name__})"
            ) from exc
        try:
            self._check_host_key(transport, known)
            self._authenticate(transport)
        except TransportError:
            transport.close()
            raise
        return transport

    def _known_hosts_path(self) -> Path:
        return Path(os.path.expanduser(self._device.ssh.known_hosts))

    def _load_known_hosts(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        path = self._known_hosts_path()
        if path.exists():
            try:
                keys.load(str(path))
            except (OSError, paramiko.SSHException) as exc:
                raise HostKeyError(f"cannot read known_hosts {path}: {exc}") from exc
        return keys

    def _check_host_key(self, transport: paramiko.Transport, known: paramiko.HostKeys) -> None:
        key = transport.get_remote_server_key()
        name = known_hosts_name(self._device.host, self._device.port)
        entry = known.lookup(name)
        path = self._known_hosts_path()
        if entry and key.get_name() in entry:
            if entry[key.get_name()] == key:
                return
            raise HostKeyError(
                f"host key for {name} CHANGED: known_hosts {path} has "
                f"{key_fingerprint(entry[key.get_name()])}, the server offers {key.get_name()} "
                f"{key_fingerprint(key)}; if the device was reinstalled, remove the old key with "
                f"ssh-keygen -R '{name}' -f {path}"
            )
        if entry:
            raise HostKeyError(
                f"host {name} offered a {key.get_name()} key but known_hosts {path} has only "
                f"{', '.join(entry.keys())}: refusing, as OpenSSH would"
            )
        if not self._accept_new:
            raise HostKeyError(
                f"unknown host key for {name}: {key.get_name()} {key_fingerprint(key)} is not in "
                f"{path}; if that fingerprint is right, accept it with --accept-new-host-keys "
                f"(or ssh.host_key_checking: accept-new), or add it with "
                f"ssh-keyscan -p {self._device.port} {self._device.host} >> {path}"
            )
        self._remember_host_key(path, name, key)

    def _remember_host_key(self, path: Path, name: str, key: paramiko.PKey) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                with open(path, "a") as out:
                    out.write(f"{name} {key.get_name()} {key.get_base64()}\n")
                    out.flush()
                    os.fsync(out.fileno())
        except OSError as exc:
            raise HostKeyError(f"cannot add the host key of {name} to {path}: {exc}") from exc

    def _candidate_keys(self) -> list[tuple[str, paramiko.PKey]]:
        files = [self._device.identity_file] if self._device.identity_file else [
            os.path.expanduser(f"~/.ssh/{name}") for name in ("id_ed25519", "id_ecdsa", "id_rsa")
        ]
        keys: list[tuple[str, paramiko.PKey]] = []
        for file in files:
            if not os.path.exists(file):
                if self._device.identity_file:
                    raise AuthError(f"identity file {file} does not exist")
                continue
            try:
                keys.append((file, paramiko.PKey.from_path(file)))
            except (OSError, paramiko.SSHException, ValueError) as exc:
                raise AuthError(f"cannot read identity file {file}: {exc}") from exc
        try:
            keys += [("ssh-agent", key) for key in paramiko.Agent().get_keys()]
        except (OSError, paramiko.SSHException):
            pass
        return keys

    def _authenticate(self, transport: paramiko.Transport) -> None:
        user = self._device.user
        tried = []
        for source, key in self._candidate_keys():
            try:
                transport.auth_publickey(user, key)
            except paramiko.AuthenticationException:
                tried.append(source)
                continue
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise AuthError(f"authentication with {self._what} broke off: {exc}") from exc
            if transport.is_authenticated():
                return
        raise AuthError(
            f"{self._what} refused every key for user {user!r} (tried: {', '.join(tried) or 'none found'})"
        )

    def exec(self, command: str) -> SshChannel:
        try:
            channel = self._transport.open_session(timeout=self._device.timeouts.connect)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TransportError(f"{self._what}: cannot start a command ({exc})") from exc
        return SshChannel(channel, f"device {self._device.name!r}", self._device.timeouts.command)

    def close(self) -> None:
        self._transport.close()


def open_transport(device: Device, *, accept_new_host_keys: bool = False) -> Transport:
    """The transport for a device: the controller itself for `host: local`, else SSH."""
    if device.is_local:
        return LocalTransport(device)
    return SshTransport(device, accept_new_host_keys=accept_new_host_keys)
