"""The controller's side of the agent protocol (docs/design.md, sections 1-2).

`AgentSession` starts the agent on a device with one remote command (uploading the agent first if the
device lacks this version), then sends framed requests and parses each reply strictly: a device is
untrusted, so every field is type-checked and every size bounded before use.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer import agent_main
from deployer.errors import AgentError, CompileError, TransportError
from deployer.inventory import Device
from deployer.transport import Channel, Transport, open_transport

MAX_HEADER = 1 << 20
MAX_PAYLOAD = 512 << 20
FINISH_TIMEOUT_S = 5.0
NO_REMOTE_DIR = 73  # the bootstrap's exit status when it cannot create the remote dir (EX_CANTCREAT)
NEED_AGENT = 75  # the run command's exit status when this agent is not on the device yet (EX_TEMPFAIL)

AGENT_SOURCE = Path(agent_main.__file__).read_bytes()
AGENT_SHA256 = hashlib.sha256(AGENT_SOURCE).hexdigest()


@dataclass(frozen=True, slots=True)
class Reply:
    fields: Mapping[str, Any]
    payload: bytes

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        """A field of the expected type, or an `AgentError` naming it."""
        value = self.fields.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            raise AgentError(f"agent reply field {key!r}: expected {_type_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise AgentError(f"agent reply field {key!r}: expected {_type_name(kind)}, got {_show(value)}")
        return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def _show(value: object) -> str:
    """A short, printable rendering of a device-sent value."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    """`Reply.get` for nested records of a reply."""
    if not isinstance(record, Mapping):
        raise AgentError(f"agent reply: expected an object around {key!r}, got {_show(record)}")
    return Reply(record, b"").get(key, kind, optional=optional)


def remote_path(path: str) -> str:
    """A shell word for a remote path; `~/x` becomes "$HOME"/x so the device's shell expands it."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _runner(device: Device, check: bool) -> tuple[str, str, str]:
    """(remote dir as a shell word, the agent's sha12, `exec env K=V.. PYTHON`)."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in
                   [*device.env.items(), *([(agent_main.READONLY_ENV, "1")] if check else [])])
    run = f"exec env {env} {shlex.quote(device.python)}".replace("env  ", "env ")
    return remote_path(device.remote_dir), AGENT_SHA256[:12], run


def run_command(device: Device, *, check: bool = False) -> str:
    """A session's remote command: run the stored agent, or exit NEED_AGENT when it is not there yet.
    Short on purpose (it travels with every push); the bootstrap comes only when needed."""
    root, sha12, run = _runner(device, check)
    return (f'a={root}/agent/agent_{sha12}.py; [ -f "$a" ] || exit {NEED_AGENT}; '
            f"{run} -c {shlex.quote(agent_main.LAUNCH)} {root}/agent agent_{sha12} serve {root}")


def bootstrap_command(device: Device, *, check: bool = False) -> str:
    """The second remote command, only on a device without this agent: the bootstrap receives it, stores it
    and runs it. `check`: a read-only session (push --check): nothing is created on the device, and the
    agent runs from a temp copy that it removes when it exits."""
    root, sha12, run = _runner(device, check)
    return (("" if check else f"{{ mkdir -p {root}/agent || exit {NO_REMOTE_DIR}; }} && ")
            + f"{run} -c {shlex.quote(agent_main.BOOTSTRAP)} {root} {sha12}")


class AgentMissing(AgentError):
    """The device does not have this agent yet (the run command exited NEED_AGENT)."""


def _agent_failure(reply: Reply) -> AgentError | None:
    """The error a well-formed failure reply (`ok: false` with a string kind and message) carries."""
    error = reply.fields.get("error")
    if reply.fields.get("ok") is False and isinstance(error, dict):
        kind, message = error.get("kind"), error.get("message")
        if isinstance(kind, str) and isinstance(message, str):
            return AgentError(printable(message, 2000), kind=printable(kind, 40))
    return None


class AgentSession:
    """One running agent on one device, spoken to over one exec channel."""

    def __init__(self, channel: Channel, device: Device) -> None:
        self._channel = channel
        self._device = device
        self.hello: Reply | None = None
        self.agent_uploaded = False

    @classmethod
    def start(cls, transport: Transport, device: Device, *, check: bool = False) -> AgentSession:
        """One remote command when the device has this agent; two (run, then bootstrap) when it has not."""
        session = cls(transport.exec(run_command(device, check=check)), device)
        try:
            try:
                session._handshake()
            except AgentMissing:
                session.close()
                session = cls(transport.exec(bootstrap_command(device, check=check)), device)
                session._handshake()
        except BaseException:
            session.close()
            raise
        return session

    @property
    def bytes_sent(self) -> int:
        return self._channel.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._channel.bytes_received

    def _handshake(self) -> None:
        first = self._read()
        if first.fields.get("op") == "need_agent":
            self._write({"op": "agent", "sha256": AGENT_SHA256}, AGENT_SOURCE)
            self.agent_uploaded = True
            first = self._read()
        failure = _agent_failure(first)  # the bootstrap could not store or start the agent
        if failure is not None:
            raise failure
        if first.fields.get("op") != "hello":
            raise AgentError(f"agent did not say hello (got {_show(dict(first.fields))})")
        first.get("python", str)
        self.hello = first

    def _write(self, header: Mapping[str, Any], payload: bytes = b"") -> None:
        fields = dict(header)
        if payload:
            fields["payload_size"] = len(payload)
        line = json.dumps(fields).encode() + b"\n"
        if len(payload) < 1 << 16:
            self._channel.write(line + payload)  # one packet for the usual small request
        else:
            self._channel.write(line)  # a large payload is not copied into one buffer with its header
            self._channel.write(payload)

    def _read(self) -> Reply:
        line = self._channel.read_line(MAX_HEADER)
        if not line.endswith(b"\n"):
            raise self._ended_early(line)
        try:
            fields = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AgentError(f"agent sent a malformed reply ({exc.msg if hasattr(exc, 'msg') else exc})") from exc
        if not isinstance(fields, dict):
            raise AgentError(f"agent reply is not a JSON object: {_show(fields)}")
        size = fields.get("payload_size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_PAYLOAD:
            raise AgentError(f"agent reply field 'payload_size': out of range ({_show(size)})")
        return Reply(fields, self._channel.read_exact(size) if size else b"")

    def _ended_early(self, partial: bytes) -> AgentError:
        """Explain why the agent's output ended: no python, a crash, a killed process."""
        self._channel.close_input()
        status, stderr = self._channel.finish(FINISH_TIMEOUT_S)
        tail = stderr.strip().splitlines()[-3:] if stderr.strip() else []
        detail = f": {' | '.join(tail)}" if tail else ""
        if status == NEED_AGENT:
            return AgentMissing("the agent is not on the device yet", kind="need_agent")
        if status == 127:
            return AgentError(
                f"no python on the device: {self._device.python!r} not found (exit 127){detail}; "
                f"install python >= 3.6 or set `python:` in the inventory",
                kind="no_python",
            )
        if status == NO_REMOTE_DIR:
            return AgentError(f"cannot create the remote dir {self._device.remote_dir}{detail}", kind="io")
        if status == 126:
            return AgentError(f"{self._device.python!r} cannot be executed on the device{detail}", kind="no_python")
        if status is None:
            return AgentError(f"the agent stopped answering{detail}", kind="agent_died")
        return AgentError(f"the agent exited with status {status}{detail}", kind="agent_died")

    def request(self, op: str, payload: bytes = b"", **fields: Any) -> Reply:
        self._write({"op": op, **fields}, payload)
        reply = self._read()
        if reply.fields.get("ok") is True:
            return reply
        failure = _agent_failure(reply)
        if failure is not None:
            raise failure
        raise AgentError(f"agent reply to {op!r} has neither ok nor a well-formed error: {_show(dict(reply.fields))}")

    def close(self) -> None:
        try:
            self._channel.close_input()
        except TransportError:
            pass
        self._channel.close()

    def bye(self) -> None:
        try:
            self.request("bye")
        except (AgentError, TransportError):
            pass
        self.close()


@contextmanager
def open_session(device: Device, *, accept_new_host_keys: bool = False,
                 check: bool = False) -> Iterator[AgentSession]:
    """One connection and one agent session on a device, closed (with a `bye`) however the block ends."""
    transport = open_transport(device, accept_new_host_keys=accept_new_host_keys)
    try:
        session = AgentSession.start(transport, device, check=check)
        try:
            yield session
        finally:
            session.bye()
    finally:
        transport.close()


def printable(text: str, limit: int) -> str:
    """Device-sent text made safe to show: no control characters, bounded length."""
    clean = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def printable_line(text: str, limit: int) -> str:
    """Device-sent names and paths: one line, control characters escaped, bounded length."""
    return printable(text.encode("unicode_escape", "backslashreplace").decode("ascii"), limit)


def raise_for_failed_programs(programs: Sequence[Mapping[str, Any]]) -> None:
    failed = [p for p in programs if not p.get("ok")]
    if failed:
        first = failed[0]
        log = printable(str(first.get("log", "")), 4000).strip().splitlines()
        tail = "\n".join(log[-12:])
        names = ", ".join(repr(str(p.get("key"))) for p in failed)
        raise CompileError(f"{len(failed)} program(s) failed to build: {names}\n{tail}", kind="build_failed")
