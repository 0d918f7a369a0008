"""The connection master: a process of the user's own that keeps SSH connections open between runs, as
OpenSSH's ControlMaster with ControlPersist does (docs/design.md section 15).

A run whose devices say `ssh.persist` asks the master (`connect/mux.py`) to run each command; the master
opens the device's connection the first time (the same `SshTransport`, host keys checked as strictly) and
reuses it while it is alive, relaying the command's stdin, stdout, stderr and exit status over the client's
Unix socket. A connection unused for its `persist` seconds is closed; with none left, the master exits.

    python -m deployer.connect.master SOCKET      (started by the first run that needs it, detached)
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from deployer.connect import muxwire as wire
from deployer.connect.ssh import SshTransport
from deployer.errors import TransportError

ACCEPT_POLL_S = 0.5  # how often an idle master looks at what to close
GRACE_S = 2.0  # a master with nothing held waits this long for a client before it exits
KEEPALIVE_S = 15  # a held connection that died (a rebooted board) is noticed within this, not at next use
REQUEST_TIMEOUT_S = 10.0  # a client that connects and says nothing is dropped


@dataclass
class Held:
    """One device connection the master keeps: its users now, and when it was last used."""

    transport: SshTransport
    persist: float
    label: str  # the device as the first run that asked for it named it, and its address
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Master:
    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._lock = threading.Lock()
        self._held: dict[str, Held] = {}
        self._opening: dict[str, threading.Lock] = {}  # one handshake per key, however many clients ask
        self._clients = 0
        self._last_activity = time.monotonic()
        self._stopping = False
        self.digest = wire.code_digest()
        self.handshakes = 0
        self.reuses = 0

    def serve(self) -> None:
        self._listener.settimeout(ACCEPT_POLL_S)
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                if self._close_idle():
                    return
                continue
            except OSError:
                return  # closed by `stop`
            with self._lock:
                self._clients += 1
                self._last_activity = time.monotonic()
            threading.Thread(target=self._client, args=(client,), daemon=True).start()

    def _close_idle(self) -> bool:
        """Close connections unused for their persist time; True when the master should exit."""
        now = time.monotonic()
        with self._lock:
            idle = [k for k, h in self._held.items() if h.users == 0 and now - h.last_used > h.persist]
            closing = [self._held.pop(k) for k in idle]
            done = not self._held and not self._clients and now - self._last_activity > GRACE_S
        for held in closing:
            held.transport.close()
        return done

    def _client(self, client: socket.socket) -> None:
        try:
            with client:
                if wire.peer_uid(client) != os.getuid():
                    return  # another user: not a word (the folder's mode should have kept it out)
                client.settimeout(REQUEST_TIMEOUT_S)
                rest = bytearray()
                request = wire.read_line(client, rest)
                self._answer(client, request, rest)
        except (OSError, EOFError, ValueError, KeyError, TypeError):
            pass  # a client that went away or spoke nonsense: nothing of ours to clean beyond its socket
        finally:
            with self._lock:
                self._clients -= 1
                self._last_activity = time.monotonic()

    def _answer(self, client: socket.socket, request: dict[str, Any], rest: bytearray) -> None:
        op = request.get("op")
        if op == "hello":
            now = time.monotonic()
            with self._lock:
                held = [{"device": h.label, "users": h.users, "idle_s": round(now - h.last_used, 1),
                         "persist_s": h.persist} for h in self._held.values()]
            wire.send_line(client, {"deployer_master": wire.PROTOCOL, "digest": self.digest, "pid": os.getpid(),
                                    "held": len(held), "connections": held, "handshakes": self.handshakes,
                                    "reuses": self.reuses})
        elif op == "stop":
            self._stopping = True
            wire.send_line(client, {"ok": True})
            with self._lock:
                closing, self._held = list(self._held.values()), {}
            for each in closing:
                each.transport.close()
            self._listener.close()
        elif op == "exec":
            self._exec(client, request, rest)

    def _exec(self, client: socket.socket, request: dict[str, Any], rest: bytearray) -> None:
        device_wire = request["device"]
        key = wire.connection_key(device_wire, bool(request["accept_new"]))
        try:
            held, channel, reused = self._open(key, device_wire, request)
        except TransportError as exc:
            wire.send_line(client, {"ok": False, "error": wire.error_wire(exc)})
            return
        try:
            wire.send_line(client, {"ok": True, "reused": reused})
            client.settimeout(None)
            Relay(client, channel, rest).run()
        finally:
            channel.close()
            with self._lock:
                held.users -= 1
                held.last_used = time.monotonic()

    def _open(self, key: str, device_wire: dict[str, Any],
              request: dict[str, Any]) -> tuple[Held, paramiko.Channel, bool]:
        """A channel running the command on the device's connection: the held one if it is alive, else a new
        one. A held connection that cannot open a channel is replaced once (nothing ran on it), unless other
        commands are running on it: then the server refused one more session (sshd's MaxSessions), and
        closing it would cut them off."""
        with self._lock:
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:
            for attempt in (1, 2):
                held, reused = self._connection(key, device_wire, request)
                try:
                    channel = held.transport.open_channel(str(request["command"]))
                    return held, channel, reused
                except TransportError:
                    with self._lock:
                        held.users -= 1
                        busy = held.users > 0 and held.transport.active
                        if not busy and self._held.get(key) is held:
                            del self._held[key]
                    if busy:
                        raise
                    held.transport.close()
                    if not reused or attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _connection(self, key: str, device_wire: dict[str, Any], request: dict[str, Any]) -> tuple[Held, bool]:
        persist = float(request["persist"])
        with self._lock:
            held = self._held.get(key)
            if held is not None and held.transport.active:
                held.users += 1
                held.persist = max(held.persist, persist)
                self.reuses += 1
                return held, True
        transport = SshTransport(wire.device_from_wire(device_wire), accept_new_host_keys=bool(request["accept_new"]))
        transport.keepalive(KEEPALIVE_S)
        label = f"{device_wire['name']} ({device_wire['user']}@{device_wire['host']}:{device_wire['port']})"
        fresh = Held(transport, persist, label, users=1)
        with self._lock:
            stale = self._held.get(key)
            self._held[key] = fresh
            self.handshakes += 1
        if stale is not None:
            stale.transport.close()
        return fresh, False


class Relay:
    """One command's streams between the client's socket and the SSH channel, until it ends either way."""

    def __init__(self, client: socket.socket, channel: paramiko.Channel, rest: bytearray) -> None:
        self._client, self._channel, self._rest = client, channel, rest

    def run(self) -> None:
        upstream = threading.Thread(target=self._stdin, daemon=True)
        upstream.start()
        try:
            self._stdout()
        finally:
            self._channel.close()  # ends the stdin thread's sends; the client's socket closes with the caller

    def _stdin(self) -> None:
        """Client frames to the command's stdin; a client gone (Ctrl-C, a deadline) closes the channel."""
        buffer = self._rest
        try:
            while True:
                parsed = wire.next_frame(buffer)
                if parsed is None:
                    chunk = self._client.recv(1 << 16)
                    if not chunk:
                        break
                    buffer += chunk
                    continue
                kind, payload = parsed
                if kind == wire.STDIN:
                    self._channel.sendall(payload)
                elif kind == wire.STDIN_END:
                    self._channel.shutdown_write()
        except (OSError, EOFError, ValueError, paramiko.SSHException):
            pass
        self._channel.close()

    def _stdout(self) -> None:
        channel, send = self._channel, self._client.sendall
        try:
            while True:
                select.select([channel], [], [], 1.0)
                while channel.recv_stderr_ready():
                    send(wire.frame(wire.STDERR, channel.recv_stderr(1 << 16)))
                if channel.recv_ready():
                    send(wire.frame(wire.STDOUT, channel.recv(1 << 16)))
                    continue
                if channel.eof_received:
                    send(wire.frame(wire.STDOUT_END))
                    break
                if channel.closed or not channel.get_transport().is_active():
                    send(wire.frame(wire.LOST, self._lost().encode()))
                    return
            while not channel.exit_status_ready() and not channel.closed:
                channel.status_event.wait(1.0)
            while channel.recv_stderr_ready():
                send(wire.frame(wire.STDERR, channel.recv_stderr(1 << 16)))
            if channel.exit_status_ready():
                send(wire.frame(wire.STATUS, struct.pack("!i", channel.recv_exit_status())))
            else:
                send(wire.frame(wire.LOST, self._lost().encode()))
        except OSError:
            pass  # the client went away: the channel closes in run()

    def _lost(self) -> str:
        saved = getattr(self._channel.get_transport(), "saved_exception", None)
        return str(saved or "") or "the SSH server closed the connection"


def main(argv: list[str]) -> int:
    """Listen on `argv[0]` until nothing is held; exit at once if another master holds its lock."""
    path = Path(argv[0])
    wire.own_folder(path.parent, create=True)
    lock = open(str(path) + ".lock", "a")  # noqa: SIM115  (held for the master's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another master is starting or serving here
    try:
        path.unlink()  # a stale socket: its master is gone (it held the lock until it died)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    bound = path.stat().st_ino
    listener.listen(128)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        Master(listener).serve()
    finally:
        try:
            if path.stat().st_ino == bound:  # still ours: a newer master may have taken the name
                path.unlink()
        except OSError:
            pass
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
