"""The wire, both directions (docs/design.md, section 1): one JSON line, then `payload_size` raw bytes.

Also the error reply every op can give (`AgentFailure`). The controller imports the reader and writer
from here, so both sides share one implementation.
"""

import json

from .layout import MAX_MEMORY_PAYLOAD

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import IO, Any  # noqa: F401


MAX_LINE = 1 << 20  # a JSON line, both directions (design.md section 1)

MAX_PAYLOAD = 1 << 30  # what read_message accepts by default

CHUNK = 1 << 20

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
        raise FramingError("payload_size must be an integer >= 0 (got %s)" % show(size))
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


def show(value):
    """A request value quoted in an error message, cut short: the reply line has a size limit."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
