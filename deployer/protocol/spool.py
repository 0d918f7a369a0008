"""A reply's payload streamed into a file as it arrives, hashed on the way (docs/design.md, section 2).

A board is untrusted: a payload it sends is written to disk chunk by chunk, so one device costs the
controller a chunk of memory whatever it sends, and its size and sha256 are known before anything reads it.
"""

from __future__ import annotations

import hashlib
from typing import Protocol


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class Spool:
    """Counts and hashes what passes into `out` (a temp file, or a cache file before its commit)."""

    def __init__(self, out: Writable) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def matches(self, size: int, sha256: str) -> bool:
        return self.size == size and self.sha256 == sha256
