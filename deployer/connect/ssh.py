"""One SSH connection per device (Paramiko), and exec channels on it.

This is the only module that catches Paramiko, socket and OS errors; each becomes a `TransportError`
subclass that names the device and says what to do. Host keys are checked strictly against known_hosts:
an unknown key is refused with its fingerprint unless the device opts into accept-new (as OpenSSH's
`StrictHostKeyChecking=accept-new`), and a changed key is always refused.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deployer.config.files import unfit_file
from deployer.config.inventory import Device
from deployer.connect.channel import READ_CHUNK, STDERR_TAIL, BufferedReader
from deployer.connect.deadline import Deadline, backoff_delays, current_deadline, raise_if_expired
from deployer.errors import AuthError, CommandTimeout, ConnectError, HostKeyError, TransportError

# paramiko.config imports invoke (~35 ms at every start, on a push's critical path) only to run ssh_config's
# `Match exec`; the tool reads ssh_config itself (config/sshconfig.py), so invoke is kept out of that one import.
_INVOKE_KEPT_OUT = "invoke" not in sys.modules
if _INVOKE_KEPT_OUT:
    sys.modules["invoke"] = None  # type: ignore[assignment]
import paramiko  # noqa: E402  (after the line above, on purpose)

if _INVOKE_KEPT_OUT:
    del sys.modules["invoke"]  # anyone importing invoke later gets the real one


SEND_SLICE = 1 << 16  # at least one SSH packet's worth; what `send` does not take is offered again
MAX_KEY_FILE = 1 << 20  # a private key is a few KiB; anything far larger is not one

# Paramiko logs tracebacks of its own failures (a missing banner, a reset); ours say what happened, and
# Python's last-resort handler would otherwise print theirs on the user's terminal.
_paramiko_log = logging.getLogger("paramiko")

_paramiko_log.addHandler(logging.NullHandler())

_paramiko_log.propagate = False


STDERR_POLL_S = 0.1  # how often a waiting read drains stderr


class SshChannel(BufferedReader):
    def __init__(self, channel: paramiko.Channel, what: str, timeout: float, deadline: Deadline | None = None) -> None:
        super().__init__(what, timeout)
        self._channel = channel
        self._channel.settimeout(timeout)
        self._deadline = deadline
        self.bytes_sent = 0
        self._stderr = bytearray()  # the tail of what the command wrote on stderr

    def _recv(self, size: int, wait: float) -> bytes:
        end = time.monotonic() + wait
        try:
            while True:
                # stderr shares the channel's window with stdout: unread, a chatty driver or a flood on it
                # would stall the replies until the timeout. It is drained while waiting, its tail kept.
                self._drain_stderr()
                self._channel.settimeout(max(min(end - time.monotonic(), STDERR_POLL_S), 0.01))
                try:
                    data = self._channel.recv(size)
                    break
                except TimeoutError:
                    if time.monotonic() >= end:
                        raise
        except TimeoutError as exc:
            raise_if_expired(self._deadline, exc)
            raise CommandTimeout(f"{self._what}: no answer within {self._timeout:g} s") from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise_if_expired(self._deadline, exc)
            raise self._lost("reading", exc) from exc
        if not data:
            raise_if_expired(self._deadline)
            if not self._channel.eof_received:
                # Closed without the server's EOF: the connection itself died (a reset, a cut cable), not
                # the command; reporting it as the command's exit status (-1) would blame the agent.
                raise self._lost("reading", None)
        return data

    def write(self, data: bytes) -> None:
        try:
            self._send_all(data)
        except TimeoutError as exc:
            raise_if_expired(self._deadline, exc)
            raise CommandTimeout(f"{self._what}: could not send within {self._timeout:g} s") from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:  # paramiko raises a bare EOFError on a reset
            raise_if_expired(self._deadline, exc)
            raise self._lost("sending", exc) from exc
        self.bytes_sent += len(data)

    def _send_all(self, data: bytes) -> None:
        """Paramiko's `sendall` re-slices the remaining bytes after every packet (`s = s[sent:]`): a 16 MiB
        file copied ~500 times over. Send bounded slices of a view instead: each byte is copied once.
        The channel's timeout is the command's again first: a read leaves it at its short stderr poll, and a
        send that waits for the board's window (a slow link or a busy board) then failed within 0.1 s as
        "could not send within 300 s"."""
        self._channel.settimeout(self._timeout)
        view, offset = memoryview(data), 0
        while offset < len(view):
            offset += self._channel.send(bytes(view[offset: offset + SEND_SLICE]))

    def _lost(self, doing: str, exc: BaseException | None) -> TransportError:
        """The connection died: say so, with the socket's own error when paramiko kept it."""
        saved = getattr(self._channel.get_transport(), "saved_exception", None)
        cause = str(exc or "") or str(saved or "")
        if not cause and isinstance(exc or saved, EOFError):  # a bare EOFError() would print as "()"
            cause = "the SSH server closed the connection"
        return TransportError(f"{self._what}: connection lost while {doing}{f' ({cause})' if cause else ''}")

    def close_input(self) -> None:
        try:
            self._channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def finish(self, timeout: float) -> tuple[int | None, str]:
        """Exit status (None if it did not end within `timeout`) and the tail of stderr."""
        deadline = time.monotonic() + timeout
        while not self._channel.exit_status_ready() and time.monotonic() < deadline and not self._channel.closed:
            time.sleep(0.01)
        status = self._channel.recv_exit_status() if self._channel.exit_status_ready() else None
        try:
            self._drain_stderr()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        return status, self._stderr[-4096:].decode("utf-8", "replace")

    def _drain_stderr(self) -> None:
        while self._channel.recv_stderr_ready():
            self._stderr += self._channel.recv_stderr(READ_CHUNK)
            del self._stderr[:-STDERR_TAIL]

    def close(self) -> None:
        try:
            self._channel.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the connection is already gone: nothing left to close politely


def known_hosts_name(host: str, port: int) -> str:
    """The name OpenSSH files a host under in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


def key_fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@contextmanager
def locked_file(path: Path) -> Iterator[None]:
    """An exclusive lock beside `path`, so parallel workers never interleave known_hosts lines."""
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """One SSH server on the way: a jump host or the device itself."""

    host: str
    port: int
    user: str
    identity_file: str | None
    jump: str | None = None  # the hop as written, for a jump host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        return f"jump host {self.jump!r} ({self.address})" if self.jump else self.address


class SshTransport:
    """One SSH connection to one device, opened at construction (through its jump hosts, if any), reused
    for every channel. Connecting is retried after a transient failure (refused, reset, timed out, no
    banner): nothing has run on the device yet. A failed host key check or authentication is never retried.
    Under a device deadline (`deployer.fleet.current_deadline`), expiry closes the connection from the
    deadline's timer thread, and whatever was waiting on it raises `DeadlineExceeded`."""

    def __init__(self, device: Device, *, accept_new_host_keys: bool = False) -> None:
        self._device = device
        self._what = f"{device.host}:{device.port}"
        self._accept_new = accept_new_host_keys or device.ssh.host_key_checking == "accept-new"
        self._deadline = current_deadline()
        self._lock = threading.Lock()
        self._open: list[paramiko.Transport] = []  # this attempt's transports: jump hosts first, the device last
        self._closed = False
        self._unwatch: Callable[[], None] | None = None
        if self._deadline is not None:  # set before: a deadline already past calls close() right here
            self._unwatch = self._deadline.on_expiry(self.close)
        try:
            self._transport = self._connect_with_retries()
        except BaseException:
            self.close()
            raise

    def _connect_with_retries(self) -> paramiko.Transport:
        device = self._device
        delays = backoff_delays(device.connect_retries, device.timeouts.connect)
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._connect_once()
            except TransportError as exc:
                self._close_attempt()
                raise_if_expired(self._deadline, exc)
                if not (isinstance(exc, ConnectError) and exc.transient) or attempt > len(delays):
                    raise _after_attempts(exc, attempt) from exc
                if self._deadline is not None and self._deadline.sleep(delays[attempt - 1]):
                    raise_if_expired(self._deadline, exc)
                elif self._deadline is None:
                    time.sleep(delays[attempt - 1])

    def _connect_timeout(self) -> float:
        timeout = self._device.timeouts.connect
        return min(timeout, max(0.05, self._deadline.remaining())) if self._deadline else timeout

    def _connect_once(self) -> paramiko.Transport:
        device = self._device
        via: paramiko.Transport | None = None
        previous: _Endpoint | None = None
        for hop in device.jumps:
            endpoint = _Endpoint(hop.host, hop.port, hop.user, hop.identity_file, jump=hop.spec)
            try:
                via = self._handshake(self._reach(endpoint, via, previous), endpoint)
            except TransportError as exc:
                raise _relabel(exc, f"jump host {hop.spec!r}: ") from exc
            previous = endpoint
        target = _Endpoint(device.host, device.port, device.user, device.identity_file)
        return self._handshake(self._reach(target, via, previous), target)

    def _reach(self, endpoint: _Endpoint, via: paramiko.Transport | None,
               previous: _Endpoint | None) -> socket.socket | paramiko.Channel:
        """A TCP socket to `endpoint`, or a `direct-tcpip` channel to it through the jump host `via`."""
        timeout = self._connect_timeout()
        if via is None or previous is None:
            return _open_socket(endpoint, timeout, self._deadline)
        try:
            return via.open_channel("direct-tcpip", (endpoint.host, endpoint.port), ("127.0.0.1", 0),
                                    timeout=timeout)
        except paramiko.ChannelException as exc:
            error = ConnectError(f"{previous.label} could not open a connection to {endpoint.address} "
                                 f"({exc.text or 'refused'}; code {exc.code})")
            error.transient = exc.code == paramiko.common.OPEN_FAILED_CONNECT_FAILED
            raise error from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectError(f"{previous.label} did not open a connection to {endpoint.address} within "
                               f"{timeout:g} s ({exc or type(exc).__name__})") from exc

    def _track(self, transport: paramiko.Transport) -> None:
        with self._lock:
            closed = self._closed
            self._open.append(transport)
        if closed:
            transport.close()

    def _handshake(self, sock: socket.socket | paramiko.Channel, endpoint: _Endpoint) -> paramiko.Transport:
        timeout = self._connect_timeout()
        transport = paramiko.Transport(sock)
        self._track(transport)
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        transport.auth_timeout = timeout
        known = self._load_known_hosts()
        names = known.lookup(known_hosts_name(endpoint.host, endpoint.port))
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
            raise ConnectError(
                f"{endpoint.address} accepted the TCP connection but the SSH handshake failed "
                f"within {timeout:g} s ({exc or type(exc).__name__})"
            ) from exc
        self._check_host_key(transport, known, endpoint)
        self._authenticate(transport, endpoint)
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

    def _check_host_key(self, transport: paramiko.Transport, known: paramiko.HostKeys, endpoint: _Endpoint) -> None:
        key = transport.get_remote_server_key()
        name = known_hosts_name(endpoint.host, endpoint.port)
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
                f"ssh-keyscan -p {endpoint.port} {endpoint.host} >> {path}"
            )
        self._remember_host_key(path, name, key)

    def _remember_host_key(self, path: Path, name: str, key: paramiko.PKey) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with locked_file(path):
                with open(path, "a") as out:
                    out.write(f"{name} {key.get_name()} {key.get_base64()}\n")
                    out.flush()
                    os.fsync(out.fileno())
        except OSError as exc:
            raise HostKeyError(f"cannot add the host key of {name} to {path}: {exc}") from exc

    def _key_files(self, endpoint: _Endpoint) -> tuple[list[tuple[str, paramiko.PKey]], list[str]]:
        """The identity file's key (or the default keys'), read from disk, and the files that are encrypted:
        those are not read (no passphrase is asked for); the SSH agent's copy of one is offered with the
        agent's keys."""
        files = [endpoint.identity_file] if endpoint.identity_file else [
            os.path.expanduser(f"~/.ssh/{name}") for name in ("id_ed25519", "id_ecdsa", "id_rsa")
        ]
        keys: list[tuple[str, paramiko.PKey]] = []
        encrypted: list[str] = []
        for file in files:
            if not os.path.exists(file):
                if endpoint.identity_file:
                    raise AuthError(f"identity file {file} does not exist")
                continue
            key = _read_key(file)
            if key is None:
                encrypted.append(file)
            else:
                keys.append((file, key))
        return keys, encrypted

    def _authenticate(self, transport: paramiko.Transport, endpoint: _Endpoint) -> None:
        """Offer the identity file (or the default keys), then the SSH agent's keys; keys are named in
        messages by file or fingerprint, never shown. An encrypted key file is skipped: it logs in only
        through the agent's copy, and if nothing else does, the error says so."""
        tried: list[str] = []
        keys, encrypted = self._key_files(endpoint)
        with _agent(self._device.ssh.agent) as (agent_keys, agent_note):
            for source, key in keys + agent_keys:
                try:
                    transport.auth_publickey(endpoint.user, key)
                except paramiko.AuthenticationException:
                    tried.append(source)
                    continue
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    raise AuthError(f"authentication with {endpoint.address} broke off: {exc}") from exc
                if transport.is_authenticated():
                    return
        refused = (f"{endpoint.address} refused every key for user {endpoint.user!r} "
                   f"(tried: {', '.join(tried) or 'none found'}; {agent_note})")
        if encrypted:
            named = ", ".join(encrypted)
            raise AuthError(f"key {named} is encrypted and no passphrase is asked for: add it to the SSH agent "
                            f"(`ssh-add {encrypted[0]}`) and run again, or use an unencrypted key; {refused}")
        raise AuthError(refused)

    def open_channel(self, command: str) -> paramiko.Channel:
        """`command` started on the device, as Paramiko's channel (the connection master relays it as is)."""
        try:
            channel = self._transport.open_session(timeout=self._device.timeouts.connect)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise_if_expired(self._deadline, exc)
            raise TransportError(f"{self._what}: cannot start a command ({exc})") from exc
        return channel

    def exec(self, command: str) -> SshChannel:
        return SshChannel(self.open_channel(command), f"device {self._device.name!r}", self._device.timeouts.command,
                          self._deadline)

    @property
    def active(self) -> bool:
        """Whether the connection (and every jump host's) is still up, as far as Paramiko knows."""
        with self._lock:
            return not self._closed and all(t.is_active() for t in self._open)

    def keepalive(self, seconds: int) -> None:
        """Send a keepalive every `seconds` on the connection and its jump hosts: a held connection whose
        board went away is then seen to be dead while idle, not only when a command is sent on it."""
        with self._lock:
            for transport in self._open:
                transport.set_keepalive(seconds)

    def _close_attempt(self) -> None:
        with self._lock:
            transports, self._open = self._open, []
        for transport in reversed(transports):
            transport.close()

    def close(self) -> None:
        """Close the device's connection and the jump hosts'; safe from any thread, and twice."""
        with self._lock:
            self._closed = True
            transports, self._open = self._open, []
            unwatch, self._unwatch = self._unwatch, None
        for transport in reversed(transports):
            transport.close()
        if unwatch is not None:
            unwatch()


def _read_key(file: str) -> paramiko.PKey | None:
    """The private key in `file`, or None if it is encrypted (Paramiko says so with a TypeError, or with
    PasswordRequiredException in older versions); anything else unreadable is an AuthError."""
    problem = unfit_file(file, MAX_KEY_FILE)
    if problem is not None:
        raise AuthError(f"identity file {file}: {problem}")
    try:
        return paramiko.PKey.from_path(file)
    except paramiko.PasswordRequiredException:
        return None
    except TypeError as exc:
        if "password" in str(exc).lower():
            return None
        raise AuthError(f"cannot read identity file {file}: {exc}") from exc
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise AuthError(f"cannot read identity file {file}: {exc}") from exc


@contextmanager
def _agent(enabled: bool) -> Iterator[tuple[list[tuple[str, paramiko.PKey]], str]]:
    """The SSH agent's keys (as (name, key)), and a note for a message that says what the agent offered."""
    if not enabled:
        yield [], "the SSH agent is off (ssh.agent: false)"
        return
    if not os.environ.get("SSH_AUTH_SOCK"):
        yield [], "no SSH agent (SSH_AUTH_SOCK is not set)"
        return
    try:
        agent = paramiko.Agent()
    except (OSError, paramiko.SSHException) as exc:
        yield [], f"the SSH agent at SSH_AUTH_SOCK did not answer ({exc})"
        return
    try:
        keys: list[tuple[str, paramiko.PKey]] = [(f"ssh-agent key {key_fingerprint(key)}", key)
                                                 for key in agent.get_keys()]
        yield keys, f"the SSH agent offered {len(keys)} key(s)" if keys else "the SSH agent holds no keys"
    finally:
        agent.close()


def _open_socket(endpoint: _Endpoint, timeout: float, deadline: Deadline | None) -> socket.socket:
    what = endpoint.address
    try:
        sock = _tcp_connect(endpoint, timeout, deadline)
    except TimeoutError as exc:
        raise ConnectError(f"connect to {what} timed out after {timeout:g} s") from exc
    except ConnectionRefusedError as exc:
        raise ConnectError(f"connection to {what} refused (is sshd running?)") from exc
    except socket.gaierror as exc:
        error = ConnectError(f"cannot resolve host {endpoint.host!r}: {exc.strerror}")
        error.transient = exc.errno == socket.EAI_AGAIN  # a name server that did not answer, not a typo
        raise error from exc
    except OSError as exc:
        raise ConnectError(f"cannot connect to {what}: {exc.strerror or exc}") from exc
    # Without TCP_NODELAY every request/reply exchange waits ~40 ms for a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


CONNECT_POLL_S = 0.1  # how often a TCP connect in progress looks at the device's deadline (and Ctrl-C)


def _tcp_connect(endpoint: _Endpoint, timeout: float, deadline: Deadline | None) -> socket.socket:
    """socket.create_connection, but a connect in progress (a board that does not answer SYN) ends within
    CONNECT_POLL_S of its deadline expiring or the run being interrupted, not only at `timeout`."""
    end = time.monotonic() + timeout
    error: OSError = OSError(f"no address for {endpoint.host}")
    for family, kind, proto, _, address in socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            code = sock.connect_ex(address)
            while code in (errno.EINPROGRESS, errno.EALREADY):
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"connect to {endpoint.address} timed out")
                if deadline is not None and deadline.expired:
                    raise OSError(errno.ECANCELED, deadline.reason)
                if select.select([], [sock], [], min(left, CONNECT_POLL_S))[1]:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))  # ECONNREFUSED makes a ConnectionRefusedError
            sock.setblocking(True)
            return sock
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
            if exc.errno == errno.ECANCELED:
                raise
    raise error


def _relabel(exc: TransportError, prefix: str = "", suffix: str = "") -> TransportError:
    """The same kind of error, reworded (a jump host's failure names the jump host)."""
    error = type(exc)(prefix + exc.message + suffix)
    if isinstance(exc, ConnectError) and isinstance(error, ConnectError):
        error.transient = exc.transient
    return error


def _after_attempts(exc: TransportError, attempts: int) -> TransportError:
    return exc if attempts == 1 else _relabel(exc, suffix=f" (after {attempts} attempts)")
