#!/usr/bin/env python3
# This file runs on the boards' Python (>= 3.6): the pyupgrade rules for the project's 3.10 target
# and zip(strict=) do not apply here.
# ruff: noqa: UP031, B905
# mypy: ignore-errors
"""deployer agent: the one file that runs on each board.

The controller starts it over one SSH exec channel and talks to it with framed messages on
stdin/stdout (docs/design.md, sections 1 and 2):

    python3 agent_main.py serve RD    the session server: begin, put, fingerprint, build, get, smoke,
                                      startup, commit, bye; every OpenCL step runs in a child process
    python3 agent_main.py child       one OpenCL request in, one reply out (run by `serve`, so a
                                      driver that segfaults kills only the child)
    python3 -c BOOTSTRAP RD SHA12     receives this file from the controller when the board lacks it

Constraints, because this file runs on whatever Python the board has: Python >= 3.6, standard library
only, OpenCL only through ctypes and the ICD loader, nothing imported from `deployer`. The controller
imports `BOOTSTRAP`, the framing helpers and the MACE cache encoder/decoder from here, so both sides
share one implementation of the wire and file formats.

Nothing is written outside RD: request paths are relative, without `..`, and their realpath must stay
inside the release. Every file is written to a temp name, fsynced and renamed.
"""

import ctypes
import errno
import fcntl
import glob
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import stat
import statistics
import struct
import subprocess
import sys
import time
import zlib
from collections import namedtuple

MYPY = False
if MYPY:  # type comments only: the public API stays typed for the controller without importing typing here
    from collections.abc import Iterable  # noqa: F401
    from typing import IO, Any  # noqa: F401

AGENT_VERSION = "1"

MAX_LINE = 1 << 20  # a JSON line, both directions (design.md section 1)
MAX_PAYLOAD = 1 << 30  # what read_message accepts by default
MAX_MEMORY_PAYLOAD = 256 << 20  # payloads held in memory (smoke inputs); `put` streams to disk
MAX_GET = 256 << 20  # largest file `get` sends back
LOG_TAIL = 16 << 10  # build log text returned per program (the full log is in build/logs/)
DEFAULT_TIMEOUT_S = 600.0
CHUNK = 1 << 20

PLATFORM_INFO_KEY = "mace_opencl_precompiled_platform_info_key"
DEVICE_NAME_KEY = "mace_opencl_precompiled_device_name_key"
PROGRAM_HASH_PREFIX = "program_hash_ "  # a space follows the underscore, as in MACE
CACHE_FILE = "build/mace_cl_compiled_program.bin"
MANIFEST_FILE = "build/manifest.json"
RELEASE_INDEX = "release.json"  # in each release: every file's size, sha256 and mode (written at commit)
FINGERPRINT_CACHE = "fingerprint.json"  # RD/: the last fingerprint and the driver stamp it was taken under
BLOB_DIR = "blobs"  # RD/blobs/<sha256>: smoke inputs and model bytes, kept by content across pushes
KEEP_BLOBS = 8
MAX_INDEX = 16 << 20  # the largest release index or manifest the agent reads back
READONLY_ENV = "DEPLOYER_CHECK"  # set by `deploy push --check`: the agent writes nothing at all
PHASE_HOOK_ENV = "DEPLOYER_TEST_PHASE_HOOK"  # tests only: "<phase>:<marker file>" (phase_hook below)
PHASE_HOOK_PAUSE_S = 30.0

RELEASE_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
BUILD_KEY_RE = re.compile(r"[0-9a-f]{16,64}")

# The stored agent runs as `python3 -c LAUNCH RD/agent agent_SHA12 serve RD`: imported, not run as a
# script, so Python keeps its bytecode in RD/agent/__pycache__ and no session (nor OpenCL child) compiles
# these 2,400 lines again (~40 ms here, several times that on a board).
# A full disk can leave a truncated .pyc behind (a short write that Python does not check): then the
# cache is dropped and the agent imported without writing bytecode.
LAUNCH = """import sys,shutil;p=sys.argv[1];sys.path[:0]=[p];i=lambda:__import__(sys.argv[2])
try:m=i()
except Exception:shutil.rmtree(p+'/__pycache__',1);sys.dont_write_bytecode=1;m=i()
sys.exit(m.main(sys.argv[2:]))"""

# The bootstrap runs as `python3 -c BOOTSTRAP RD SHA12` when RD/agent/agent_SHA12.py is missing. It
# stays tiny and 3.6-safe: ask for the agent, check its hash, store it atomically, exec it.
BOOTSTRAP = r'''import hashlib, json, os, sys
rd, want = sys.argv[1], sys.argv[2]
out, inp = sys.stdout.buffer, sys.stdin.buffer
def say(obj):
    out.write((json.dumps(obj) + "\n").encode()); out.flush()
def fail(kind, msg):
    say({"ok": False, "error": {"kind": kind, "message": "bootstrap: " + msg}}); sys.exit(1)
if len(want) != 12 or any(c not in "0123456789abcdef" for c in want):
    fail("bad_request", "bad agent hash %r" % want)
out.write(b'{"op":"need_agent"}\n'); out.flush()
try:
    msg = json.loads(inp.readline(1 << 20).decode("utf-8")); n = int(msg["payload_size"])
except Exception as e: fail("bad_request", "expected the agent message: %s" % e)
data = bytearray()
while len(data) < n:
    chunk = inp.read(n - len(data))
    if not chunk: fail("bad_request", "input ended after %d of %d agent bytes" % (len(data), n))
    data += chunk
got = hashlib.sha256(bytes(data)).hexdigest()
if got != msg.get("sha256") or got[:12] != want:
    fail("checksum", "agent sha256 %s, expected %s (%s...)" % (got, msg.get("sha256"), want))
path = os.path.join(rd, "agent", "agent_%s.py" % want)
if os.environ.get("DEPLOYER_CHECK"):  # --check writes nothing in RD: the agent lives in a temp file
    import tempfile; path = os.path.join(tempfile.mkdtemp(prefix="deployer-check-"), "agent_%s.py" % want)
tmp = "%s.tmp-%d" % (path, os.getpid())
try:
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    with open(tmp, "wb") as f: f.write(data); f.flush(); os.fsync(f.fileno())
    os.chmod(tmp, 0o644); os.rename(tmp, path)
except OSError as e: fail("io", "cannot store the agent at %s: %s" % (path, e))
os.execv(sys.executable, [sys.executable, "-c", LAUNCH, os.path.dirname(path), "agent_" + want, "serve", rd])
'''.replace("LAUNCH, os.path", repr(LAUNCH) + ", os.path")


# --------------------------------------------------------------------------------------------------
# Errors and framing
# --------------------------------------------------------------------------------------------------

class AgentFailure(Exception):
    """An error reply: `kind` is one of design.md's error kinds, `message` says what and where."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message

    def reply(self):
        return {"ok": False, "error": {"kind": self.kind, "message": self.message}}


class FramingError(ValueError):
    """A message line that is not one JSON object of at most MAX_LINE bytes, or a bad payload_size."""


def bad_request(message):
    return AgentFailure("bad_request", message)


def read_exact(stream, n):
    # type: (IO[bytes], int) -> bytes
    """Read exactly n bytes; EOFError when the stream ends first."""
    parts, left = [], n
    while left > 0:
        chunk = stream.read(min(left, CHUNK))
        if not chunk:
            raise EOFError("input ended %d bytes into a %d-byte payload" % (n - left, n))
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_header(stream, max_payload=MAX_PAYLOAD):
    # type: (IO[bytes], int) -> tuple[dict[str, Any], int]
    """Read one message line and return (object, payload_size).

    EOFError at the end of input; FramingError for a line that is too long, not UTF-8 JSON, not an
    object, or with a bad payload_size. The line itself is always consumed (a too-long one up to its
    newline), so the reader can answer and go on with the next line.
    """
    line = stream.readline(MAX_LINE + 1)
    if not line:
        raise EOFError("end of input")
    if not line.endswith(b"\n"):
        if len(line) <= MAX_LINE:
            raise EOFError("input ended inside a message line")
        while line and not line.endswith(b"\n"):
            line = stream.readline(CHUNK)
        raise FramingError("message line longer than %d bytes" % MAX_LINE)
    try:
        obj = json.loads(line.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise FramingError("message line is not UTF-8 JSON: %s" % exc) from exc
    if not isinstance(obj, dict):
        raise FramingError("message is not a JSON object (got %s)" % type(obj).__name__)
    size = obj.get("payload_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise FramingError("payload_size must be an integer >= 0 (got %s)" % _show(size))
    if size > max_payload:
        raise FramingError("payload_size %d is over the limit of %d bytes" % (size, max_payload))
    return obj, size


def read_message(stream, max_payload=MAX_PAYLOAD):
    # type: (IO[bytes], int) -> tuple[dict[str, Any], bytes]
    """Read one framed message: (object, payload bytes). See read_header for the errors."""
    obj, size = read_header(stream, max_payload)
    return obj, read_exact(stream, size)


def write_message(stream, obj, payload=b""):
    # type: (IO[bytes], dict[str, Any], bytes) -> None
    """Write one framed message and flush; payload_size is set from the payload when there is one."""
    if payload or "payload_size" in obj:
        obj = dict(obj, payload_size=len(payload))
    line = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(line) > MAX_LINE:
        raise ValueError("message line of %d bytes is over the %d-byte limit" % (len(line), MAX_LINE))
    stream.write(line + b"\n")
    if payload:
        stream.write(payload)
    stream.flush()


class Payload:
    """The raw bytes after a request line, read on demand so that `put` can stream them to disk."""

    def __init__(self, stream, size):
        self.stream = stream
        self.size = size
        self.left = size

    def chunks(self):
        while self.left > 0:
            chunk = read_exact(self.stream, min(self.left, CHUNK))
            self.left -= len(chunk)
            yield chunk

    def read_all(self, limit=MAX_MEMORY_PAYLOAD):
        if self.size > limit:
            raise bad_request("payload of %d bytes is over the limit of %d for this op" % (self.size, limit))
        return b"".join(self.chunks())

    def drain(self):
        for _ in self.chunks():
            pass


# --------------------------------------------------------------------------------------------------
# Request fields: every check raises bad_request naming the field
# --------------------------------------------------------------------------------------------------

_MISSING = object()


def _show(value):
    """A request value quoted in an error message, cut short: the reply line has a size limit."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field(req, name, default):
    value = req.get(name, default)
    if value is _MISSING:
        raise bad_request("missing field '%s'" % name)
    return value


def req_str(req, name, default=_MISSING, pattern=None):
    value = _field(req, name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, str) or "\0" in value:
        raise bad_request("field '%s': expected a string (got %s)" % (name, _show(value)))
    if pattern is not None and not pattern.fullmatch(value):
        raise bad_request("field '%s': %r does not match %s" % (name, value, pattern.pattern))
    return value


def req_int(req, name, default=_MISSING, lo=None, hi=None):
    value = _field(req, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request("field '%s': expected an integer (got %s)" % (name, _show(value)))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_request("field '%s': %d is out of range [%s, %s]" % (name, value, lo, hi))
    return value


def req_str_list(req, name, default=_MISSING):
    value = _field(req, name, default)
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
        raise bad_request("field '%s': expected a list of strings (got %s)" % (name, _show(value)))
    return value


def req_timeout(req):
    value = req.get("timeout_s")
    value = DEFAULT_TIMEOUT_S if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise bad_request("field 'timeout_s': expected seconds in (0, 86400] (got %s)" % _show(value))
    return float(value)


# --------------------------------------------------------------------------------------------------
# MACE cache container (v1.1+ "pb" generation; shared/docs/mace-cache-format.md sections 2 and 4)
# --------------------------------------------------------------------------------------------------

def mace_program_key(name, options):
    # type: (str, Iterable[str]) -> str
    """MACE's key: the program name, then a space and each option of the (bytewise sorted) set."""
    return name + "".join(" " + opt for opt in sorted(set(options)))


def mace_program_hash(source_bytes, header_bytes_list):
    # type: (bytes, Iterable[bytes]) -> str
    """Last 10 hex digits of the source's MD5, then the last 10 of each header's, in order."""
    return "".join(hashlib.md5(b).hexdigest()[-10:] for b in [source_bytes] + list(header_bytes_list))


def mace_platform_info(name, profile, version, mace_version):
    # type: (str, str, str, str) -> str
    return "%s, %s, %s, %s" % (name, profile, version, mace_version)


def mace_device_name(device_name, device_version):
    # type: (str, str) -> str
    """MACE's device-name entry: Adreno names come from CL_DEVICE_VERSION, Mali/PowerVR from
    CL_DEVICE_NAME, every other GPU gets an empty name."""
    if device_name == "QUALCOMM Adreno(TM)":
        parts = device_version.split(" ", 2)  # "OpenCL 2.0 Adreno(TM) 640" -> "Adreno(TM) 640"
        return parts[2] if len(parts) == 3 else ""
    if "Mali" in device_name or "PowerVR" in device_name:
        return device_name
    return ""


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(tag, data):
    return bytes([tag]) + _varint(len(data)) + data


def encode_mace_pb(pairs):
    # type: (Iterable[tuple[str, bytes]]) -> bytes
    """Encode (key, bytes) pairs as MACE's PairContainer + CRC-32 trailer, keys in bytewise order."""
    encoded = []
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, (bytes, bytearray)):
            raise TypeError("pairs must be (str, bytes), got (%r, %r)" % (type(key), type(value)))
        encoded.append((key.encode("utf-8"), bytes(value)))
    encoded.sort(key=lambda kv: kv[0])
    for (a, _), (b, _) in zip(encoded, encoded[1:]):
        if a == b:
            raise ValueError("duplicate key %r" % a.decode("utf-8"))
    body = b"".join(
        _length_delimited(0x0A, _length_delimited(0x0A, k) + _length_delimited(0x12, v)) for k, v in encoded
    )
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _read_varint(data, pos, end):
    """Decode a varint at data[pos:end]; return (value, new pos). Never reads at or past `end`."""
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise ValueError("varint runs past the end at offset %d" % pos)
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes at offset %d" % pos)
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_bytes(data, pos, end):
    length, pos = _read_varint(data, pos, end)
    if length > end - pos:
        raise ValueError("length %d at offset %d runs past the end of its message" % (length, pos))
    return data[pos:pos + length], pos + length


def _read_uint32(data, pos, end):
    value, pos = _read_varint(data, pos, end)
    if value > 0xFFFFFFFF:
        raise ValueError("uint32 value %d out of range at offset %d" % (value, pos))
    return value, pos


def _decode_kv(data, pos, end):
    """One KVPair in data[pos:end]: (key, value); uint32s come back as little-endian bytes."""
    key, value, uints = None, None, []
    while pos < end:
        tag_at = pos
        tag, pos = _read_varint(data, pos, end)
        if tag in (0x0A, 0x12):
            raw, pos = _read_bytes(data, pos, end)
            if (key if tag == 0x0A else value) is not None:
                raise ValueError("field %d repeated in one pair at offset %d" % (tag >> 3, tag_at))
            if tag == 0x0A:
                try:
                    key = bytes(raw).decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError("key at offset %d is not UTF-8" % tag_at) from None
            else:
                value = bytes(raw)
        elif tag == 0x18:  # repeated uint32, one varint per element (proto2, not packed)
            number, pos = _read_uint32(data, pos, end)
            uints.append(number)
        else:
            raise ValueError("unexpected field/wire type 0x%x in a pair at offset %d" % (tag, tag_at))
    if key is None:
        raise ValueError("pair without a key ending at offset %d" % end)
    if value is None:
        value = struct.pack("<%dI" % len(uints), *uints)
    return key, value


def decode_mace_pb(data, check_crc=True):
    # type: (bytes, bool) -> list[tuple[str, bytes]]
    """Strictly decode a MACE v1.1+ container into a list of (key, bytes) in file order.

    Raises ValueError with the reason on a bad CRC, a length past its bound, an unknown field, a pair
    without key, or anything else malformed. `check_crc=False` only serves to say which entry differs
    in a file whose CRC already failed; its entries are never trusted.
    """
    data = memoryview(bytes(data))
    if len(data) < 4:
        raise ValueError("file of %d bytes is too short for the CRC-32 trailer" % len(data))
    end = len(data) - 4
    (want,) = struct.unpack("<I", data[end:].tobytes())
    if check_crc and zlib.crc32(data[:end]) & 0xFFFFFFFF != want:
        raise ValueError("crc mismatch")
    pairs, pos = [], 0
    while pos < end:
        tag_at = pos
        tag, pos = _read_varint(data, pos, end)
        if tag != 0x0A:
            raise ValueError("unexpected top-level field/wire type 0x%x at offset %d" % (tag, tag_at))
        length, pos = _read_varint(data, pos, end)
        if length > end - pos:
            raise ValueError("pair of %d bytes at offset %d runs past the end" % (length, tag_at))
        pairs.append(_decode_kv(data, pos, pos + length))
        pos += length
    return pairs


def decode_mace_legacy(data):
    # type: (bytes) -> list[tuple[str, bytes]]
    """Strictly decode a legacy container: every length within bounds, nothing left over (MACE v1.0
    itself aborts on overruns)."""
    data = bytes(data)
    if len(data) < 8:
        raise ValueError("%d bytes: too short for the legacy count" % len(data))
    (count,) = struct.unpack_from("<q", data, 0)
    if not 0 <= count <= (len(data) - 8) // 8:
        raise ValueError("legacy count %d does not fit in %d bytes" % (count, len(data)))
    pairs, pos = [], 8
    for index in range(count):
        fields = []
        for what in ("key", "value"):
            if pos + 4 > len(data):
                raise ValueError("entry %d: %s length runs past the end" % (index, what))
            (size,) = struct.unpack_from("<i", data, pos)
            pos += 4
            if size < 0 or pos + size > len(data):
                raise ValueError("entry %d: %s of %d bytes runs past the end" % (index, what, size))
            fields.append(data[pos:pos + size])
            pos += size
        try:
            pairs.append((fields[0].decode("utf-8"), fields[1]))
        except UnicodeDecodeError as exc:
            raise ValueError("entry %d: key is not UTF-8" % index) from exc
    if pos != len(data):
        raise ValueError("%d bytes left over after %d entries" % (len(data) - pos, count))
    return pairs


def decode_any(data):
    # type: (bytes) -> tuple[str, list[tuple[str, bytes]]]
    """(format, pairs) of either generation. No magic number tells them apart: a valid CRC-32 trailer
    says pb, an exact legacy parse says legacy; ValueError naming both reasons otherwise."""
    try:
        return "pb", decode_mace_pb(data)
    except ValueError as pb_error:
        try:
            return "legacy", decode_mace_legacy(data)
        except ValueError as legacy_error:
            raise ValueError("not a MACE container (pb: %s; legacy: %s)" % (pb_error, legacy_error)) from None


# --------------------------------------------------------------------------------------------------
# Test-only phase hook (docs/design.md, "Killed at a named phase"): a no-op unless the variable is set
# --------------------------------------------------------------------------------------------------

_PHASE_HOOK = os.environ.get(PHASE_HOOK_ENV, "")  # read once, at import
_PHASES_HIT = set()


def phase_hook(phase, watch_fd=None):
    # type: (str, int | None) -> None
    """At a named phase, if DEPLOYER_TEST_PHASE_HOOK is "<phase>:<marker>": append the phase name to the
    marker file, then pause so a test can kill the controller at exactly this point. The pause ends after
    PHASE_HOOK_PAUSE_S, when "<marker>.continue" exists, or when `watch_fd` (the agent's input) becomes
    readable: the controller is synchronous, so at a hook point that means its input ended. Each phase
    fires once per process. The hook only pauses: what the code does next is unchanged."""
    name, sep, marker = _PHASE_HOOK.partition(":")
    if not sep or not marker or name != phase or phase in _PHASES_HIT:
        return
    _PHASES_HIT.add(phase)
    with open(marker, "a") as handle:
        handle.write(phase + "\n")
    end = time.monotonic() + PHASE_HOOK_PAUSE_S
    while time.monotonic() < end and not os.path.exists(marker + ".continue"):
        if watch_fd is None:
            time.sleep(0.05)
        elif select.select([watch_fd], [], [], 0.05)[0]:
            return


# --------------------------------------------------------------------------------------------------
# Files: paths kept inside a root, atomic writes
# --------------------------------------------------------------------------------------------------

def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_inside(root, rel):
    """Join a request path onto `root` (a realpath), refusing anything that could leave it."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise bad_request("path must be a non-empty string (got %s)" % _show(rel))
    if os.path.isabs(rel):
        raise bad_request("path %r is absolute; paths are relative to the release" % rel)
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad_request("path %r has an empty, '.' or '..' component" % rel)
    target = os.path.join(root, *parts)
    if not _inside(os.path.realpath(target), root) or os.path.realpath(target) == root:
        raise bad_request("path %r resolves outside %s" % (rel, root))
    return target


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the data was synced already
        pass
    finally:
        os.close(fd)


def temp_name(path):
    head, name = os.path.split(path)
    return os.path.join(head, ".%s.tmp-%d" % (name, os.getpid()))


def write_atomic(path, chunks, mode=0o644, check=None, phase=None):
    """Write an iterable of byte chunks to `path` via temp file + fsync + rename.

    `check(size, sha256_hex)` runs before the rename and may raise to abandon the file. The temp file
    never survives an error. `phase`: the test hook's name for the moment before the rename. Returns
    (size, sha256 hex).
    """
    tmp = temp_name(path)
    digest, size = hashlib.sha256(), 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if check is not None:
            check(size, digest.hexdigest())
        os.chmod(tmp, mode)
        if phase is not None:
            phase_hook(phase, 0)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return size, digest.hexdigest()


def read_file_limited(path, limit, what):
    size = os.path.getsize(path)
    if size > limit:
        raise bad_request("%s is %d bytes, over the limit of %d" % (what, size, limit))
    with open(path, "rb") as handle:
        return handle.read()


def io_failure(exc, rel):
    return AgentFailure("io", "%s: %s" % (rel, exc.strerror or exc))


def log_slug(key):
    return re.sub(r"[^A-Za-z0-9._=-]", "_", key)[:200]


def tail_text(text, limit):
    if len(text) <= limit:
        return text
    return "[... %d characters cut ...]\n" % (len(text) - limit) + text[-limit:]


# --------------------------------------------------------------------------------------------------
# OpenCL through ctypes
# --------------------------------------------------------------------------------------------------

CL_ERRORS = {
    -1: "CL_DEVICE_NOT_FOUND", -2: "CL_DEVICE_NOT_AVAILABLE", -3: "CL_COMPILER_NOT_AVAILABLE",
    -4: "CL_MEM_OBJECT_ALLOCATION_FAILURE", -5: "CL_OUT_OF_RESOURCES", -6: "CL_OUT_OF_HOST_MEMORY",
    -7: "CL_PROFILING_INFO_NOT_AVAILABLE", -8: "CL_MEM_COPY_OVERLAP", -9: "CL_IMAGE_FORMAT_MISMATCH",
    -10: "CL_IMAGE_FORMAT_NOT_SUPPORTED", -11: "CL_BUILD_PROGRAM_FAILURE", -12: "CL_MAP_FAILURE",
    -13: "CL_MISALIGNED_SUB_BUFFER_OFFSET", -14: "CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST",
    -15: "CL_COMPILE_PROGRAM_FAILURE", -16: "CL_LINKER_NOT_AVAILABLE", -17: "CL_LINK_PROGRAM_FAILURE",
    -18: "CL_DEVICE_PARTITION_FAILED", -19: "CL_KERNEL_ARG_INFO_NOT_AVAILABLE",
    -30: "CL_INVALID_VALUE", -31: "CL_INVALID_DEVICE_TYPE", -32: "CL_INVALID_PLATFORM",
    -33: "CL_INVALID_DEVICE", -34: "CL_INVALID_CONTEXT", -35: "CL_INVALID_QUEUE_PROPERTIES",
    -36: "CL_INVALID_COMMAND_QUEUE", -37: "CL_INVALID_HOST_PTR", -38: "CL_INVALID_MEM_OBJECT",
    -39: "CL_INVALID_IMAGE_FORMAT_DESCRIPTOR", -40: "CL_INVALID_IMAGE_SIZE", -41: "CL_INVALID_SAMPLER",
    -42: "CL_INVALID_BINARY", -43: "CL_INVALID_BUILD_OPTIONS", -44: "CL_INVALID_PROGRAM",
    -45: "CL_INVALID_PROGRAM_EXECUTABLE", -46: "CL_INVALID_KERNEL_NAME", -47: "CL_INVALID_KERNEL_DEFINITION",
    -48: "CL_INVALID_KERNEL", -49: "CL_INVALID_ARG_INDEX", -50: "CL_INVALID_ARG_VALUE",
    -51: "CL_INVALID_ARG_SIZE", -52: "CL_INVALID_KERNEL_ARGS", -53: "CL_INVALID_WORK_DIMENSION",
    -54: "CL_INVALID_WORK_GROUP_SIZE", -55: "CL_INVALID_WORK_ITEM_SIZE", -56: "CL_INVALID_GLOBAL_OFFSET",
    -57: "CL_INVALID_EVENT_WAIT_LIST", -58: "CL_INVALID_EVENT", -59: "CL_INVALID_OPERATION",
    -60: "CL_INVALID_GL_OBJECT", -61: "CL_INVALID_BUFFER_SIZE", -62: "CL_INVALID_MIP_LEVEL",
    -63: "CL_INVALID_GLOBAL_WORK_SIZE", -64: "CL_INVALID_PROPERTY", -65: "CL_INVALID_IMAGE_DESCRIPTOR",
    -66: "CL_INVALID_COMPILER_OPTIONS", -67: "CL_INVALID_LINKER_OPTIONS",
    -68: "CL_INVALID_DEVICE_PARTITION_COUNT", -69: "CL_INVALID_PIPE_SIZE", -70: "CL_INVALID_DEVICE_QUEUE",
    -71: "CL_INVALID_SPEC_ID", -72: "CL_MAX_SIZE_RESTRICTION_EXCEEDED", -1001: "CL_PLATFORM_NOT_FOUND_KHR",
}

CL_DEVICE_NOT_FOUND = -1
CL_PLATFORM_NOT_FOUND_KHR = -1001
CL_PLATFORM_PROFILE, CL_PLATFORM_VERSION, CL_PLATFORM_NAME = 0x0900, 0x0901, 0x0902
CL_PLATFORM_VENDOR = 0x0903
CL_DEVICE_TYPE, CL_DEVICE_MAX_COMPUTE_UNITS, CL_DEVICE_MAX_WORK_GROUP_SIZE = 0x1000, 0x1002, 0x1004
CL_DEVICE_IMAGE_SUPPORT, CL_DEVICE_NAME, CL_DEVICE_VENDOR = 0x1016, 0x102B, 0x102C
CL_DRIVER_VERSION, CL_DEVICE_VERSION, CL_DEVICE_EXTENSIONS = 0x102D, 0x102F, 0x1030
CL_DEVICE_TYPE_ALL = 0xFFFFFFFF
DEVICE_TYPE_BITS = [(2, "CPU"), (4, "GPU"), (8, "ACCELERATOR"), (16, "CUSTOM"), (1, "DEFAULT")]
CL_PROGRAM_BINARY_SIZES, CL_PROGRAM_BINARIES, CL_PROGRAM_BUILD_LOG = 0x1165, 0x1166, 0x1183
CL_MEM_READ_WRITE, CL_MEM_WRITE_ONLY, CL_MEM_READ_ONLY, CL_MEM_COPY_HOST_PTR = 1, 1 << 1, 1 << 2, 1 << 5
CL_RGBA, CL_FLOAT = 0x10B5, 0x10DE

cl_int, cl_uint, cl_ulong = ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint64
size_t, ptr = ctypes.c_size_t, ctypes.c_void_p

# name: (restype, argtypes). Pointers are plain void*: ctypes passes arrays and byref() through them.
CL_SIGNATURES = {
    "clGetPlatformIDs": (cl_int, [cl_uint, ptr, ptr]),
    "clGetPlatformInfo": (cl_int, [ptr, cl_uint, size_t, ptr, ptr]),
    "clGetDeviceIDs": (cl_int, [ptr, cl_ulong, cl_uint, ptr, ptr]),
    "clGetDeviceInfo": (cl_int, [ptr, cl_uint, size_t, ptr, ptr]),
    "clCreateContext": (ptr, [ptr, cl_uint, ptr, ptr, ptr, ptr]),
    "clCreateCommandQueue": (ptr, [ptr, ptr, cl_ulong, ptr]),
    "clCreateProgramWithSource": (ptr, [ptr, cl_uint, ptr, ptr, ptr]),
    "clCreateProgramWithBinary": (ptr, [ptr, cl_uint, ptr, ptr, ptr, ptr, ptr]),
    "clBuildProgram": (cl_int, [ptr, cl_uint, ptr, ctypes.c_char_p, ptr, ptr]),
    "clGetProgramBuildInfo": (cl_int, [ptr, ptr, cl_uint, size_t, ptr, ptr]),
    "clGetProgramInfo": (cl_int, [ptr, cl_uint, size_t, ptr, ptr]),
    "clCreateKernel": (ptr, [ptr, ctypes.c_char_p, ptr]),
    "clSetKernelArg": (cl_int, [ptr, cl_uint, size_t, ptr]),
    "clCreateBuffer": (ptr, [ptr, cl_ulong, size_t, ptr, ptr]),
    "clEnqueueNDRangeKernel": (cl_int, [ptr, ptr, cl_uint, ptr, ptr, ptr, cl_uint, ptr, ptr]),
    "clEnqueueReadBuffer": (cl_int, [ptr, ptr, cl_uint, size_t, size_t, ptr, cl_uint, ptr, ptr]),
    "clEnqueueWriteBuffer": (cl_int, [ptr, ptr, cl_uint, size_t, size_t, ptr, cl_uint, ptr, ptr]),
    "clFinish": (cl_int, [ptr]),
    "clReleaseMemObject": (cl_int, [ptr]),
    "clReleaseKernel": (cl_int, [ptr]),
    "clReleaseProgram": (cl_int, [ptr]),
    "clReleaseCommandQueue": (cl_int, [ptr]),
    "clReleaseContext": (cl_int, [ptr]),
}


# Looked up only when a case needs them: a loader without them still runs everything else.
# clCreateImage2D (deprecated in 1.2, exported by every loader) also serves OpenCL 1.1 boards.
CL_OPTIONAL_SIGNATURES = {
    "clCreateImage2D": (ptr, [ptr, cl_ulong, ptr, size_t, size_t, size_t, ptr, ptr]),
}


class ClImageFormat(ctypes.Structure):
    _fields_ = [("image_channel_order", cl_uint), ("image_channel_data_type", cl_uint)]


def cl_error_name(code):
    return "%s (%d)" % (CL_ERRORS.get(code, "UNKNOWN_CL_ERROR"), code)


class ClError(AgentFailure):
    """A CL call that returned an error code: kind `opencl`, message like
    `CL_INVALID_KERNEL_NAME (-46) in clCreateKernel`."""

    def __init__(self, code, call):
        AgentFailure.__init__(self, "opencl", "%s in %s" % (cl_error_name(code), call))
        self.code = code


class OpenCL:
    """The ICD loader, opened with ctypes, and thin checked wrappers around its calls."""

    def __init__(self, library=None):
        # DEPLOYER_OPENCL_LIBRARY lets an inventory's env: point at a board's non-standard loader.
        library = library or os.environ.get("DEPLOYER_OPENCL_LIBRARY") or "libOpenCL.so.1"
        try:
            self.lib = ctypes.CDLL(library)
        except OSError as exc:
            raise AgentFailure("no_loader", "cannot load the OpenCL ICD loader %s: %s"
                               % (library, exc)) from exc
        for name, (restype, argtypes) in CL_SIGNATURES.items():
            try:
                fn = getattr(self.lib, name)
            except AttributeError:
                raise AgentFailure("no_loader", "OpenCL library %s has no %s" % (library, name)) from None
            fn.restype, fn.argtypes = restype, argtypes

    def optional(self, name):
        """A function of CL_OPTIONAL_SIGNATURES; an `opencl` failure naming it when the loader lacks it."""
        try:
            fn = getattr(self.lib, name)
        except AttributeError:
            raise AgentFailure("opencl", "the OpenCL library has no %s" % name) from None
        fn.restype, fn.argtypes = CL_OPTIONAL_SIGNATURES[name]
        return fn

    def call(self, name, *args):
        code = getattr(self.lib, name)(*args)
        if code != 0:
            raise ClError(code, name)

    def create(self, name, *args):
        """Call a clCreate* function whose last argument is `cl_int *errcode_ret`."""
        err = cl_int(0)
        handle = getattr(self.lib, name)(*args, ctypes.byref(err))
        if err.value != 0 or not handle:
            raise ClError(err.value or -9999, name)
        return handle

    def info_bytes(self, fn, handles, param):
        size = size_t(0)
        self.call(fn, *handles, param, 0, None, ctypes.byref(size))
        buf = ctypes.create_string_buffer(max(size.value, 1))
        self.call(fn, *handles, param, size.value, buf, None)
        return buf.raw[:size.value]

    def info_str(self, fn, handles, param):
        return self.info_bytes(fn, handles, param).split(b"\0", 1)[0].decode("utf-8", "replace")

    def info_num(self, fn, handles, param, ctype):
        value = ctype(0)
        self.call(fn, *handles, param, ctypes.sizeof(value), ctypes.byref(value), None)
        return value.value

    def release(self, name, handle):
        if handle:
            getattr(self.lib, name)(handle)  # errors on release are not worth failing an op for


def cl_platforms(cl):
    """Platform handles; [] when the loader finds none (-1001 from ocl-icd, or a count of 0)."""
    count = cl_uint(0)
    code = cl.lib.clGetPlatformIDs(0, None, ctypes.byref(count))
    if code == CL_PLATFORM_NOT_FOUND_KHR or (code == 0 and count.value == 0):
        return []
    if code != 0:
        raise ClError(code, "clGetPlatformIDs")
    ids = (ptr * count.value)()
    cl.call("clGetPlatformIDs", count.value, ids, None)
    return list(ids)


def cl_devices(cl, platform):
    count = cl_uint(0)
    code = cl.lib.clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 0, None, ctypes.byref(count))
    if code == CL_DEVICE_NOT_FOUND or (code == 0 and count.value == 0):
        return []
    if code != 0:
        raise ClError(code, "clGetDeviceIDs")
    ids = (ptr * count.value)()
    cl.call("clGetDeviceIDs", platform, CL_DEVICE_TYPE_ALL, count.value, ids, None)
    return list(ids)


def describe_platform(cl, platform):
    get = lambda param: cl.info_str("clGetPlatformInfo", (platform,), param)  # noqa: E731
    return {"name": get(CL_PLATFORM_NAME), "vendor": get(CL_PLATFORM_VENDOR),
            "version": get(CL_PLATFORM_VERSION), "profile": get(CL_PLATFORM_PROFILE)}


def describe_device(cl, device):
    get = lambda param: cl.info_str("clGetDeviceInfo", (device,), param)  # noqa: E731
    num = lambda param, ctype: cl.info_num("clGetDeviceInfo", (device,), param, ctype)  # noqa: E731
    bits = num(CL_DEVICE_TYPE, cl_ulong)
    return {
        "name": get(CL_DEVICE_NAME), "vendor": get(CL_DEVICE_VENDOR),
        "type": [label for bit, label in DEVICE_TYPE_BITS if bits & bit],
        "version": get(CL_DEVICE_VERSION), "driver_version": get(CL_DRIVER_VERSION),
        "compute_units": num(CL_DEVICE_MAX_COMPUTE_UNITS, cl_uint),
        "max_work_group_size": num(CL_DEVICE_MAX_WORK_GROUP_SIZE, size_t),
        "extensions": get(CL_DEVICE_EXTENSIONS).split(),
        "image_support": bool(num(CL_DEVICE_IMAGE_SUPPORT, cl_uint)),
    }


# ----- why there is no platform -------------------------------------------------------------------

def icd_files():
    """(where searched, .icd files) as the ICD loader sees them: $OCL_ICD_VENDORS (a dir or one file)
    or /etc/OpenCL/vendors."""
    where = os.environ.get("OCL_ICD_VENDORS") or "/etc/OpenCL/vendors"
    label = where + (" ($OCL_ICD_VENDORS)" if os.environ.get("OCL_ICD_VENDORS") else "")
    if os.path.isfile(where):
        return label, [where]
    try:
        names = sorted(n for n in os.listdir(where) if n.endswith(".icd"))
    except OSError:
        names = []
    return label, [os.path.join(where, n) for n in names]


def icd_library(path):
    """The library an ICD file names (its first line); OSError if the file cannot be read."""
    with open(path, "rb") as handle:
        return handle.read(4096).decode("utf-8", "replace").strip().split("\n")[0].strip()


def diagnose_no_platform():
    """An ICD file naming a library that does not load is the usual cause; say which one."""
    where, files = icd_files()
    for path in files:
        try:
            library = icd_library(path)
        except OSError as exc:
            return AgentFailure("icd_missing_library", "cannot read ICD file %s: %s" % (path, exc))
        try:
            ctypes.CDLL(library)
        except OSError as exc:
            return AgentFailure("icd_missing_library",
                                "ICD file %s names %r, which cannot be loaded: %s" % (path, library, exc))
    if files:
        return AgentFailure("no_platform", "no OpenCL platform: the ICD files in %s (%s) load but report no "
                            "platform" % (where, ", ".join(os.path.basename(f) for f in files)))
    return AgentFailure("no_platform", "no OpenCL platform: no .icd file in %s" % where)


# ----- selecting a device -------------------------------------------------------------------------

Selection = namedtuple("Selection", "platform device device_type")
Found = namedtuple("Found", "platform_index device_index handle desc")
Selected = namedtuple("Selected", "platform_index platform platform_desc device_index device device_desc")
DEVICE_TYPES = ("gpu", "cpu", "accelerator", "any")


def parse_selection(value):
    """The inventory's `opencl:` map: platform/device by index or name substring, and a device type."""
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise bad_request("field 'opencl': expected an object (got %s)" % _show(value))
    unknown = sorted(set(value) - {"platform", "device", "device_type"})
    if unknown:
        raise bad_request("field 'opencl': unknown keys %s" % ", ".join(unknown))
    for name in ("platform", "device"):
        item = value.get(name)
        if item is not None and (isinstance(item, bool) or not isinstance(item, (int, str))
                                 or (isinstance(item, int) and item < 0) or item == ""):
            raise bad_request("field 'opencl.%s': expected an index >= 0 or a name (got %s)"
                              % (name, _show(item)))
    device_type = value.get("device_type") or "any"
    if device_type not in DEVICE_TYPES:
        raise bad_request("field 'opencl.device_type': expected one of %s (got %s)"
                          % (", ".join(DEVICE_TYPES), _show(device_type)))
    return Selection(value.get("platform"), value.get("device"), device_type)


def _matches(spec, index, name):
    if isinstance(spec, int):
        return index == spec
    return spec.lower() in name.lower()


def _listing(platforms, found):
    lines = []
    for pi, desc in enumerate(platforms):
        devs = ["%d %r (%s)" % (f.device_index, f.desc["name"], "/".join(f.desc["type"]))
                for f in found if f.platform_index == pi]
        lines.append("platform %d %r: %s" % (pi, desc["name"], ", ".join(devs) or "no devices"))
    return "; ".join(lines)


def _type_ok(desc, device_type):
    return device_type == "any" or device_type.upper() in desc["type"]


def select_device(cl, selection):
    """Pick one (platform, device), or fail with no_platform / icd_missing_library / no_device /
    no_match. Without a platform or device given, the first GPU of any platform wins, else the first
    device of the first platform that has one."""
    handles = cl_platforms(cl)
    if not handles:
        raise diagnose_no_platform()
    platforms = [describe_platform(cl, h) for h in handles]
    found = []
    for pi, handle in enumerate(handles):
        for di, dev in enumerate(cl_devices(cl, handle)):
            found.append(Found(pi, di, dev, describe_device(cl, dev)))
    wanted = [pi for pi, p in enumerate(platforms)
              if selection.platform is None or _matches(selection.platform, pi, p["name"])]
    if not wanted:
        raise AgentFailure("no_match", "no platform matches opencl.platform %r; there are: %s"
                           % (selection.platform, _listing(platforms, found)))
    on_wanted = [f for f in found if f.platform_index in wanted]
    if not on_wanted:
        names = ", ".join(repr(platforms[pi]["name"]) for pi in wanted)
        raise AgentFailure("no_device", "no OpenCL device on platform %s (clGetDeviceIDs: %s)"
                           % (names, cl_error_name(CL_DEVICE_NOT_FOUND)))
    typed = [f for f in on_wanted if _type_ok(f.desc, selection.device_type)]
    if not typed and selection.device_type == "gpu" and all("CPU" in f.desc["type"] for f in on_wanted):
        first = on_wanted[0]
        raise AgentFailure("no_device", "only a CPU device (%s) on platform %s; set opencl.device_type: any "
                           "to accept it" % (first.desc["name"], platforms[first.platform_index]["name"]))
    if selection.device is None:
        gpus = [f for f in typed if "GPU" in f.desc["type"]]
        chosen = (gpus or typed or [None])[0]
    else:
        chosen = next((f for f in typed if _matches(selection.device, f.device_index, f.desc["name"])), None)
    if chosen is None:
        raise AgentFailure("no_match", "no device matches opencl %s; there are: %s"
                           % (json.dumps(selection._asdict(), sort_keys=True), _listing(platforms, found)))
    return Selected(chosen.platform_index, handles[chosen.platform_index], platforms[chosen.platform_index],
                    chosen.device_index, chosen.handle, chosen.desc)


def fingerprint_of(sel):
    p, d = sel.platform_desc, sel.device_desc
    ident = "|".join([p["name"], p["version"], d["name"], d["driver_version"]])
    return {
        "platform": dict(p), "device": dict(d),
        "cpu_only": "CPU" in d["type"] and "GPU" not in d["type"],
        "platform_index": sel.platform_index, "device_index": sel.device_index,
        "python": "%d.%d.%d" % tuple(sys.version_info[:3]),
        "id": hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16],
    }


class ClContext:
    """A context and in-order queue on the selected device; released by close()."""

    def __init__(self, cl, sel):
        self.cl, self.device = cl, sel.device
        self.devices = (ptr * 1)(sel.device)
        self.context = cl.create("clCreateContext", None, 1, self.devices, None, None)
        try:
            self.queue = cl.create("clCreateCommandQueue", self.context, sel.device, 0)
        except AgentFailure:
            cl.release("clReleaseContext", self.context)
            raise

    def close(self):
        self.cl.release("clReleaseCommandQueue", self.queue)
        self.cl.release("clReleaseContext", self.context)


# --------------------------------------------------------------------------------------------------
# build: sources -> binaries -> MACE cache file, manifest and logs under <release>/build/
# --------------------------------------------------------------------------------------------------

def parse_build(req, root):
    """Validate a build request; read every source and header. Returns (mace_version, specs)."""
    return req_str(req, "mace_version"), parse_program_specs(req, root)


def parse_program_specs(req, root):
    """The request's `programs` (build and startup): checked, with their sources and headers read."""
    programs = _field(req, "programs", _MISSING)
    if not isinstance(programs, list):
        raise bad_request("field 'programs': expected a list")
    specs, keys = [], set()
    for i, item in enumerate(programs):
        if not isinstance(item, dict):
            raise bad_request("programs[%d]: expected an object" % i)
        spec = {"key": req_str(item, "key"), "name": req_str(item, "name"), "source": req_str(item, "source"),
                "headers": req_str_list(item, "headers", []), "options": req_str_list(item, "options", []),
                "compile_options": req_str_list(item, "compile_options", []),
                "build_key": req_str(item, "build_key", None, pattern=BUILD_KEY_RE)}
        if spec["key"] != mace_program_key(spec["name"], spec["options"]):
            raise bad_request("programs[%d]: key %r is not MACE's key for name and options (%r)"
                              % (i, spec["key"], mace_program_key(spec["name"], spec["options"])))
        if spec["key"] in keys:
            raise bad_request("programs[%d]: key %r appears twice" % (i, spec["key"]))
        keys.add(spec["key"])
        for opt in spec["options"] + spec["compile_options"]:
            if re.search(r"\s", opt):
                raise bad_request("programs[%d]: option %r contains white space" % (i, opt))
        _load_program_files(spec, root)
        specs.append(spec)
    return specs


def _load_program_files(spec, root):
    source_path = resolve_inside(root, spec["source"])
    # Absolute, so each release's builds are its own: with one path for all releases, two processes
    # building the same program at once into one PoCL cache raced, and PoCL later aborted loading the
    # binary one of them got (pocl_binary_get_kernels_metadata: `len > 0').
    include_dir = os.path.dirname(source_path)
    if re.search(r"\s", include_dir):
        raise bad_request("kernel directory %r contains white space; build options cannot quote it "
                          "(choose a remote_dir without spaces)" % include_dir)
    try:
        spec["source_bytes"] = read_file_limited(source_path, MAX_GET, spec["source"])
        spec["header_bytes"] = [read_file_limited(resolve_inside(root, h), MAX_GET, h)
                                for h in spec["headers"]]
    except OSError as exc:
        raise AgentFailure("io", "program %r: cannot read %s: %s"
                           % (spec["key"], exc.filename, exc.strerror)) from exc
    spec["build_options"] = " ".join(spec["options"] + spec["compile_options"] + ["-I", include_dir])
    # The driver compiles a copy (PoCL: a temp file); a #line directive makes its log name the file
    # as the release has it, e.g. "kernels/relu.cl:3:7: error: ...". Line numbers stay the same.
    quoted = spec["source"].replace("\\", "\\\\").replace('"', '\\"')
    spec["compile_source"] = ('#line 1 "%s"\n' % quoted).encode("utf-8") + spec["source_bytes"]


def program_binary(cl, program):
    sizes = (size_t * 1)()
    cl.call("clGetProgramInfo", program, CL_PROGRAM_BINARY_SIZES, ctypes.sizeof(sizes), sizes, None)
    if sizes[0] == 0:
        raise AgentFailure("opencl", "the driver returned an empty binary (CL_PROGRAM_BINARY_SIZES is 0)")
    buf = ctypes.create_string_buffer(sizes[0])
    pointers = (ptr * 1)(ctypes.addressof(buf))
    cl.call("clGetProgramInfo", program, CL_PROGRAM_BINARIES, ctypes.sizeof(pointers), pointers, None)
    return buf.raw[:sizes[0]]


def build_one(ctx, spec):
    """Build one program from source: a record for the reply, and its binary (None on failure)."""
    cl = ctx.cl
    source = ctypes.c_char_p(spec["compile_source"])
    length = size_t(len(spec["compile_source"]))
    program = cl.create("clCreateProgramWithSource", ctx.context, 1, ctypes.byref(source),
                        ctypes.byref(length))
    try:
        start = time.perf_counter()
        options = spec["build_options"].encode("utf-8")
        code = cl.lib.clBuildProgram(program, 1, ctx.devices, options, None, None)
        build_ms = round((time.perf_counter() - start) * 1000.0, 3)
        try:
            log = cl.info_str("clGetProgramBuildInfo", (program, ctx.device), CL_PROGRAM_BUILD_LOG)
        except ClError as exc:
            log = "(no build log: %s)" % exc.message
        record = {"key": spec["key"], "ok": code == 0, "build_ms": build_ms, "binary_size": 0, "sha256": None,
                  "log": log}
        if code != 0:
            record["error"] = "%s in clBuildProgram" % cl_error_name(code)
            record["log"] = log.strip() and log or record["error"]
            return record, None
        binary = program_binary(cl, program)
        record.update(binary_size=len(binary), sha256=hashlib.sha256(binary).hexdigest())
        return record, binary
    finally:
        cl.release("clReleaseProgram", program)


def cache_pairs(sel, mace_version, built, mace_format="pb"):
    """The entries of mace_cl_compiled_program.bin for `built`, [(manifest entry, binary)]. MACE v1.0 (legacy)
    knows no device-name or program_hash_ entries."""
    p, d = sel.platform_desc, sel.device_desc
    pairs = [(PLATFORM_INFO_KEY, mace_platform_info(p["name"], p["profile"], p["version"], mace_version)
              .encode("utf-8"))]
    if mace_format == "pb":
        pairs.append((DEVICE_NAME_KEY, mace_device_name(d["name"], d["version"]).encode("utf-8")))
    for entry, binary in built:
        pairs.append((entry["key"], binary))
        if mace_format == "pb":
            pairs.append((PROGRAM_HASH_PREFIX + entry["key"], entry["program_hash"].encode("ascii")))
    return pairs


def encode_mace_legacy(pairs):
    # type: (list[tuple[str, bytes]]) -> bytes
    """MACE v0.6.1 to v1.0.4: int64 count, then (int32 key length, key, int32 value length, value),
    little-endian, no checksum. Pairs in ascending key order, as MACE's std::map writes them."""
    out = [struct.pack("<q", len(pairs))]
    for key, value in sorted(pairs):
        raw = key.encode("utf-8")
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<i", len(value)), value]
    return b"".join(out)


def write_logs(build_dir, records):
    """build/logs/<slug>.log for every program; a slug two keys share gets a hash suffix."""
    logs_dir = os.path.join(build_dir, "logs")
    os.makedirs(logs_dir, 0o755, exist_ok=True)
    used = set()
    for record in records:
        slug = log_slug(record["key"])
        if slug in used:
            slug = slug[:190] + "-" + hashlib.sha256(record["key"].encode("utf-8")).hexdigest()[:8]
        used.add(slug)
        write_atomic(os.path.join(logs_dir, slug + ".log"), [record["log"].encode("utf-8", "replace")])
        record["log_file"] = "build/logs/%s.log" % slug


def manifest_of(fingerprint, mace_version, built, cache, mace_format="pb"):
    """build/manifest.json: `built` is [(manifest entry, binary)]."""
    programs = [entry for entry, _ in built]
    return {"schema": 1, "fingerprint": fingerprint, "mace_version": mace_version, "mace_format": mace_format,
            "programs": programs, "cache_sha256": hashlib.sha256(cache).hexdigest(), "cache_size": len(cache)}


def fit_logs(reply, records):
    """Cut each returned log to LOG_TAIL, and further if the reply line would pass MAX_LINE."""
    limit = LOG_TAIL
    while True:
        for record, program in zip(records, reply["programs"]):
            program["log"] = tail_text(record["log"], limit)
        if len(json.dumps(reply)) < MAX_LINE - 4096 or limit < 64:
            return reply
        limit //= 2


MANIFEST_ENTRY_FIELDS = ("key", "name", "options", "compile_options", "binary_size", "sha256", "source_sha256",
                         "program_hash", "build_key")


def manifest_entry(spec, binary):
    """A built program's record in build/manifest.json."""
    return {"key": spec["key"], "name": spec["name"], "options": spec["options"],
            "compile_options": spec["compile_options"], "binary_size": len(binary),
            "sha256": hashlib.sha256(binary).hexdigest(),
            "source_sha256": hashlib.sha256(spec["source_bytes"]).hexdigest(),
            "program_hash": mace_program_hash(spec["source_bytes"], spec["header_bytes"]),
            "build_key": spec.get("build_key")}


def parse_reuse(req, payload):
    """[(reply record, manifest entry, binary)] of the binaries the session took from the base release."""
    reuse = []
    for i, item in enumerate(_field(req, "reuse", []) or []):
        entry = item.get("entry") if isinstance(item, dict) else None
        if not isinstance(entry, dict):
            raise bad_request("reuse[%d]: expected an object with an entry" % i)
        offset, size = req_int(item, "offset", lo=0), req_int(item, "size", lo=1)
        if offset + size > len(payload):
            raise bad_request("reuse[%d]: range past the payload" % i)
        binary = payload[offset:offset + size]
        entry = dict((k, entry.get(k)) for k in MANIFEST_ENTRY_FIELDS)
        req_str(entry, "key")
        req_str(entry, "program_hash")
        if hashlib.sha256(binary).hexdigest() != entry["sha256"]:
            raise AgentFailure("checksum", "reused binary of %r does not match its manifest" % entry["key"])
        record = {"key": entry["key"], "ok": True, "build_ms": 0.0, "binary_size": size,
                  "sha256": entry["sha256"], "log": req_str(item, "log", ""), "reused": True}
        reuse.append((record, entry, binary))
    return reuse


def op_build(cl, sel, req, root, payload=b""):
    mace_version, specs = parse_build(req, root)
    reuse = parse_reuse(req, payload)
    results = []
    if specs:
        ctx = ClContext(cl, sel)
        try:
            results = [build_one(ctx, spec) for spec in specs]
        finally:
            ctx.close()
    records = [r for r, _ in results] + [r for r, _, _ in reuse]
    built = [(manifest_entry(spec, binary), binary) for spec, (_, binary) in zip(specs, results)
             if binary is not None] + [(entry, binary) for _, entry, binary in reuse]
    built.sort(key=lambda item: item[0]["key"])
    mace_format = req_str(req, "mace_format", "pb")
    if mace_format not in ("pb", "legacy"):
        raise bad_request("mace_format must be pb or legacy (got %s)" % _show(mace_format))
    pairs = cache_pairs(sel, mace_version, built, mace_format)
    cache = encode_mace_pb(pairs) if mace_format == "pb" else encode_mace_legacy(pairs)
    build_dir = os.path.join(root, "build")
    os.makedirs(build_dir, 0o755, exist_ok=True)
    write_logs(build_dir, records)
    write_atomic(os.path.join(root, CACHE_FILE), [cache])
    log_files = dict((r["key"], r["log_file"]) for r in records)
    for entry, _ in built:
        entry["log_file"] = log_files.get(entry["key"])
    manifest = manifest_of(fingerprint_of(sel), mace_version, built, cache, mace_format)
    write_atomic(os.path.join(root, MANIFEST_FILE), [json.dumps(manifest, indent=1, sort_keys=True).encode()])
    reply = {"programs": [dict(r) for r in records], "cache_file": CACHE_FILE, "manifest_file": MANIFEST_FILE,
             "cache_sha256": manifest["cache_sha256"], "cache_size": len(cache)}
    return fit_logs(reply, records), b""


# --------------------------------------------------------------------------------------------------
# smoke: verified binaries -> programs -> kernel runs
# --------------------------------------------------------------------------------------------------

def parse_expected(req):
    expected = _field(req, "expected", _MISSING)
    if not isinstance(expected, dict):
        raise bad_request("field 'expected': expected an object {program key: sha256}")
    for key, digest in expected.items():
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            raise bad_request("field 'expected': %r: expected 64 lower-case hex digits (got %s)"
                              % (key, _show(digest)))
    return expected


def _differing_programs(data, expected):
    """For a file whose CRC fails: which expected programs differ from the controller's copy."""
    try:
        table = dict(reversed(decode_mace_pb(data, check_crc=False)))  # the first pair of a key wins
    except ValueError:
        return ""
    differ = sorted(k for k in expected if hashlib.sha256(table.get(k, b"")).hexdigest() != expected[k])
    return "; program(s) differing from the pulled copy: %s" % ", ".join(repr(k) for k in differ) if differ else ""


def load_checked_programs(root, cache_file, expected):
    """Read the cache file and return {key: bytes} for every expected key, each checked against its
    sha256. Any difference is binary_mismatch, found before a driver sees a byte."""
    path = resolve_inside(root, cache_file)
    try:
        data = read_file_limited(path, MAX_GET, cache_file)
    except OSError as exc:
        raise io_failure(exc, cache_file) from exc
    try:
        pairs = decode_any(data)[1]
    except ValueError as exc:
        raise AgentFailure("binary_mismatch", "cache file %s is malformed: %s%s"
                           % (cache_file, exc, _differing_programs(data, expected))) from exc
    table = {}
    for key, value in pairs:
        table.setdefault(key, value)  # MACE: the first pair of a key wins
    programs = {}
    for key in sorted(expected):
        if key not in table:
            raise AgentFailure("binary_mismatch", "program %r is not in %s" % (key, cache_file))
        got = hashlib.sha256(table[key]).hexdigest()
        if got != expected[key]:
            raise AgentFailure("binary_mismatch", "program %r in %s has sha256 %s, expected %s"
                               % (key, cache_file, got, expected[key]))
        programs[key] = table[key]
    return programs


def _range_arg(arg, name, payload_size, where):
    offset, size = arg.get(name), arg.get("size")
    for label, v in ((name, offset), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad_request("%s: '%s' must be an integer >= 0 (got %s)" % (where, label, _show(v)))
    if size == 0 or offset + size > payload_size:
        raise bad_request("%s: bytes [%d, %d) are empty or outside the %d-byte payload"
                          % (where, offset, offset + size, payload_size))


def _positive(arg, name, where, limit=MAX_MEMORY_PAYLOAD):
    n = arg.get(name)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= limit:
        raise bad_request("%s: '%s' must be an integer in [1, %d] (got %s)" % (where, name, limit, _show(n)))
    return n


def _check_image_arg(arg, payload_size, where):
    """{image: offset, size, width, height}: an RGBA float image2d_t made from payload bytes."""
    if set(arg) != {"image", "size", "width", "height"}:
        raise bad_request("%s: an image takes image, size, width and height (got %s)" % (where, _show(arg)))
    _range_arg(arg, "image", payload_size, where)
    width, height = _positive(arg, "width", where, 1 << 16), _positive(arg, "height", where, 1 << 16)
    if arg["size"] != width * height * 16:
        raise bad_request("%s: %d bytes is not a %dx%d RGBA float image (%d bytes)"
                          % (where, arg["size"], width, height, width * height * 16))


def _check_arg(arg, payload_size, where):
    if not isinstance(arg, dict):
        raise bad_request("%s: expected an object" % where)
    if "image" in arg:
        return _check_image_arg(arg, payload_size, where)
    kinds = [k for k in ("in", "out", "scalar", "local") if k in arg]
    if len(kinds) != 1 or set(arg) - {kinds[0], "size"}:
        raise bad_request("%s: expected one of {in, size}, {out}, {scalar, size}, {local}, "
                          "{image, size, width, height} (got %s)" % (where, _show(arg)))
    if kinds[0] in ("in", "scalar"):
        _range_arg(arg, kinds[0], payload_size, where)
    else:
        n = arg[kinds[0]]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_MEMORY_PAYLOAD:
            raise bad_request("%s: '%s' must be a size in bytes > 0 (got %s)" % (where, kinds[0], _show(n)))
        if "size" in arg:
            raise bad_request("%s: '%s' takes no 'size'" % (where, kinds[0]))


def _check_sizes(case, name, where, optional):
    value = case.get(name)
    if value is None and optional:
        return
    if (not isinstance(value, list) or not 1 <= len(value) <= 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise bad_request("%s: '%s' must be a list of 1 to 3 integers >= 1 (got %s)"
                          % (where, name, _show(value)))


def parse_cases(req, payload_size, expected):
    cases = _field(req, "cases", _MISSING)
    if not isinstance(cases, list):
        raise bad_request("field 'cases': expected a list")
    total_out = 0
    for i, case in enumerate(cases):
        where = "cases[%d]" % i
        if not isinstance(case, dict):
            raise bad_request("%s: expected an object" % where)
        if not isinstance(case.get("id"), (str, int)) or isinstance(case.get("id"), bool):
            raise bad_request("%s: 'id' must be a string or integer" % where)
        key, kernel = req_str(case, "program_key"), req_str(case, "kernel")
        if key not in expected:
            raise bad_request("%s: program_key %r is not in 'expected' (every program is checked before "
                              "a driver loads it)" % (where, key))
        if not kernel:
            raise bad_request("%s: 'kernel' is empty" % where)
        args = case.get("args")
        if not isinstance(args, list):
            raise bad_request("%s: 'args' must be a list" % where)
        for j, arg in enumerate(args):
            _check_arg(arg, payload_size, "%s.args[%d]" % (where, j))
            total_out += arg.get("out", 0)
        _check_sizes(case, "global", where, optional=False)
        _check_sizes(case, "local", where, optional=True)
        if case.get("local") is not None and len(case["local"]) != len(case["global"]):
            raise bad_request("%s: 'local' and 'global' differ in length" % where)
    if total_out > MAX_MEMORY_PAYLOAD:
        raise bad_request("outputs total %d bytes, over the limit of %d" % (total_out, MAX_MEMORY_PAYLOAD))
    return cases


def load_program(ctx, binary):
    """clCreateProgramWithBinary + clBuildProgram; returns (program, ms)."""
    cl = ctx.cl
    lengths = (size_t * 1)(len(binary))
    holder = ctypes.create_string_buffer(binary, len(binary))
    pointers = (ptr * 1)(ctypes.addressof(holder))
    status = (cl_int * 1)()
    start = time.perf_counter()
    program = cl.create("clCreateProgramWithBinary", ctx.context, 1, ctx.devices, lengths, pointers, status)
    try:
        code = cl.lib.clBuildProgram(program, 1, ctx.devices, b"", None, None)
        if code != 0:
            raise ClError(code, "clBuildProgram (from binary)")
    except AgentFailure:
        cl.release("clReleaseProgram", program)
        raise
    return program, round((time.perf_counter() - start) * 1000.0, 3)


def create_image(ctx, data, width, height):
    """A read-only CL_RGBA / CL_FLOAT image2d made from `data` (width * height * 16 bytes)."""
    host = ctypes.create_string_buffer(data, len(data))
    image_format = ClImageFormat(CL_RGBA, CL_FLOAT)
    err = cl_int(0)
    create = ctx.cl.optional("clCreateImage2D")
    mem = create(ctx.context, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, ctypes.byref(image_format),
                 width, height, 0, host, ctypes.byref(err))
    if err.value != 0 or not mem:
        raise ClError(err.value or -9999, "clCreateImage2D")
    return mem


def _set_args(ctx, kernel, case, payload, mems):
    """Set every kernel argument; returns [(mem, size)] of the outputs in argument order."""
    cl, outputs = ctx.cl, []
    for index, arg in enumerate(case["args"]):
        if "image" in arg:
            data = payload[arg["image"]:arg["image"] + arg["size"]]
            mem = create_image(ctx, data, arg["width"], arg["height"])
            mems.append(mem)
            cl.call("clSetKernelArg", kernel, index, ctypes.sizeof(ptr), ctypes.byref(ptr(mem)))
        elif "in" in arg or "out" in arg:
            if "in" in arg:
                data = payload[arg["in"]:arg["in"] + arg["size"]]
                host = ctypes.create_string_buffer(data, len(data))
                flags, size = CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, len(data)
            else:
                host, flags, size = None, CL_MEM_WRITE_ONLY, arg["out"]
            mem = cl.create("clCreateBuffer", ctx.context, flags, size, host)
            mems.append(mem)
            cl.call("clSetKernelArg", kernel, index, ctypes.sizeof(ptr), ctypes.byref(ptr(mem)))
            if "out" in arg:
                outputs.append((mem, size))
        elif "scalar" in arg:
            data = payload[arg["scalar"]:arg["scalar"] + arg["size"]]
            cl.call("clSetKernelArg", kernel, index, len(data), ctypes.create_string_buffer(data, len(data)))
        else:
            cl.call("clSetKernelArg", kernel, index, arg["local"], None)
    return outputs


def run_case(ctx, program, case, payload):
    """Run one case: (record, output bytes). A CL error fails only this case."""
    cl, kernel, mems = ctx.cl, None, []
    record = {"id": case["id"], "ok": False, "error": None, "outputs": [], "run_ms": None}
    try:
        kernel = cl.create("clCreateKernel", program, case["kernel"].encode("utf-8"))
        outputs = _set_args(ctx, kernel, case, payload, mems)
        dims = len(case["global"])
        global_size = (size_t * dims)(*case["global"])
        local_size = (size_t * dims)(*case["local"]) if case.get("local") else None
        start = time.perf_counter()
        cl.call("clEnqueueNDRangeKernel", ctx.queue, kernel, dims, None, global_size, local_size,
                0, None, None)
        cl.call("clFinish", ctx.queue)
        run_ms = round((time.perf_counter() - start) * 1000.0, 3)
        chunks = []
        for mem, size in outputs:
            host = ctypes.create_string_buffer(size)
            cl.call("clEnqueueReadBuffer", ctx.queue, mem, 1, 0, size, host, 0, None, None)
            chunks.append(host.raw[:size])
        record.update(ok=True, outputs=[{"size": len(c)} for c in chunks], run_ms=run_ms)
        return record, b"".join(chunks)
    except AgentFailure as exc:
        record["error"] = exc.message
        return record, b""
    finally:
        for mem in mems:
            cl.release("clReleaseMemObject", mem)
        cl.release("clReleaseKernel", kernel)


def op_smoke(cl, sel, req, root, payload):
    expected = parse_expected(req)
    cases = parse_cases(req, len(payload), expected)
    binaries = load_checked_programs(root, req_str(req, "cache_file"), expected)
    ctx = ClContext(cl, sel)
    programs, load_ms, load_errors = {}, {}, {}
    try:
        for key in sorted(binaries):
            try:
                programs[key], load_ms[key] = load_program(ctx, binaries[key])
            except AgentFailure as exc:
                load_errors[key] = exc.message
        records, outputs = [], []
        for case in cases:
            key = case["program_key"]
            if key in load_errors:
                record = {"id": case["id"], "ok": False, "outputs": [], "run_ms": None,
                          "error": "program %r did not load from its binary: %s" % (key, load_errors[key])}
                data = b""
            else:
                record, data = run_case(ctx, programs[key], case, payload)
            records.append(record)
            outputs.append(data)
    finally:
        for program in programs.values():
            cl.release("clReleaseProgram", program)
        ctx.close()
    data = b"".join(outputs)
    return {"load_ms": load_ms, "load_errors": load_errors, "cases": records, "payload_size": len(data)}, data


# --------------------------------------------------------------------------------------------------
# startup: what an app pays at start, with the driver's own kernel cache off; the models' forward pass
# --------------------------------------------------------------------------------------------------

# `startup` runs in a child whose environment turns the drivers' own kernel caches off before the OpenCL
# library loads: otherwise "built from source" would be a cache hit (PoCL) or a JIT-cache hit (NVIDIA).
NO_DRIVER_CACHE_ENV = {"POCL_KERNEL_CACHE": "0", "CUDA_CACHE_DISABLE": "1"}
MAX_MODELS = 16
MAX_MODEL_STEPS = 4096
MAX_MODEL_RUNS = 1000
WARM_UP_SOURCE = b"__kernel void deployer_warm_up(__global int *x) { x[get_global_id(0)] = 0; }\n"


def _tensor_name(value, where):
    if not isinstance(value, str) or not value or len(value) > 200:
        raise bad_request("%s: expected a tensor name (got %s)" % (where, _show(value)))
    return value


def _parse_tensors(model, payload_size, where):
    """{name: has data} of a model's tensors; data is a payload range of exactly the tensor's size."""
    tensors = model.get("tensors")
    if not isinstance(tensors, list) or not tensors:
        raise bad_request("%s: 'tensors' must be a non-empty list" % where)
    names, total = {}, 0
    for j, tensor in enumerate(tensors):
        at = "%s.tensors[%d]" % (where, j)
        if not isinstance(tensor, dict) or "name" not in tensor or set(tensor) - {"name", "size", "data"}:
            raise bad_request("%s: expected {name, size, data} (got %s)" % (at, _show(tensor)))
        name = _tensor_name(tensor["name"], at)
        if name in names:
            raise bad_request("%s: tensor %r appears twice" % (at, name))
        total += _positive(tensor, "size", at)
        if tensor.get("data") is not None:
            _range_arg({"data": tensor["data"], "size": tensor["size"]}, "data", payload_size, at)
        names[name] = tensor.get("data") is not None
    if total > MAX_MEMORY_PAYLOAD:
        raise bad_request("%s: tensors total %d bytes, over the limit of %d" % (where, total, MAX_MEMORY_PAYLOAD))
    return names


def _parse_step(step, names, payload_size, expected, at):
    if not isinstance(step, dict):
        raise bad_request("%s: expected an object" % at)
    key = req_str(step, "program_key")
    if key not in expected:
        raise bad_request("%s: program_key %r is not in 'expected'" % (at, key))
    if not req_str(step, "kernel"):
        raise bad_request("%s: 'kernel' is empty" % at)
    args = step.get("args")
    if not isinstance(args, list):
        raise bad_request("%s: 'args' must be a list" % at)
    for k, arg in enumerate(args):
        arg_at = "%s.args[%d]" % (at, k)
        if isinstance(arg, dict) and set(arg) == {"tensor"}:
            if arg["tensor"] not in names:
                raise bad_request("%s: no tensor %s" % (arg_at, _show(arg["tensor"])))
        elif isinstance(arg, dict) and ("scalar" in arg or "local" in arg):
            _check_arg(arg, payload_size, arg_at)
        else:
            raise bad_request("%s: expected {tensor}, {scalar, size} or {local} (got %s)" % (arg_at, _show(arg)))
    _check_sizes(step, "global", at, optional=False)
    _check_sizes(step, "local", at, optional=True)
    if step.get("local") is not None and len(step["local"]) != len(step["global"]):
        raise bad_request("%s: 'local' and 'global' differ in length" % at)


def parse_models(req, payload_size, expected):
    """The request's `models`: named tensors (weights and input are payload ranges), steps that launch
    the library's kernels on them, the input tensor (uploaded again before every run), the outputs."""
    models = req.get("models", [])
    if not isinstance(models, list) or len(models) > MAX_MODELS:
        raise bad_request("field 'models': expected a list of at most %d models" % MAX_MODELS)
    for i, model in enumerate(models):
        where = "models[%d]" % i
        if not isinstance(model, dict):
            raise bad_request("%s: expected an object" % where)
        req_str(model, "name")
        req_int(model, "runs", 10, lo=0, hi=MAX_MODEL_RUNS)
        names = _parse_tensors(model, payload_size, where)
        if not names.get(_tensor_name(model.get("input"), where + ".input")):
            raise bad_request("%s: input %s is not a tensor with data" % (where, _show(model.get("input"))))
        outputs = model.get("outputs")
        if not isinstance(outputs, list) or not outputs or any(o not in names for o in outputs):
            raise bad_request("%s: 'outputs' must be a non-empty list of tensor names" % where)
        steps = model.get("steps")
        if not isinstance(steps, list) or not 0 < len(steps) <= MAX_MODEL_STEPS:
            raise bad_request("%s: 'steps' must be a list of 1 to %d steps" % (where, MAX_MODEL_STEPS))
        for j, step in enumerate(steps):
            _parse_step(step, names, payload_size, expected, "%s.steps[%d]" % (where, j))
    return models


def _read_buffer(ctx, mem, size):
    """A blocking read: on the in-order queue it also waits for every kernel enqueued before it."""
    host = ctypes.create_string_buffer(size)
    ctx.cl.call("clEnqueueReadBuffer", ctx.queue, mem, 1, 0, size, host, 0, None, None)
    return host.raw[:size]


def _model_kernel(ctx, programs, step, mems, payload):
    """Create one step's kernel and set its arguments: (kernel, dims, global, local)."""
    cl, key = ctx.cl, step["program_key"]
    if key not in programs:
        raise AgentFailure("opencl", "program %r did not load from its binary" % key)
    kernel = cl.create("clCreateKernel", programs[key], step["kernel"].encode("utf-8"))
    try:
        for index, arg in enumerate(step["args"]):
            if "tensor" in arg:
                cl.call("clSetKernelArg", kernel, index, ctypes.sizeof(ptr), ctypes.byref(ptr(mems[arg["tensor"]])))
            elif "scalar" in arg:
                data = payload[arg["scalar"]:arg["scalar"] + arg["size"]]
                cl.call("clSetKernelArg", kernel, index, len(data), ctypes.create_string_buffer(data, len(data)))
            else:
                cl.call("clSetKernelArg", kernel, index, arg["local"], None)
    except AgentFailure as exc:
        cl.release("clReleaseKernel", kernel)
        raise AgentFailure(exc.kind, "%s (kernel %s)" % (exc.message, step["kernel"])) from exc
    dims = len(step["global"])
    local = (size_t * dims)(*step["local"]) if step.get("local") else None
    return kernel, dims, (size_t * dims)(*step["global"]), local


def _forward(ctx, launches, outputs):
    for kernel, dims, global_size, local_size in launches:
        ctx.cl.call("clEnqueueNDRangeKernel", ctx.queue, kernel, dims, None, global_size, local_size,
                    0, None, None)
    return [_read_buffer(ctx, mem, size) for mem, size in outputs]


def run_model(ctx, programs, model, payload):
    """One model from programs already loaded: the first inference (buffers, weights upload, kernels,
    run, read back: what an app's first call pays), then `runs` steady ones (upload the input, run, read;
    each must give the first one's bytes). Returns (record, output bytes); a CL error fails the model only."""
    cl = ctx.cl
    record = {"name": model["name"], "ok": False, "error": None, "first_inference_ms": None,
              "steady_ms": None, "runs": 0, "outputs": []}
    mems, launches = {}, []
    sizes = dict((t["name"], t["size"]) for t in model["tensors"])
    try:
        start = time.perf_counter()
        for tensor in model["tensors"]:
            offset, size = tensor.get("data"), tensor["size"]
            host = None if offset is None else ctypes.create_string_buffer(payload[offset:offset + size], size)
            flags = CL_MEM_READ_WRITE | (0 if host is None else CL_MEM_COPY_HOST_PTR)
            mems[tensor["name"]] = cl.create("clCreateBuffer", ctx.context, flags, size, host)
        for step in model["steps"]:
            launches.append(_model_kernel(ctx, programs, step, mems, payload))
        outputs = [(mems[name], sizes[name]) for name in model["outputs"]]
        first = _forward(ctx, launches, outputs)
        first_ms = (time.perf_counter() - start) * 1000.0
        offset = next(t["data"] for t in model["tensors"] if t["name"] == model["input"])
        size = sizes[model["input"]]
        input_host = ctypes.create_string_buffer(payload[offset:offset + size], size)
        times = []
        for run in range(model.get("runs", 10)):
            start = time.perf_counter()
            cl.call("clEnqueueWriteBuffer", ctx.queue, mems[model["input"]], 1, 0, size, input_host, 0, None, None)
            again = _forward(ctx, launches, outputs)
            times.append((time.perf_counter() - start) * 1000.0)
            if again != first:
                raise AgentFailure("nondeterministic", "run %d of model %r gave other bytes than the first"
                                   % (run + 2, model["name"]))
        record.update(ok=True, first_inference_ms=round(first_ms, 3), runs=len(times),
                      steady_ms=round(statistics.median(times), 3) if times else None,
                      outputs=[{"size": len(o)} for o in first])
        return record, b"".join(first)
    except AgentFailure as exc:
        record["error"] = exc.message
        return record, b""
    finally:
        for launch in launches:
            cl.release("clReleaseKernel", launch[0])
        for mem in mems.values():
            cl.release("clReleaseMemObject", mem)


def time_source_build(ctx, spec):
    """clCreateProgramWithSource + clBuildProgram of one program, in ms (load_program's counterpart). The
    program is released without asking for its binary: on PoCL that generates code an app building from
    source would only generate at its first run."""
    cl = ctx.cl
    source = ctypes.c_char_p(spec["compile_source"])
    length = size_t(len(spec["compile_source"]))
    start = time.perf_counter()
    program = cl.create("clCreateProgramWithSource", ctx.context, 1, ctypes.byref(source), ctypes.byref(length))
    try:
        code = cl.lib.clBuildProgram(program, 1, ctx.devices, spec["build_options"].encode("utf-8"), None, None)
        elapsed = round((time.perf_counter() - start) * 1000.0, 3)
    finally:
        cl.release("clReleaseProgram", program)
    if code != 0:
        raise ClError(code, "clBuildProgram (from source)")
    return elapsed


def op_startup(cl, sel, req, root, payload):
    """Start-up figures and models, in this order: (1) every program from its cached binary, as an app
    starts; (2) each model's first and steady inferences; (3) a throw-away build (the compiler's own
    start-up), then every program built from source. Run with NO_DRIVER_CACHE_ENV set."""
    expected = parse_expected(req)
    specs = parse_program_specs(req, root)
    missing = [s["key"] for s in specs if s["key"] not in expected]
    if missing:
        raise bad_request("programs %s are not in 'expected'" % ", ".join(repr(k) for k in missing))
    models = parse_models(req, len(payload), expected)
    binaries = load_checked_programs(root, req_str(req, "cache_file"), expected)
    ctx = ClContext(cl, sel)
    programs, load_ms, build_ms, errors, records, outputs = {}, {}, {}, {}, [], []
    try:
        for key in sorted(binaries):
            try:
                programs[key], load_ms[key] = load_program(ctx, binaries[key])
            except AgentFailure as exc:
                errors[key] = "from binary: %s" % exc.message
        for model in models:
            record, data = run_model(ctx, programs, model, payload)
            records.append(record)
            outputs.append(data)
        try:
            warm_up = time_source_build(ctx, {"compile_source": WARM_UP_SOURCE, "build_options": ""})
        except AgentFailure:
            warm_up = None
        for spec in specs:
            try:
                build_ms[spec["key"]] = time_source_build(ctx, spec)
            except AgentFailure as exc:
                errors[spec["key"]] = "from source: %s" % exc.message
    finally:
        for program in programs.values():
            cl.release("clReleaseProgram", program)
        ctx.close()
    figures = [{"key": s["key"], "load_from_binary_ms": load_ms.get(s["key"]),
                "build_from_source_ms": build_ms.get(s["key"]), "error": errors.get(s["key"])} for s in specs]
    data = b"".join(outputs)
    return {"programs": figures, "compiler_start_ms": warm_up, "models": records,
            "payload_size": len(data)}, data


# --------------------------------------------------------------------------------------------------
# child: one OpenCL request, one reply
# --------------------------------------------------------------------------------------------------

CHILD_OPS = ("fingerprint", "build", "smoke", "startup")


def run_child_request(req, payload):
    op = req.get("op")
    if op not in CHILD_OPS:
        raise bad_request("the child runs %s, not %r" % (", ".join(CHILD_OPS), op))
    root = req_str(req, "root")
    if not os.path.isabs(root) or not os.path.isdir(root):
        raise bad_request("field 'root': %r is not an absolute directory" % root)
    root = os.path.realpath(root)
    selection = parse_selection(req.get("opencl"))
    cl = OpenCL()
    sel = select_device(cl, selection)
    if op == "fingerprint":
        return {"fingerprint": fingerprint_of(sel)}, b""
    if op == "build":
        return op_build(cl, sel, req, root, payload)
    if op == "startup":
        return op_startup(cl, sel, req, root, payload)
    return op_smoke(cl, sel, req, root, payload)


def child_main():
    # Drivers may print to stdout; keep the real stdout for the reply and send fd 1 to stderr.
    reply_stream = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        req, payload = read_message(sys.stdin.buffer)
        reply, out = run_child_request(req, payload)
        reply = dict(reply, ok=True)
    except AgentFailure as exc:
        reply, out = exc.reply(), b""
    except (FramingError, EOFError) as exc:
        reply, out = bad_request("child request: %s" % exc).reply(), b""
    except OSError as exc:
        reply, out = io_failure(exc, exc.filename or "(file)").reply(), b""
    except Exception as exc:  # the agent never answers with a traceback
        reply, out = AgentFailure("internal", "%s: %s" % (type(exc).__name__, exc)).reply(), b""
    write_message(reply_stream, reply, out)
    # Skip interpreter and driver teardown: a driver crashing in its destructors after a complete
    # reply must not turn a good result into driver_crash.
    os._exit(0)


def stderr_tail(data, lines=12, chars=2000):
    text = data.decode("utf-8", "replace").strip()
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def child_command():
    """How to start `child`: by import (its bytecode cached) when this file's name allows it."""
    here = os.path.abspath(__file__)
    name = os.path.splitext(os.path.basename(here))[0]
    if here.endswith(".py") and re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", name):
        return [sys.executable, "-c", LAUNCH, os.path.dirname(here), name, "child"]
    return [sys.executable, here, "child"]


def run_child(req, payload, root, timeout, env=None):
    """Run one OpenCL op in `agent_main.py child`: (reply, payload). A child killed by a signal is
    driver_crash, one past `timeout` seconds is killed and reported as timeout. `env`: the child's
    environment (default: the agent's)."""
    op = req.get("op")
    request = io.BytesIO()
    write_message(request, dict(req, root=root), payload)
    child = subprocess.Popen(child_command(), env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = child.communicate(request.getvalue(), timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        tail = stderr_tail(err)
        raise AgentFailure("timeout", "OpenCL %s did not finish within %g s; the child was killed%s"
                           % (op, timeout, "; stderr: " + tail if tail else "")) from None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = "signal %d" % -child.returncode
        tail = stderr_tail(err)
        raise AgentFailure("driver_crash", "OpenCL driver crashed (%s) during %s%s"
                           % (name, op, "; stderr: " + tail if tail else ""))
    try:
        reply, reply_payload = read_message(io.BytesIO(out))
    except (FramingError, EOFError) as exc:
        raise AgentFailure("internal", "the OpenCL child exited with status %d and no valid reply (%s); "
                           "stderr: %s" % (child.returncode, exc, stderr_tail(err))) from exc
    if reply.pop("ok", None) is not True:
        error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
        raise AgentFailure(str(error.get("kind", "internal")), str(error.get("message", reply)))
    return reply, reply_payload


# --------------------------------------------------------------------------------------------------
# serve: the session
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# Incremental pushes: what the current release holds, the driver stamp, reuse, blobs (design.md 11)
# --------------------------------------------------------------------------------------------------

DRIVER_ENV_RE = re.compile(r"(OCL_|POCL_|CUDA_|OPENCL|CL_|GPU_|HSA_|ROC|MALI|ADRENO|LD_LIBRARY_PATH$|LD_PRELOAD$)")
LIBRARY_GLOBS = ("/usr/lib", "/usr/lib/*-linux-*", "/usr/lib64", "/lib", "/lib/*-linux-*", "/lib64",
                 "/usr/local/lib", "/vendor/lib64", "/vendor/lib", "/system/vendor/lib64", "/system/lib64")


def _stat_record(path):
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _find_library(name):
    """Where the dynamic loader would most likely find `name`: a path as is, else the usual folders."""
    if "/" in name:
        return name
    folders = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    for pattern in LIBRARY_GLOBS:
        folders += sorted(glob.glob(pattern))
    for folder in folders:
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    return name


def driver_stamp(selection):
    """A hash of everything that decides the fingerprint without loading a driver: the kernel release,
    the driver-related environment, the ICD files and the files of the libraries they name, the loader,
    and the OpenCL selection. A driver upgrade changes a library's size, mtime or inode, so the stamp
    changes and the next push fingerprints again (child process, ~80 ms on PoCL); otherwise the cached
    fingerprint stands."""
    where, files = icd_files()
    icds = []
    for path in files:
        try:
            library = icd_library(path)
        except OSError:
            library = ""
        icds.append([_stat_record(path), library, _stat_record(_find_library(library)) if library else None])
    parts = {"uname": os.uname().release, "where": where, "icds": icds,
             "loader": _stat_record(_find_library("libOpenCL.so.1")),
             "env": sorted((k, v) for k, v in os.environ.items() if DRIVER_ENV_RE.match(k)),
             "selection": selection, "agent": AGENT_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def read_json_file(path, limit=MAX_INDEX):
    """A JSON object the agent wrote earlier, or None if it is missing, too big or not an object."""
    try:
        value = json.loads(read_file_limited(path, limit, path).decode("utf-8"))
    except (OSError, ValueError, AgentFailure):
        return None
    return value if isinstance(value, dict) else None


def release_index(release_dir):
    """{path: {size, sha256, mode}} of a committed release (empty for one without an index)."""
    index = read_json_file(os.path.join(release_dir, RELEASE_INDEX)) if release_dir else None
    files = index.get("files") if index else None
    if not isinstance(files, dict):
        return {}
    return {path: rec for path, rec in files.items()
            if isinstance(rec, dict) and isinstance(rec.get("size"), int)
            and SHA256_RE.fullmatch(str(rec.get("sha256")))}


def parse_file_list(req):
    """begin's optional `files`: every file the new release will hold, [{path, size, sha256, mode}]."""
    files = _field(req, "files", None)
    if files is None:
        return None
    if not isinstance(files, list):
        raise bad_request("field 'files': expected a list")
    parsed = []
    for i, item in enumerate(files):
        if not isinstance(item, dict):
            raise bad_request("files[%d]: expected an object" % i)
        parsed.append({"path": req_str(item, "path"), "size": req_int(item, "size", lo=0),
                       "sha256": req_str(item, "sha256", pattern=SHA256_RE),
                       "mode": req_int(item, "mode", 0o644, lo=0, hi=0o777)})
    return parsed


def link_unchanged(files, base_dir, root, drop):
    """A release as a delta on `base_dir`: every file of the base except those in `drop` or `files` is
    hard-linked unchanged, and each file of `files` is linked too when the base holds its content at any
    path (a rename). Returns (paths the controller must still send, {path: record} linked). A failed
    link (another file system, a link limit) just means that file travels."""
    index = release_index(base_dir)
    by_content = {}
    for path, rec in index.items():
        by_content.setdefault((rec["sha256"], rec["size"]), path)
    listed = set(item["path"] for item in files)
    wanted = [dict(rec, path=path) for path, rec in sorted(index.items()) if path not in listed and path not in drop]
    need, linked = [], {}
    for item in wanted + files:
        source = by_content.get((item["sha256"], item["size"])) if item["path"] in listed else item["path"]
        if source is not None and _link_from(base_dir, source, root, item):
            linked[item["path"]] = {"size": item["size"], "sha256": item["sha256"], "mode": item.get("mode", 0o644)}
        else:
            need.append(item["path"])
    return need, linked


def _link_from(base_dir, source, root, item):
    target = prepare_target(root, item["path"])
    try:
        source_path = resolve_inside(base_dir, source)
        st = os.lstat(source_path)
        if st.st_size != item["size"] or not stat.S_ISREG(st.st_mode):
            return False
        os.link(source_path, target)
        return True
    except (OSError, AgentFailure):
        return False


def prepare_target(root, rel):
    """The path of a new file in the release, its folders created and re-checked to be inside it."""
    target = resolve_inside(root, rel)
    os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
    if not _inside(os.path.realpath(os.path.dirname(target)), root):  # checked again once created
        raise bad_request("path %r resolves outside the release" % rel)
    return target


def reusable_programs(base_dir, manifest, keep):
    """{key: (manifest entry, binary, log text)} for the `keep` programs of the base release, each binary
    checked against the base's manifest (a damaged one is left out, and so is built again)."""
    programs = manifest.get("programs") if isinstance(manifest.get("programs"), list) else []
    old = {p.get("key"): p for p in programs if isinstance(p, dict)}
    wanted = dict((key, old[key]) for key in keep if key in old)
    if not wanted:
        return {}
    try:
        _, pairs = decode_any(read_file_limited(os.path.join(base_dir, CACHE_FILE), MAX_GET, CACHE_FILE))
    except (OSError, ValueError, AgentFailure):
        return {}
    binaries = {}
    for key, value in pairs:
        binaries.setdefault(key, value)  # MACE: the first pair of a key wins
    reuse = {}
    for key, record in wanted.items():
        binary = binaries.get(key)
        if binary is None or hashlib.sha256(binary).hexdigest() != record.get("sha256"):
            continue  # the old cache file does not hold what its manifest says: build it again
        log_file = record.get("log_file")
        log = b""
        if isinstance(log_file, str) and log_file.startswith("build/logs/"):
            try:
                log = read_file_limited(resolve_inside(base_dir, log_file), LOG_TAIL * 64, log_file)
            except (OSError, AgentFailure):
                log = b""
        reuse[key] = (record, binary, log.decode("utf-8", "replace"))
    return reuse


def link_build(previous_dir, root, manifest, reuse):
    """Every program is reused and nothing else changed: the current release's cache file is exactly
    what a build would write, so its build folder is hard-linked (copied where links fail) into the new
    release, and no driver runs at all."""
    source = os.path.join(previous_dir, "build")
    for dirpath, _, names in os.walk(source):
        target_dir = os.path.join(root, "build", os.path.relpath(dirpath, source))
        os.makedirs(target_dir, 0o755, exist_ok=True)
        for name in names:
            try:
                os.link(os.path.join(dirpath, name), os.path.join(target_dir, name))
            except OSError:
                shutil.copy2(os.path.join(dirpath, name), os.path.join(target_dir, name))
    records = [{"key": p["key"], "ok": True, "build_ms": 0.0, "binary_size": p.get("binary_size"),
                "sha256": p.get("sha256"), "log": reuse[p["key"]][2], "reused": True}
               for p in manifest["programs"]]
    reply = {"programs": records, "cache_file": CACHE_FILE, "manifest_file": MANIFEST_FILE,
             "cache_sha256": manifest.get("cache_sha256"), "cache_size": manifest.get("cache_size")}
    return fit_logs(reply, [dict(r) for r in records]), b""


def blob_path(rd, sha256):
    return os.path.join(rd, BLOB_DIR, sha256)


def stored_blobs(rd):
    try:
        return sorted(n for n in os.listdir(os.path.join(rd, BLOB_DIR)) if SHA256_RE.fullmatch(n))
    except OSError:
        return []


def blob_payload(rd, req, payload, store):
    """The bytes of a smoke/startup request: sent now (stored by hash when `blob` names it and `store`)
    or, with no payload, read back from RD/blobs/<blob> and checked."""
    want = req.get("blob")
    if want is None:
        return payload.read_all()
    want = req_str(req, "blob", pattern=SHA256_RE)
    path = blob_path(rd, want)
    if payload.size:
        data = payload.read_all()
        if hashlib.sha256(data).hexdigest() != want:
            raise AgentFailure("checksum", "payload does not match its blob sha256 %s" % want)
        if store:
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            write_atomic(path, [data])
        return data
    try:
        data = read_file_limited(path, MAX_MEMORY_PAYLOAD, "blob " + want)
    except OSError:
        raise AgentFailure("no_blob", "blob %s is not on the device; send it with the request" % want) from None
    if hashlib.sha256(data).hexdigest() != want:
        os.unlink(path)
        raise AgentFailure("no_blob", "blob %s was damaged on the device and is removed; send it again" % want)
    if store:
        os.utime(path)  # recently used blobs survive pruning
    return data


BLOB_FIELDS = ("cases", "models")


def split_blob_fields(req, data):
    """A blob may start with `blob_json` bytes of JSON holding the request's large, stable fields (cases,
    models), so they too are sent once per content; the rest is the payload their offsets refer to.
    `run` then picks the cases (by id) or models (by name) this request runs."""
    size = req.get("blob_json")
    if size is None:
        return req, data
    size = req_int(req, "blob_json", lo=0, hi=len(data))
    try:
        fields = json.loads(data[:size].decode("utf-8"))
    except ValueError as exc:
        raise bad_request("blob_json: not JSON: %s" % exc) from None
    if not isinstance(fields, dict) or set(fields) - set(BLOB_FIELDS):
        raise bad_request("blob_json: expected an object of %s" % ", ".join(BLOB_FIELDS))
    req = dict(req, **fields)
    run = req.get("run")
    if run is not None:
        if not isinstance(run, list):
            raise bad_request("field 'run': expected a list of ids or names")
        chosen = set(str(r) for r in run)
        name = "cases" if req["op"] == "smoke" else "models"
        items = req.get(name) if isinstance(req.get(name), list) else []
        req[name] = [c for c in items if isinstance(c, dict) and str(c.get("id", c.get("name"))) in chosen]
    return req, data[size:]


def prune_blobs(rd, keep=KEEP_BLOBS):
    names = stored_blobs(rd)
    paths = sorted((os.path.join(rd, BLOB_DIR, n) for n in names), key=lambda p: os.stat(p).st_mtime,
                   reverse=True)
    for path in paths[keep:]:
        try:
            os.unlink(path)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------
# Collect: finding, reading and installing app caches outside the remote dir (deploy collect, cache install)
# --------------------------------------------------------------------------------------------------

MAX_FIND_FILES = 100000
FIND_TIME_S = 30.0


def _found(path, max_size):
    """What `find` says of one match: regular files only, never followed through a symlink."""
    entry = {"path": path}
    try:
        st = os.lstat(path)
    except OSError as exc:
        entry.update(kind="error", error=exc.strerror or str(exc))
        return entry
    entry.update(size=st.st_size, mtime=st.st_mtime)
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        entry.update(kind="symlink", error="a symbolic link (to %s): not followed" % target)
    elif not stat.S_ISREG(st.st_mode):
        entry.update(kind="other", error="not a regular file")
    elif st.st_size > max_size:
        entry.update(kind="too_big", error="%d bytes, over the %d-byte cap" % (st.st_size, max_size))
    else:
        try:
            entry.update(kind="file", sha256=_hash_nofollow(path))
        except OSError as exc:
            entry.update(kind="denied" if exc.errno in (errno.EACCES, errno.EPERM) else "error",
                         error=exc.strerror or str(exc))
    return entry


def _hash_nofollow(path):
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def op_find(req, payload):
    """Files matching glob patterns (`~` allowed, `**` recursive), bounded in count and time."""
    patterns = req_str_list(req, "patterns")
    max_files = req_int(req, "max_files", 1000, lo=1, hi=MAX_FIND_FILES)
    max_size = req_int(req, "max_size", MAX_GET, lo=0)
    deadline = time.time() + FIND_TIME_S
    files, seen, truncated = [], set(), False
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if not os.path.isabs(expanded):
            raise bad_request("pattern %s is not an absolute path" % _show(pattern))
        for path in glob.iglob(expanded, recursive=True):
            if len(files) >= max_files or time.time() > deadline:
                truncated = True
                break
            if path not in seen:
                seen.add(path)
                files.append(_found(path, max_size))
    return {"files": files, "truncated": truncated}, b""


def op_read(req, payload):
    """One file found by `find`, re-checked: still a regular file, still the size and hash it had."""
    path = req_str(req, "path")
    size = req_int(req, "size", lo=0, hi=MAX_GET)
    want = req_str(req, "sha256", pattern=SHA256_RE)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise AgentFailure("io", "%s: not a regular file" % path)
            data = f.read(size + 1)
    except OSError as exc:
        raise io_failure(exc, path) from exc
    got = hashlib.sha256(data).hexdigest()
    if len(data) != size or got != want:
        raise AgentFailure("changed", "%s changed while being read (was %d bytes, now %s%d)"
                           % (path, size, "over " if len(data) > size else "", len(data)))
    return {"path": path, "size": len(data), "sha256": got, "payload_size": len(data)}, data


def op_install(req, payload):
    """Write a file where an app reads it: a plain writable copy (temp, fsync, rename), never a link."""
    to = os.path.expanduser(req_str(req, "to"))
    size = req_int(req, "size", lo=0, hi=MAX_GET)
    want = req_str(req, "sha256", pattern=SHA256_RE)
    if not os.path.isabs(to) or "\0" in to:
        raise bad_request("install target %s is not an absolute path" % _show(to))
    data = payload.read_all()
    if len(data) != size or hashlib.sha256(data).hexdigest() != want:
        raise AgentFailure("checksum", "install payload does not match its size/sha256")
    try:
        if os.path.islink(to):
            raise AgentFailure("io", "%s is a symbolic link: refusing to write through it" % to)
        os.makedirs(os.path.dirname(to), exist_ok=True)
        write_atomic(to, [data], mode=0o644)
    except OSError as exc:
        raise io_failure(exc, to) from exc
    return {"to": to, "size": size}, b""


class SessionEnd(Exception):
    """Input ended or the agent was told to stop (SIGTERM/SIGHUP): abandon an uncommitted release."""


def _on_signal(signum, frame):
    raise SessionEnd("stopped by %s" % signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class signals_deferred:
    """Hold SIGTERM/SIGHUP while `current` is being switched: a commit the agent received completes (the
    switch, fsync of RD, pruning) and a stop signal is acted on after it, never half-way. A
    `with` class rather than contextlib, for the 3.6 agent's sake; only the main thread calls it."""

    def __enter__(self):
        self.previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        return self

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.previous)  # a held signal is delivered here
        return False


WRITING_OPS = ("begin", "put", "build", "commit", "rollback", "install")


class Session:
    """One controller session: at most one begun release, and the lock while writing it."""

    def __init__(self, rd):
        self.rd = rd
        self.lock_fd = None
        self.release_id = None
        self.files = {}  # path -> {size, sha256, mode} of the begun release: its index at commit
        self.readonly = bool(os.environ.get(READONLY_ENV))
        self.ops = {"state": self.op_state, "begin": self.op_begin, "put": self.op_put,
                    "fingerprint": self.op_opencl,
                    "build": self.op_opencl, "smoke": self.op_opencl, "startup": self.op_opencl, "get": self.op_get,
                    "commit": self.op_commit, "bye": self.op_bye,
                    "find": op_find, "read": op_read, "install": op_install, "rollback": self.op_rollback}

    # ----- helpers -----

    def release_dir(self, release_id=None):
        return os.path.join(self.rd, "releases", release_id or self.release_id)

    def need_release(self):
        if self.release_id is None:
            raise bad_request("no release begun in this session (send begin first)")
        return self.release_dir()

    def unlock(self):
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor drops the flock
            self.lock_fd = None

    def abandon(self):
        """Delete the begun, uncommitted release (so `current` stays as it was) and drop the lock.

        A signal can land between commit's rename and its bookkeeping: a release that `current`
        already points to is never deleted."""
        if self.release_id is not None and self.previous() != self.release_id:
            shutil.rmtree(self.release_dir(), ignore_errors=True)
        self.release_id = None
        self.files = {}
        self.unlock()

    def previous(self):
        try:
            target = os.readlink(os.path.join(self.rd, "current"))
        except OSError:
            return None
        return os.path.basename(target.rstrip("/")) or None

    # ----- ops: each returns (reply fields, payload bytes) -----

    def take_lock(self):
        """RD/.lock, held until the session commits or ends: two controllers never race on `current`."""
        lock_path = os.path.join(self.rd, ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AgentFailure("locked", "another deploy is writing this device (lock %s)"
                                   % lock_path) from exc
            raise
        self.lock_fd = fd

    def switch_current(self, release_id):
        """Point `current` at releases/<id> with one rename of a temp symlink, then fsync RD."""
        tmp = os.path.join(self.rd, ".current.tmp-%d" % os.getpid())
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink("releases/" + release_id, tmp)
            os.rename(tmp, os.path.join(self.rd, "current"))
        except BaseException as exc:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise io_failure(exc, "current") from exc
            raise
        phase_hook("switch", 0)
        fsync_dir(self.rd)

    def current_dir(self):
        current = self.previous()
        path = os.path.join(self.rd, "releases", current) if current else None
        return path if path and os.path.isdir(path) else None

    def op_state(self, req, payload):
        """Everything the controller needs to plan an incremental push, in one round trip: the current
        release's file index and build manifest, the cached fingerprint if the driver stamp still matches,
        and the stored blobs. Reads only; takes no lock."""
        selection = req.get("opencl")
        parse_selection(selection)
        current = self.current_dir()
        manifest = read_json_file(os.path.join(current, MANIFEST_FILE)) if current else None
        cached = read_json_file(os.path.join(self.rd, FINGERPRINT_CACHE), 1 << 20) or {}
        stamp = driver_stamp(selection)
        state = {"current": self.previous(), "files": release_index(current), "manifest": manifest,
                 "fingerprint": cached.get("fingerprint") if cached.get("stamp") == stamp else None,
                 "blobs": stored_blobs(self.rd)}
        data = json.dumps(state, sort_keys=True).encode("utf-8")
        return {"current": state["current"], "payload_size": len(data)}, data

    def op_begin(self, req, payload):
        release_id = req_str(req, "release", pattern=RELEASE_ID_RE)
        if release_id in (".", "..") or len(release_id) > 200:
            raise bad_request("field 'release': %r is not a usable id" % release_id)
        if self.release_id is not None:
            raise bad_request("release %r is already begun in this session" % self.release_id)
        self.take_lock()
        try:
            os.makedirs(os.path.join(self.rd, "releases"), 0o755, exist_ok=True)
            os.mkdir(self.release_dir(release_id), 0o755)
        except FileExistsError:
            self.unlock()
            raise bad_request("release %r already exists in %s/releases" % (release_id, self.rd)) from None
        except OSError:
            self.unlock()
            raise
        self.release_id = release_id
        files = parse_file_list(req)
        need = None
        if files is not None:
            try:
                need, self.files = link_unchanged(files, self.base_dir(req), self.release_dir(),
                                                  req_str_list(req, "drop", []))
            except BaseException:
                self.abandon()
                raise
        return {"release": release_id, "previous": self.previous(), "need": need}, b""

    def base_dir(self, req):
        """The release a delta is relative to: `base` must still be `current` (checked under the lock),
        else another deploy moved it since the controller planned, and the plan is void."""
        base = req_str(req, "base", None, pattern=RELEASE_ID_RE)
        if base is None:
            return None
        if base != self.previous() or self.current_dir() is None:
            raise AgentFailure("moved", "current is %s, not %s as planned: another deploy changed this device "
                               "meanwhile; run the push again" % (self.previous(), base))
        return os.path.realpath(self.current_dir())

    def op_put(self, req, payload):
        rel = req_str(req, "path")
        size = req_int(req, "size", lo=0)
        want = req_str(req, "sha256", pattern=SHA256_RE)
        mode = req_int(req, "mode", 0o644, lo=0, hi=0o777)
        root = self.need_release()

        def check(got_size, got_sha):
            if got_size != size or got_sha != want:
                raise AgentFailure("checksum", "%s: got %d bytes with sha256 %s, expected %d with sha256 %s"
                                   % (rel, got_size, got_sha, size, want))

        try:
            write_atomic(prepare_target(root, rel), payload.chunks(), mode, check, phase="rename")
        except OSError as exc:
            raise io_failure(exc, rel) from exc
        self.files[rel] = {"size": size, "sha256": want, "mode": mode}
        return {"path": rel, "size": size}, b""

    def read_root(self):
        """Where read-only ops look: the begun release, else `current` (a no-op push pulls and smokes
        what is already deployed)."""
        if self.release_id is not None:
            return self.release_dir()
        current = self.current_dir()
        if current is None:
            raise AgentFailure("no_release", "nothing is deployed here and no release is begun")
        return os.path.realpath(current)

    def op_get(self, req, payload):
        rel = req_str(req, "path")
        path = resolve_inside(self.read_root(), rel)
        try:
            if not os.path.isfile(path):
                raise AgentFailure("io", "%s: no such file in the release" % rel)
            data = read_file_limited(path, MAX_GET, rel)
        except OSError as exc:
            raise io_failure(exc, rel) from exc
        return {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "payload_size": len(data)}, data

    def op_opencl(self, req, payload):
        """fingerprint, build, smoke, startup: checked here, run in a child process (startup's with the
        drivers' kernel caches off)."""
        op = req["op"]
        timeout = req_timeout(req)
        parse_selection(req.get("opencl"))
        if op == "fingerprint":
            return self.fingerprint(req, timeout)
        if op == "build":
            return self.build(req, self.need_release(), timeout)
        root = self.read_root()
        data = b""
        if op in ("smoke", "startup"):
            data = blob_payload(self.rd, req, payload, store=not self.readonly)
            req, data = split_blob_fields(req, data)
            expected = parse_expected(req)
            if op == "smoke":
                parse_cases(req, len(data), expected)
            else:
                parse_program_specs(req, root)
                parse_models(req, len(data), expected)
            load_checked_programs(root, req_str(req, "cache_file"), expected)  # before any driver runs
        env = dict(os.environ, **NO_DRIVER_CACHE_ENV) if op == "startup" else None
        return run_child(req, data, root, timeout, env)

    def fingerprint(self, req, timeout):
        """Fingerprint in a child; remember it with the driver stamp so the next `state` can skip this."""
        stamp = driver_stamp(req.get("opencl"))  # before the child: a driver changing meanwhile re-stamps
        root = self.release_dir() if self.release_id else self.rd
        if not os.path.isdir(root):  # a --check session on a device never pushed: RD is not created
            root = os.path.dirname(os.path.abspath(__file__))
        reply, data = run_child(req, b"", root, timeout)
        if not self.readonly and req.get("remember", True):
            try:
                write_atomic(os.path.join(self.rd, FINGERPRINT_CACHE),
                             [json.dumps({"stamp": stamp, "fingerprint": reply.get("fingerprint")}).encode()])
            except OSError:
                pass  # only a cache: the next push fingerprints again
        return reply, data

    def build(self, req, root, timeout):
        """Build `programs` in a child and take the `keep` programs' binaries from the base release (the
        controller matched their build keys); when nothing is built and the set and settings are the
        base's, the base's build folder is linked as it is and no driver runs."""
        keep = req_str_list(req, "keep", [])
        if not keep:
            return run_child(req, b"", root, timeout)
        base = self.base_dir(req)
        if base is None:
            raise bad_request("'keep' needs the 'base' release the binaries come from")
        old = read_json_file(os.path.join(base, MANIFEST_FILE)) or {}
        reuse = reusable_programs(base, old, keep)
        missing = sorted(set(keep) - set(reuse))
        if missing:
            raise AgentFailure("reuse_missing", "the base release lacks (or holds damaged) binaries of %s"
                               % ", ".join(repr(k) for k in missing))
        if (not req.get("programs") and set(keep) == {p.get("key") for p in old.get("programs", [])}
                and old.get("mace_version") == req.get("mace_version")
                and old.get("mace_format", "pb") == req_str(req, "mace_format", "pb")):
            return link_build(base, root, old, reuse)
        offsets, at = [], 0
        for _key, (entry, binary, log) in sorted(reuse.items()):
            offsets.append({"offset": at, "size": len(binary), "log": log, "entry": entry})
            at += len(binary)
        payload = b"".join(binary for _, (_, binary, _) in sorted(reuse.items()))
        return run_child(dict(req, reuse=offsets), payload, root, timeout)

    def op_commit(self, req, payload):
        """The commit rule (docs/design.md, section 12): once the agent has read `commit`, the switch
        happens even if the controller is gone meanwhile; SIGTERM/SIGHUP wait until it is done. Only an
        error (disk, checksum) before the rename leaves `current` as it was."""
        with signals_deferred():
            phase_hook("commit", 0)
            keep = req_int(req, "keep", 3, lo=0)
            release = self.need_release()
            release_id = self.release_id
            index = {"release": release_id, "files": self.files}
            write_atomic(os.path.join(release, RELEASE_INDEX), [json.dumps(index, sort_keys=True).encode()])
            for dirpath, _, _ in os.walk(release):
                fsync_dir(dirpath)
            fsync_dir(os.path.dirname(release))
            phase_hook("fsync", 0)
            self.switch_current(release_id)
            self.release_id = None  # committed: no longer ours to delete
            pruned = self.prune(keep, release_id)
            prune_blobs(self.rd)
            self.unlock()
        return {"current": release_id, "pruned": pruned}, b""

    def op_rollback(self, req, payload):
        """Switch `current` back to the newest release older than it; reply with that release's cache file
        (payload) and manifest, so the controller's cache follows `current`."""
        if self.release_id is not None:
            raise bad_request("cannot roll back while release %r is begun" % self.release_id)
        self.take_lock()
        try:
            current = self.previous()
            base = os.path.join(self.rd, "releases")
            names = sorted(n for n in (os.listdir(base) if os.path.isdir(base) else [])
                           if RELEASE_ID_RE.fullmatch(n) and os.path.isdir(os.path.join(base, n)))
            if current is None:
                raise AgentFailure("no_release", "nothing is deployed here: %s/current does not exist" % self.rd)
            older = [n for n in names if n < current]
            if not older:
                raise AgentFailure("no_previous", "no release older than %s to roll back to (releases kept: %s)"
                                   % (current, ", ".join(names) or "none"))
            target = older[-1]
            with signals_deferred():
                self.switch_current(target)
        finally:
            self.unlock()
        release = os.path.join(base, target)
        try:
            data = read_file_limited(os.path.join(release, CACHE_FILE), MAX_GET, CACHE_FILE)
            manifest = json.loads(read_file_limited(os.path.join(release, MANIFEST_FILE), MAX_GET,
                                                    MANIFEST_FILE).decode("utf-8"))
        except (OSError, ValueError):
            data, manifest = b"", None  # switched all the same; the controller says the cache is absent
        return {"current": target, "previous": current, "manifest": manifest,
                "cache_sha256": hashlib.sha256(data).hexdigest(), "payload_size": len(data)}, data

    def prune(self, keep, current):
        """Delete releases beyond the newest `keep` (ids sort by time); never the current one."""
        base = os.path.join(self.rd, "releases")
        names = sorted((n for n in os.listdir(base)
                        if RELEASE_ID_RE.fullmatch(n) and os.path.isdir(os.path.join(base, n))), reverse=True)
        pruned = [n for n in names[keep:] if n != current]
        phase_hook("prune", 0)
        for name in pruned:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        return pruned

    def op_bye(self, req, payload):
        # Clean up before answering: once the controller hears "ok", nothing uncommitted is left.
        dropped = self.release_id
        self.abandon()  # an orderly end without commit also leaves `current` as it was
        return {"dropped": dropped}, b""

    # ----- the loop -----

    def dispatch(self, req, payload):
        """Answer one request: (reply object, payload); never raises for a bad request or a failed op."""
        op = req.get("op")
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return bad_request("unknown op %r (known: %s)" % (op, ", ".join(sorted(self.ops)))).reply(), b""
        if self.readonly and op in WRITING_OPS:
            return AgentFailure("read_only", "this session only checks (deploy push --check): %s would write"
                                % op).reply(), b""
        try:
            reply, out = handler(req, payload)
            return dict(reply, ok=True), out
        except AgentFailure as exc:
            return exc.reply(), b""
        except OSError as exc:
            return io_failure(exc, exc.filename or op).reply(), b""
        except (EOFError, SessionEnd):
            raise
        except Exception as exc:  # an agent bug becomes a reply; the session goes on
            return AgentFailure("internal", "%s in %s: %s" % (type(exc).__name__, op, exc)).reply(), b""

    def serve(self, inp, out):
        """Answer requests until bye (exit 0) or end of input (exit 1 if a begun release was dropped)."""
        try:
            write_message(out, {"op": "hello", "agent_version": AGENT_VERSION,
                                "python": "%d.%d.%d" % tuple(sys.version_info[:3]), "pid": os.getpid()})
            while True:
                try:
                    req, size = read_header(inp)
                except FramingError as exc:
                    write_message(out, bad_request(str(exc)).reply())
                    continue
                payload = Payload(inp, size)
                reply, data = self.dispatch(req, payload)
                payload.drain()  # keep the stream in step even when an op ignored its payload
                try:
                    write_message(out, reply, data)
                except ValueError as exc:  # reply line too long: report it rather than die
                    write_message(out, AgentFailure("internal", str(exc)).reply())
                if req.get("op") == "bye":
                    return 0
        except (EOFError, SessionEnd, BrokenPipeError, KeyboardInterrupt):
            dropped = self.release_id is not None
            self.abandon()
            return 1 if dropped else 0


def serve_main(rd):
    out = sys.stdout.buffer
    if os.environ.get(READONLY_ENV):
        _remove_ephemeral_agent()
    try:
        if not os.environ.get(READONLY_ENV):
            os.makedirs(os.path.expanduser(rd), 0o755, exist_ok=True)
    except OSError as exc:
        write_message(out, AgentFailure("io", "cannot create remote dir %s: %s" % (rd, exc.strerror)).reply())
        return 1
    rd = os.path.realpath(os.path.expanduser(rd))  # every containment check compares realpaths
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    return Session(rd).serve(sys.stdin.buffer, out)


def _remove_ephemeral_agent():
    """A --check session runs from a temp copy the bootstrap made: remove it (children are started by
    path, so only when it is not the stored agent, and after a copy is kept open for them)."""
    here = os.path.abspath(__file__)
    if os.path.basename(os.path.dirname(here)).startswith("deployer-check-"):
        import atexit
        atexit.register(shutil.rmtree, os.path.dirname(here), True)


def main(argv):
    if len(argv) == 3 and argv[1] == "serve":
        return serve_main(argv[2])
    if len(argv) == 2 and argv[1] == "child":
        child_main()
        return 0
    sys.stderr.write("usage: %s serve REMOTE_DIR | child\n" % os.path.basename(argv[0]))
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
