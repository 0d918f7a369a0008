"""The local binary store: program binaries by build key, for devices that share builds (docs/design.md
section 11, docs/inventory.md "Sharing builds").

`<cache>/.binaries/<build key>.bin` holds the binary and `<build key>.json` its record (sha256, size, the
program key, the device that built it, when). A build key hashes everything a binary depends on, the
fingerprint id included, so an entry serves any device whose key is the same. An entry is trusted only
when its record and its bytes agree (size and sha256) and the record names the key it is filed under;
anything else is damaged: it is deleted and reported, and the program is built again. Written under the
cache lock, each file by temp + fsync + rename (the record last: an entry without one is not there).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from deployer.cache.store import read_json, write_atomic
from deployer.errors import LocalStateError

STORE = ".binaries"
BUILD_KEY = re.compile(r"[0-9a-f]{32}")  # plan.build_key: 32 hex digits (remote/layout.py BUILD_KEY_RE)
MAX_BINARY = 256 << 20
MAX_ENTRIES = 4096  # past it, the oldest records go at the next write


@dataclass(frozen=True, slots=True)
class StoredBinary:
    build_key: str
    key: str  # the program's MACE key
    binary: bytes
    sha256: str
    built_by: str  # the device that compiled it


class BinaryStore:
    """One cache's store. `damaged` lists what reads found wrong (and deleted), for the push to report. The
    workers of one push share it: one lock keeps two of them from writing one entry through one temp name
    (two boards whose builder failed may both compile the same key)."""

    def __init__(self, cache: Path) -> None:
        self.folder = cache / STORE
        self.damaged: list[str] = []
        self._lock = threading.Lock()

    def _paths(self, build_key: str) -> tuple[Path, Path]:
        if not BUILD_KEY.fullmatch(build_key):
            raise LocalStateError(f"binary store: {build_key!r} is not a build key")
        return self.folder / f"{build_key}.bin", self.folder / f"{build_key}.json"

    def get(self, build_key: str) -> StoredBinary | None:
        """The entry filed under `build_key` if it is whole; a damaged one is deleted (never trusted)."""
        with self._lock:
            return self._get(build_key)

    def _get(self, build_key: str) -> StoredBinary | None:
        data, meta = self._paths(build_key)
        if not meta.exists():
            return None
        record = read_json(meta)
        try:
            binary = data.read_bytes() if data.stat().st_size <= MAX_BINARY else b""
        except OSError:
            binary = b""
        ok = (isinstance(record, dict) and record.get("build_key") == build_key and isinstance(record.get("key"), str)
              and record.get("size") == len(binary) and record.get("sha256") == hashlib.sha256(binary).hexdigest()
              and len(binary) > 0)
        if not ok:
            self.damaged.append(build_key)
            for path in (meta, data):
                path.unlink(missing_ok=True)
            return None
        assert isinstance(record, dict)
        return StoredBinary(build_key, record["key"], binary, record["sha256"], str(record.get("built_by", "")))

    def put(self, build_key: str, key: str, binary: bytes, built_by: str) -> None:
        with self._lock:
            self._put(build_key, key, binary, built_by)

    def _put(self, build_key: str, key: str, binary: bytes, built_by: str) -> None:
        data, meta = self._paths(build_key)
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise LocalStateError(f"binary store: cannot create {self.folder}: {exc.strerror or exc}") from exc
        write_atomic(data, binary)
        record = {"build_key": build_key, "key": key, "size": len(binary),
                  "sha256": hashlib.sha256(binary).hexdigest(), "built_by": built_by, "at": round(time.time(), 3)}
        write_atomic(meta, json.dumps(record, sort_keys=True).encode())
        self._prune()

    def _prune(self) -> None:
        records = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for meta in records[:max(0, len(records) - MAX_ENTRIES)]:
            meta.unlink(missing_ok=True)
            meta.with_suffix(".bin").unlink(missing_ok=True)
