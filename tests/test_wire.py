"""Properties of the wire, both sides, over what hypothesis makes of it (docs/design.md, sections 1-2).

- Controller: `AgentSession` reads any byte stream as framed replies, or raises a `DeviceError`
  (`AgentError`, `TransportError`); a payload over its op's limit is refused unread and ends the exchange;
  what the board's writer frames, the controller reads back whole. The parsers behind it (`parse_state`,
  `parse_fingerprint`, `check_found`, `local_folder`, `deployer.text`) map any JSON to a checked record or their
  documented refusal, and keep no raw control character.
- Board: `read_header`/`read_message` map any bytes to messages, `EOFError` or `FramingError`; the agent's
  `Session.serve` answers any request stream (garbage lines, truncated payloads, wrong fields) with one framed
  reply per request, each `ok` or an error of the agent's vocabulary, never `internal` (a bug), and writes
  nothing outside its remote dir.
- MACE containers (`parse_cache`): any bytes give a `MaceCache` or `ValueError`; both generations round-trip.

The controller's reader runs over an in-memory `BufferedReader` (only `_recv` is replaced, with random chunk
sizes): hundreds of arbitrary streams per test are what no real server produces on demand. The real-sshd
hostile boards are tests/test_hostile.py.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.cache.mace import (
    DEVICE_NAME_KEY,
    PLATFORM_INFO_KEY,
    encode_legacy,
    encode_mace_pb,
    parse_cache,
)
from deployer.config.inventory import Device, parse_inventory
from deployer.connect.channel import BufferedReader
from deployer.errors import AgentError, DeviceError
from deployer.protocol.fingerprint import fingerprint_id, parse_fingerprint
from deployer.protocol.ops import Found, Refused, check_found
from deployer.protocol.reply import Reply
from deployer.protocol.session import REPLY_LIMITS, SMALL_REPLY, AgentSession
from deployer.protocol.spool import Spool
from deployer.remote.framing import MAX_LINE, FramingError, read_header, read_message, write_message
from deployer.remote.kinds import AGENT as AGENT_KINDS
from deployer.remote.session import Session
from deployer.tasks.collect import local_folder
from deployer.tasks.plan import parse_state
from deployer.text import one_line, visible

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONTROL = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))]
ESCAPES = st.sampled_from(["\x1b[2J", "\x1b]0;owned\x07", "\x9b31m", "\r", "\x00", "\u202e", "\ud800"])
TEXT = st.one_of(st.text(max_size=40), st.lists(st.one_of(st.text(max_size=6), ESCAPES), max_size=6).map("".join))
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)


def _no_control(text: str, allowed: str = "") -> bool:
    return not any(c in text for c in CONTROL if c not in allowed)


# ----- the controller's reader ------------------------------------------------------------------------------


class BytesChannel(BufferedReader):
    """A channel whose stdout is `data`, received in the chunk sizes given (cycled); writes are counted."""

    def __init__(self, data: bytes, chunks: list[int]) -> None:
        super().__init__("device 'd'", 5.0)
        self._data, self._chunks, self._at, self._n = data, chunks or [1 << 16], 0, 0
        self.bytes_sent = 0

    def _recv(self, size: int, wait: float) -> bytes:
        take = min(size, self._chunks[self._n % len(self._chunks)])
        self._n += 1
        chunk = self._data[self._at: self._at + take]
        self._at += len(chunk)
        return chunk

    def write(self, data: bytes) -> None:
        self.bytes_sent += len(data)

    def close_input(self) -> None:
        pass

    def finish(self, timeout: float) -> tuple[int | None, str]:
        return 0, "\x1b[2J a board's stderr"

    def close(self) -> None:
        pass


DEVICE: Device = parse_inventory("devices:\n  - name: d\n    host: local\n").devices[0]
CHUNKS = st.lists(st.sampled_from([1, 3, 64, 1000, 1 << 16]), min_size=1, max_size=3)  # how replies arrive


def _framed(fields: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """One reply as a board might send it: a line (JSON or not, with or without its newline), then bytes."""
    line = st.one_of(fields.map(lambda f: json.dumps(f).encode()), st.binary(max_size=80),
                     JSON.map(lambda v: json.dumps(v).encode()))
    return st.tuples(line, st.booleans(), st.binary(max_size=300)).map(
        lambda t: t[0] + (b"\n" if t[1] else b"") + t[2])


REPLY_FIELDS = st.fixed_dictionaries({}, optional={
    "ok": st.one_of(st.booleans(), JSON), "payload_size": st.one_of(st.integers(-5, 400), st.integers(0, 1 << 40),
                                                                    JSON),
    "error": st.one_of(st.fixed_dictionaries({"kind": st.one_of(st.sampled_from(sorted(AGENT_KINDS)), TEXT),
                                              "message": st.one_of(TEXT, JSON)}), JSON),
    "op": st.sampled_from(["hello", "state", "commit"]), "current": JSON})
STREAM = st.lists(_framed(REPLY_FIELDS), max_size=4).map(b"".join)
OPS = sorted(REPLY_LIMITS) + ["begin", "find", "bye"]


@FAST
@given(stream=STREAM, chunks=CHUNKS, ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=4),
       max_reply=st.none() | st.integers(0, 500), spool=st.booleans())
def test_any_stream_is_replies_or_a_device_error(stream: bytes, chunks: list[int], ops: list[str],
                                                  max_reply: int | None, spool: bool) -> None:
    """Request after request over the same stream: each returns a reply whose payload is what it announced and
    within its limit, or raises a DeviceError; once a payload is refused unread, every later request is."""
    session = AgentSession(BytesChannel(stream, chunks), DEVICE)
    refused = False
    for op in ops:
        limit = max_reply if max_reply is not None else REPLY_LIMITS.get(op, SMALL_REPLY)
        sink = Spool(io.BytesIO()) if spool else None
        try:
            reply = session.request(op, max_reply=max_reply, spool=sink)
        except DeviceError as exc:  # the board's stderr (BytesChannel.finish) is in some: made printable
            assert _no_control(str(exc), "\t"), str(exc)
            refused = refused or "may send" in str(exc)
            continue
        assert not refused, "a request after a refused payload read the stream out of step"
        assert reply.fields.get("ok") is True
        announced = reply.fields.get("payload_size", 0)
        received = sink.size if sink is not None else len(reply.payload)
        assert received == announced <= limit


@settings(FAST, max_examples=40)
@given(fields=st.dictionaries(TEXT, JSON, max_size=6), payload=st.binary(max_size=600), chunks=CHUNKS)
def test_what_the_boards_writer_frames_the_controller_reads_whole(fields: dict[str, Any], payload: bytes,
                                                                  chunks: list[int]) -> None:
    out = io.BytesIO()
    write_message(out, {**fields, "ok": True}, payload)
    write_message(out, {"ok": True, "next": 1})
    session = AgentSession(BytesChannel(out.getvalue(), chunks), DEVICE)
    reply = session.request("get")
    assert reply.payload == payload and {**reply.fields, "payload_size": None} == {
        **fields, "ok": True, "payload_size": None}
    assert session.request("bye").fields == {"ok": True, "next": 1}


@FAST
@given(announced=st.integers(SMALL_REPLY + 1, 1 << 40), chunks=CHUNKS)
def test_a_payload_over_its_limit_is_refused_before_a_byte_is_read(announced: int, chunks: list[int]) -> None:
    line = json.dumps({"ok": True, "payload_size": announced}).encode() + b"\n"
    channel = BytesChannel(line + b"x" * (1 << 18), chunks)
    session = AgentSession(channel, DEVICE)
    with pytest.raises(AgentError, match="may send") as caught:
        session.request("commit")
    assert caught.value.kind == "bad_reply"
    assert channel.bytes_received <= len(line) + max(chunks)  # the line and what came with it: no more
    with pytest.raises(AgentError, match="broke off"):
        session.request("bye")


# ----- the controller's parsers of a reply's contents -------------------------------------------------------


@FAST
@given(state=st.one_of(JSON, st.fixed_dictionaries({}, optional={
    "current": JSON, "files": st.dictionaries(st.one_of(TEXT, st.sampled_from(["../x", "/etc/passwd", "a/./b",
                                                                                "kernels/a.cl"])),
                                              JSON, max_size=4),
    "manifest": JSON, "fingerprint": JSON, "blobs": JSON})).map(lambda s: json.dumps(s).encode()) | st.binary())
def test_any_state_is_a_checked_record_or_a_bad_reply(state: bytes) -> None:
    try:
        parsed = parse_state(Reply({"ok": True}, state))
    except AgentError as exc:
        assert exc.kind == "bad_reply" and _no_control(exc.reason)
        return
    for path in parsed.files:
        assert path.isprintable() and not path.startswith("/") and ".." not in path.split("/")
        assert posixpath.normpath(path) == path
    assert parsed.current is None or _no_control(parsed.current)


def _fingerprint_like(parts: tuple[str, str, str, str], honest_id: bool, extra: Any) -> Any:
    platform = {"name": parts[0], "version": parts[1]}
    device = {"name": parts[2], "driver_version": parts[3]}
    fp_id = fingerprint_id(*parts) if honest_id else extra
    return {"platform": platform, "device": device, "cpu_only": True, "id": fp_id, "extra": extra}


@FAST
@given(raw=st.one_of(JSON, st.builds(_fingerprint_like, st.tuples(TEXT, TEXT, TEXT, TEXT), st.booleans(), JSON)))
def test_any_fingerprint_is_checked_and_made_printable_or_a_bad_reply(raw: Any) -> None:
    try:
        parsed = parse_fingerprint(raw)
    except AgentError as exc:
        assert _no_control(exc.reason)
        return
    assert parsed["id"] == fingerprint_id(raw["platform"]["name"], raw["platform"]["version"],
                                          raw["device"]["name"], raw["device"]["driver_version"])

    def strings(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for k, v in value.items() for s in [k, *strings(v)]]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else []

    assert all(_no_control(s, "\n\t") for s in strings(parsed))


PATHS = st.one_of(TEXT, TEXT.map(lambda t: "/" + t), st.sampled_from([
    "/data/a.bin", "/data/\udcff.bin", "/data/\ud800.bin", "/data/../etc/passwd", "/a//b", "/a/./b", "/", "/\x1b[2J",
    "/data/x\x00", "relative", "~/x"]))


@FAST
@given(entry=st.one_of(JSON, st.fixed_dictionaries({"path": PATHS}, optional={
    "kind": st.sampled_from(["file", "symlink", "other", "denied"]) | TEXT, "size": JSON | st.integers(-1, 1 << 41),
    "sha256": st.sampled_from(["a" * 64, "A" * 64, "a" * 63]) | TEXT, "mtime": JSON, "error": JSON})))
def test_any_find_entry_is_a_readable_file_or_a_reason(entry: Any) -> None:
    """A board's `find` result: a file the controller may read (absolute, normalised, no NUL, a size within
    bounds, a hash), or a printable reason; the local folder it would get is one plain name."""
    checked = check_found(entry, max_size=1 << 30)
    if isinstance(checked, Refused):
        assert _no_control(checked.why) and _no_control(checked.path)
        return
    assert isinstance(checked, Found)
    assert checked.path.startswith("/") and posixpath.normpath(checked.path) == checked.path
    assert "\0" not in checked.path and 0 <= checked.size <= 1 << 30 and len(checked.sha256) == 64


@FAST
@given(path=PATHS)
def test_no_device_sent_path_names_a_folder_outside_the_cache(path: str) -> None:
    """Every path `find` may report and the controller accepts gets one plain folder name in the cache (a
    lone surrogate, which JSON can carry and no file name decodes to, failed the device's whole collect as
    "local cache: 'utf-8' codec can't encode" before check_found refused it)."""
    checked = check_found({"path": path, "kind": "file", "size": 1, "sha256": "a" * 64}, max_size=1)
    if isinstance(checked, Refused):
        return
    name = local_folder(checked.path)
    assert "/" not in name and not name.startswith(".") and name.isprintable() and 0 < len(name) <= 130
    root = Path("/cache/dev/collected")
    assert (root / name).resolve().parent == root


@FAST
@given(text=TEXT, limit=st.integers(4, 100))
def test_device_text_is_shown_without_control_characters(text: str, limit: int) -> None:
    assert _no_control(visible(text, limit), "\n\t") and len(visible(text, limit)) <= limit
    assert _no_control(one_line(text, limit)) and len(one_line(text, limit)) <= limit


# ----- the board's reader and the agent's request loop -------------------------------------------------------


@FAST
@given(data=st.one_of(st.binary(max_size=600), STREAM), cut=st.integers(0, 600))
def test_the_boards_reader_maps_any_bytes_to_messages_or_its_two_errors(data: bytes, cut: int) -> None:
    stream = io.BytesIO(data[:cut] if cut < len(data) else data)
    for _ in range(len(data) + 1):  # each message consumes at least one byte: the loop ends
        at = stream.tell()
        try:
            fields, payload = read_message(stream, max_payload=1 << 20)
        except EOFError:
            return
        except FramingError:
            assert stream.tell() > at
            continue
        assert isinstance(fields, dict) and len(payload) == fields.get("payload_size", 0) <= 1 << 20
        assert stream.tell() > at
    raise AssertionError("the reader did not reach the end")


@pytest.mark.parametrize("extra", [1, MAX_LINE, 15 * MAX_LINE])
def test_a_line_over_the_limit_is_refused_and_the_next_message_read(extra: int) -> None:
    """The board skips a line of any length in bounded memory (the line limit and a chunk), then reads on."""
    stream = io.BytesIO()
    stream.write(b"x" * (MAX_LINE + extra) + b"\n")
    write_message(stream, {"op": "state"}, b"p")
    stream.seek(0)
    tracemalloc.start()
    try:
        with pytest.raises(FramingError, match="longer than"):
            read_header(stream)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_LINE, peak
    assert read_message(stream) == ({"op": "state", "payload_size": 1}, b"p")


@pytest.mark.parametrize("newline", [False, True])
def test_a_flood_without_a_newline_costs_the_controller_the_line_limit(newline: bool) -> None:
    """16 MiB with no newline (or one at its end): refused once the line limit is passed, in bounded memory."""
    flood = b"\x1b[2J" * ((16 << 20) // 4) + (b"\n" if newline else b"")
    channel = BytesChannel(flood, [1 << 16])
    tracemalloc.start()
    try:
        with pytest.raises(DeviceError, match="a line longer than"):
            AgentSession(channel, DEVICE).request("state")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and channel.bytes_received < (1 << 20) + (1 << 17), (peak, channel.bytes_received)


SAFE_OPS = ["state", "begin", "put", "get", "commit", "rollback", "disk", "bye", "nonsense", ""]
REQUEST_FIELDS = st.fixed_dictionaries({"op": st.sampled_from(SAFE_OPS) | JSON}, optional={
    "release": st.one_of(TEXT, st.sampled_from(["20260101T000000-abc123", "../up", "/abs"]), JSON),
    "path": st.one_of(PATHS, st.sampled_from(["kernels/a.cl", "../../x", "build/manifest.json"])),
    "files": st.lists(st.fixed_dictionaries({"path": PATHS | st.just("kernels/a.cl"), "size": st.integers(-1, 4) | JSON,
                                             "sha256": st.sampled_from(["a" * 64]) | TEXT,
                                             "mode": st.sampled_from([0o644, 0o755]) | JSON}), max_size=2) | JSON,
    "size": st.integers(-1, 8) | JSON, "sha256": TEXT, "mode": JSON, "base": JSON, "drop": JSON, "keep": JSON,
})


def _request(fields: dict[str, Any], payload: bytes, announce: int | None, newline: bool) -> bytes:
    line = json.dumps({**fields, **({"payload_size": announce} if announce is not None else {})}).encode()
    return line + (b"\n" if newline else b"") + payload


REQUESTS = st.lists(st.one_of(
    st.builds(_request, REQUEST_FIELDS, st.binary(max_size=8),
              st.none() | st.integers(-1, 8) | st.integers(1 << 30, 1 << 31), st.booleans()),
    st.binary(max_size=40).map(lambda b: b + b"\n")), max_size=6).map(b"".join)


@settings(FAST, max_examples=40)
@given(stream=REQUESTS)
def test_the_agent_answers_any_request_stream_with_framed_replies(stream: bytes) -> None:
    """In-process `Session.serve` on a remote dir of its own: one framed reply per request it read, each `ok`
    or an error of the agent's vocabulary and never `internal`; it ends at `bye` or the end of input; nothing
    appears beside the remote dir."""
    with tempfile.TemporaryDirectory() as top:
        rd = os.path.join(top, "rd")
        os.mkdir(rd)
        out = io.BytesIO()
        session = Session(os.path.realpath(rd))  # type: ignore[no-untyped-call]
        assert session.serve(io.BytesIO(stream), out) in (0, 1)  # type: ignore[no-untyped-call]
        assert os.listdir(top) == ["rd"]
        for path, _, names in os.walk(rd):
            assert os.path.realpath(path).startswith(os.path.realpath(rd))
            assert all(not os.path.islink(os.path.join(path, n)) or n == "current" for n in names)
    replies = io.BytesIO(out.getvalue())
    hello, _ = read_message(replies)
    assert hello["op"] == "hello"
    while replies.tell() < len(out.getvalue()):
        reply, _ = read_message(replies)
        if reply.get("ok") is not True:
            kind = reply["error"]["kind"]
            assert kind in AGENT_KINDS and kind != "internal", reply


# ----- MACE containers ---------------------------------------------------------------------------------------

KEYS = st.one_of(st.text(min_size=1, max_size=30), ESCAPES, st.sampled_from([PLATFORM_INFO_KEY, DEVICE_NAME_KEY,
                                                                            "program_hash_ saxpy"]))
PAIRS = st.dictionaries(KEYS.filter(lambda k: "\ud800" not in k), st.binary(max_size=64), max_size=5)
ENCODERS: dict[str, Callable[[list[tuple[str, bytes]]], bytes]] = {"pb": encode_mace_pb, "legacy": encode_legacy}


@FAST
@given(pairs=PAIRS, fmt=st.sampled_from(sorted(ENCODERS)))
def test_a_mace_container_round_trips(pairs: dict[str, bytes], fmt: str) -> None:
    data = ENCODERS[fmt](list(pairs.items()))
    cache = parse_cache(data)
    assert cache.format == fmt or not pairs  # an empty legacy file has no CRC to tell it from pb: either
    programs = {k: v for k, v in pairs.items()
                if k not in (PLATFORM_INFO_KEY, DEVICE_NAME_KEY) and not k.startswith("program_hash_ ")}
    assert cache.programs == programs
    assert parse_cache(data, fmt=fmt).programs == programs


@FAST
@given(data=st.one_of(st.binary(max_size=400), st.builds(
    lambda pairs, fmt, at, byte, cut: _damaged(ENCODERS[fmt](list(pairs.items())), at, byte, cut),
    PAIRS, st.sampled_from(sorted(ENCODERS)), st.integers(0, 1000), st.integers(0, 255), st.booleans())),
    fmt=st.sampled_from([None, "pb", "legacy"]))
def test_any_bytes_are_a_mace_container_or_a_value_error(data: bytes, fmt: str | None) -> None:
    """What a board or an app wrote, damaged anywhere: parsed, or refused with ValueError, never another
    exception (a collected file is parsed in pure Python, never by a driver)."""
    try:
        cache = parse_cache(data, fmt=fmt)
    except ValueError:
        return
    assert sum(len(v) for v in cache.programs.values()) <= len(data)


def _damaged(data: bytes, at: int, byte: int, cut: bool) -> bytes:
    if not data:
        return data
    at %= len(data)
    return data[:at] if cut else data[:at] + bytes([byte]) + data[at + 1:]
