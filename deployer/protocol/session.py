"""The controller's side of the agent protocol (docs/design.md, sections 1-2).

`AgentSession` starts the agent on a device with one remote command (uploading the bundle first if the
device lacks this version), then sends framed requests and parses each reply strictly: a device is
untrusted, so every field is type-checked and every size bounded before use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from deployer.config.inventory import Device
from deployer.connect.channel import Channel, Transport
from deployer.connect.transport import open_transport
from deployer.errors import AgentError, TransportError
from deployer.protocol.bundle import NEED_AGENT, NO_REMOTE_DIR, agent_bundle, bootstrap_command, run_command
from deployer.protocol.reply import Fields, Reply, show
from deployer.protocol.spool import Spool
from deployer.remote.kinds import AGENT as AGENT_KINDS
from deployer.remote.layout import RELEASE_ID_RE
from deployer.text import one_line, visible

MAX_HEADER = 1 << 20
# The most payload each op's reply may announce; checked before a byte of it is read, so a board announcing
# more costs nothing (a caller that knows the exact size passes a tighter `max_reply`).
REPLY_LIMITS = {"state": 64 << 20, "get": 256 << 20, "read": 256 << 20, "rollback": 256 << 20,
                "smoke": 256 << 20, "startup": 256 << 20, "shell": 2 << 20}
SMALL_REPLY = 1 << 20  # every other op (and hello) answers with no payload to speak of
FINISH_TIMEOUT_S = 5.0


class AgentMissing(AgentError):
    """The device does not have this agent yet (the run command exited NEED_AGENT)."""


def agent_failure(reply: Reply) -> AgentError | None:
    """The error a well-formed failure reply (`ok: false` with a string kind and message) carries; a kind
    outside the agent's vocabulary is itself a broken reply (`bad_reply`), shown escaped."""
    error = reply.fields.get("error")
    if reply.fields.get("ok") is False and isinstance(error, dict):
        kind, message = error.get("kind"), error.get("message")
        if isinstance(kind, str) and isinstance(message, str):
            if kind not in AGENT_KINDS:
                return AgentError(f"the agent replied with an unknown error kind {one_line(kind, 40)}: "
                                  f"{visible(message, 2000)}", kind="bad_reply")
            return AgentError(visible(message, 2000), kind=kind)
    return None


class AgentSession:
    """One running agent on one device, spoken to over one exec channel."""

    def __init__(self, channel: Channel, device: Device, *, noop_offered: bool = False) -> None:
        self._channel = channel
        self._device = device
        self.hello: Reply | None = None
        self._broken = False
        self.agent_uploaded = False
        self.noop_offered = noop_offered  # the remote command lets the board's shell answer a no-op
        self.shell_noop: str | None = None  # the release the board's shell answered for: no agent runs

    @classmethod
    def start(cls, transport: Transport, device: Device, *, check: bool = False,
              noop_token: str | None = None) -> AgentSession:
        """One remote command when the device has this agent; two (run, then bootstrap) when it has not.
        `noop_token`: the shell may answer instead of the agent (`shell_noop` then says for which release)."""
        session = cls(transport.exec(run_command(device, check=check, noop_token=noop_token)), device,
                      noop_offered=noop_token is not None)
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
        if first.fields.get("op") == "noop" and self.noop_offered:
            self.shell_noop = self._shell_answer(first)
            return
        if first.fields.get("op") == "need_agent":
            self._write(*agent_bundle().message())
            self.agent_uploaded = True
            first = self._read()
        failure = agent_failure(first)  # the bootstrap could not store or start the agent
        if failure is not None:
            raise failure
        if first.fields.get("op") != "hello":
            raise AgentError(f"agent did not say hello (got {show(dict(first.fields))})")
        hello = Fields(first.fields, "hello")
        hello.text("python")
        running = hello.text("agent")
        if running != agent_bundle().id:  # never talk to a stale or altered agent as if it were this one
            raise AgentError(f"the device runs agent {one_line(running, 80)}, not this controller's "
                             f"{agent_bundle().id12}: its bundle folder was changed on the device; delete "
                             f"{self._device.remote_dir}/agent and push again", kind="bad_reply")
        self.hello = first
        if self._device.env:  # secrets travel over the channel, never on the remote command line
            self.request("env", env=dict(self._device.env))

    def _shell_answer(self, answer: Reply) -> str:
        """The release RD/noop.json names: the board's word, checked like any reply."""
        current = answer.fields.get("current")
        if not isinstance(current, str) or not RELEASE_ID_RE.fullmatch(current) or len(current) > 200:
            raise AgentError(f"the board's shell answered a no-op for a release that is no id: {show(current)}",
                             kind="bad_reply")
        return current  # the command has ended: `shell_noop` stops every request, `bye` included

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

    def _read(self, op: str = "hello", max_reply: int = SMALL_REPLY, spool: Spool | None = None) -> Reply:
        line = self._channel.read_line(MAX_HEADER)
        if not line.endswith(b"\n"):
            raise self._ended_early(line)
        try:
            fields = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AgentError(f"agent sent a malformed reply ({exc.msg if hasattr(exc, 'msg') else exc})") from exc
        if not isinstance(fields, dict):
            raise AgentError(f"agent reply is not a JSON object: {show(fields)}")
        size = fields.get("payload_size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise AgentError(f"agent reply field 'payload_size': out of range ({show(size)})")
        if size > max_reply:  # refused before reading: the session is out of step now, so it ends
            self._broken = True
            raise AgentError(f"the agent announced {size} bytes for its {op!r} reply, over the {max_reply} it "
                             f"may send", kind="bad_reply")
        if spool is not None:  # streamed to a file: memory stays one chunk however large the payload
            self._channel.read_into(size, spool.write)
            return Reply(fields, b"")
        return Reply(fields, self._channel.read_exact(size) if size else b"")

    def _ended_early(self, partial: bytes) -> AgentError:
        """Explain why the agent's output ended: no python, a crash, a killed process."""
        self._channel.close_input()
        status, stderr = self._channel.finish(FINISH_TIMEOUT_S)
        tail = stderr.strip().splitlines()[-3:] if stderr.strip() else []
        detail = f": {one_line(' | '.join(tail), 2000)}" if tail else ""  # the board's stderr: untrusted text
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

    def request(self, op: str, payload: bytes = b"", *, max_reply: int | None = None, spool: Spool | None = None,
                **fields: Any) -> Reply:
        """Send one request and read its reply; `max_reply`: the most payload that reply may carry (default:
        REPLY_LIMITS for the op); `spool`: where the reply's payload goes instead of `Reply.payload`."""
        limit = max_reply if max_reply is not None else REPLY_LIMITS.get(op, SMALL_REPLY)
        if self.shell_noop is not None:  # a caller's bug: the shell answered, no agent runs on this session
            raise RuntimeError(f"{op!r} sent on a session the board's shell answered")
        if self._broken:
            raise AgentError(f"no {op!r}: the exchange with the agent broke off earlier", kind="bad_reply")
        try:
            self._write({"op": op, **fields}, payload)
            reply = self._read(op, limit, spool)
        except TransportError:
            self._broken = True  # the channel is out of step or gone: no goodbye will be read
            raise
        if reply.fields.get("ok") is True:
            return reply
        failure = agent_failure(reply)
        if failure is not None:
            raise failure
        raise AgentError(f"agent reply to {op!r} has neither ok nor a well-formed error: {show(dict(reply.fields))}")

    def close(self) -> None:
        try:
            self._channel.close_input()
        except TransportError:
            pass
        self._channel.close()

    def bye(self) -> None:
        """A goodbye, so the agent cleans up before it answers; none after a broken exchange (it would only
        wait out another timeout): closing its input makes the agent clean up all the same. None either when
        the board's shell answered: no agent runs."""
        if not self._broken and self.shell_noop is None:
            try:
                self.request("bye")
            except (AgentError, TransportError):
                pass
        self.close()


@contextmanager
def open_session(device: Device, *, accept_new_host_keys: bool = False, check: bool = False,
                 noop_token: str | None = None) -> Iterator[AgentSession]:
    """One connection and one agent session on a device, closed (with a `bye`) however the block ends."""
    transport = open_transport(device, accept_new_host_keys=accept_new_host_keys)
    try:
        session = AgentSession.start(transport, device, check=check, noop_token=noop_token)
        try:
            yield session
        finally:
            session.bye()
    finally:
        transport.close()
