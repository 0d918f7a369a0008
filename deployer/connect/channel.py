"""What every transport provides: a `Transport` opens exec `Channel`s; a buffered line/exact reader they share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from deployer.errors import CommandTimeout, TransportError

READ_CHUNK = 1 << 16
STDERR_TAIL = 1 << 16  # bytes of a command's stderr kept for error messages (the rest is drained)


class Channel(Protocol):
    """A running remote command: its stdin, stdout, exit status and stderr."""

    bytes_sent: int
    bytes_received: int

    def write(self, data: bytes) -> None: ...
    def read_line(self, limit: int) -> bytes: ...
    def read_exact(self, size: int) -> bytes: ...
    def read_into(self, size: int, sink: Callable[[bytes], object]) -> None: ...
    def close_input(self) -> None: ...
    def finish(self, timeout: float) -> tuple[int | None, str]: ...
    def close(self) -> None: ...


class Transport(Protocol):
    def exec(self, command: str) -> Channel: ...
    def close(self) -> None: ...


class BufferedReader:
    """Line and exact-size reads over a `recv(n, wait) -> bytes` function that returns b"" at EOF.

    `timeout` bounds one reply twice: no byte for that long (silence), and the whole reply, from the start
    of its line to the end of its payload (a board trickling a byte at a time)."""

    def __init__(self, what: str, timeout: float) -> None:
        self._buffer = bytearray()
        self._what, self._timeout = what, timeout
        self._ends: float | None = None  # when the reply being read must be complete
        self._reply_bytes = 0
        self.bytes_received = 0

    def _recv(self, size: int, wait: float) -> bytes:  # overridden; raises CommandTimeout after `wait` s
        raise NotImplementedError

    def _fill(self) -> bool:
        wait = self._timeout
        if self._ends is not None:
            wait = self._ends - time.monotonic()
            if wait <= 0:
                raise self._incomplete()
        try:
            chunk = self._recv(READ_CHUNK, min(wait, self._timeout))
        except CommandTimeout as exc:
            if self._reply_bytes and wait < self._timeout:  # the whole reply's limit, not silence
                raise self._incomplete() from exc
            raise
        self.bytes_received += len(chunk)
        self._reply_bytes += len(chunk)
        self._buffer += chunk
        return bool(chunk)

    def _incomplete(self) -> CommandTimeout:
        return CommandTimeout(f"{self._what}: no complete answer within {self._timeout:g} s "
                              f"({self._reply_bytes} bytes of it came: a trickle)")

    def read_line(self, limit: int) -> bytes:
        """The next line (a reply's header: its time limit starts here)."""
        self._ends = time.monotonic() + self._timeout
        self._reply_bytes = len(self._buffer)
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
        """`size` bytes (a reply's payload, within the time limit its line started)."""
        while len(self._buffer) < size:
            if not self._fill():
                raise TransportError(
                    f"{self._what}: stream ended after {len(self._buffer)} of {size} bytes"
                )
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_into(self, size: int, sink: Callable[[bytes], object]) -> None:
        """`size` bytes handed to `sink` as they arrive (a large payload: memory stays one read's worth)."""
        left = size
        while left:
            if not self._buffer and not self._fill():
                raise TransportError(f"{self._what}: stream ended after {size - left} of {size} bytes")
            take = min(left, len(self._buffer))
            sink(bytes(self._buffer[:take]))
            del self._buffer[:take]
            left -= take
