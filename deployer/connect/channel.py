"""What every transport provides: a `Transport` opens exec `Channel`s; a buffered line/exact reader they share."""

from __future__ import annotations

from typing import Protocol

from deployer.errors import TransportError

READ_CHUNK = 1 << 16


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


class BufferedReader:
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
