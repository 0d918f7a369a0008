"""What an incremental push changes on one device, decided from one `state` round trip.

The local side: every file that would travel, hashed once per change (a hash index in the local cache
keyed by path, size, mtime, ctime and inode, as git's index does) and read only when some device needs its
bytes. The device side: the current release's file index and build manifest (`state` op, design.md
section 11). Each program's build key covers everything its binary depends on (source and header
hashes, options, MACE version and format, the device's fingerprint and the agent), so an unchanged key
means an unchanged binary and the device reuses it instead of compiling.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployer.cache.store import read_json, write_json
from deployer.errors import AgentError, DeviceError, InputError, LocalStateError, Where
from deployer.protocol.bundle import agent_bundle
from deployer.protocol.reply import Reply
from deployer.text import one_line

if TYPE_CHECKING:
    from deployer.config.kernels import Library

HASH_INDEX = ".hash-index.json"
RACY_S = 2.0  # a file modified this recently may change again within its mtime tick: never trust it
MAX_STATE_FILES = 100_000


@dataclass(frozen=True, slots=True)
class LocalFile:
    """One file of the release: where it lands (relative to the release), where it is, what it holds."""

    remote: str
    path: Path
    size: int
    sha256: str
    mode: int = 0o644

    def to_request(self) -> dict[str, Any]:
        return {"path": self.remote, "size": self.size, "sha256": self.sha256, "mode": self.mode}


class HashIndex:
    """sha256 of local files, remembered by (size, mtime_ns, ctime_ns, inode) in `<cache>/.hash-index.json`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if path is not None:
            loaded = read_json(path)
            if isinstance(loaded, dict):
                self.entries = {k: v for k, v in loaded.items() if isinstance(v, dict)}

    @staticmethod
    def _stamp(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def sha256(self, path: Path) -> tuple[int, str]:
        """(size, sha256) of a regular file; hashed only when its stamp changed since the last run."""
        key = str(path.resolve())
        try:
            st = path.stat()
            known = self.entries.get(key)
            if known and known.get("stamp") == self._stamp(st) and isinstance(known.get("sha256"), str):
                return st.st_size, known["sha256"]
            digest = _hash_file(path)
            after = path.stat()
        except OSError as exc:
            raise InputError(Where(str(path)), None, f"cannot read: {exc.strerror or exc}") from exc
        if self._stamp(after) == self._stamp(st) and time.time() - after.st_mtime > RACY_S:
            self.entries[key] = {"stamp": self._stamp(after), "sha256": digest}
            self.dirty = True
        return after.st_size, digest

    def save(self) -> None:
        if self.path is not None and self.dirty:
            try:
                write_json(self.path, self.entries)
            except LocalStateError:
                pass  # only a cache: the next run hashes again
            self.dirty = False


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(paths: Sequence[tuple[str, Path]], index: HashIndex,
                hashed: Mapping[Path, tuple[int, str]] | None = None) -> tuple[LocalFile, ...]:
    """Every file that travels, hashed (or looked up) once before any device is touched; `hashed`: the
    (size, sha256) of files this run hashed already (the smoke references' check hashes the library's)."""
    names = [remote for remote, _ in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(None, "model", f"two files would land at the same place: {', '.join(duplicates)}")
    files = []
    for remote, path in paths:
        size, sha = hashed[path] if hashed and path in hashed else index.sha256(path)
        files.append(LocalFile(remote, path, size, sha))
    index.save()
    return tuple(files)


class FileContents:
    """The bytes of the release's files, read at most once per push (by whichever device needs them
    first) and checked against the hash the plan was made with: a file edited during the push fails the
    devices that still need it, and never lands on a device as a mix of old and new."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, bytes] = {}

    def read(self, file: LocalFile) -> bytes:
        with self._lock:
            if file.remote not in self._data:
                try:
                    data = file.path.read_bytes()
                except OSError as exc:
                    raise DeviceError(f"cannot read {file.path}: {exc.strerror or exc}") from exc
                if hashlib.sha256(data).hexdigest() != file.sha256:
                    raise DeviceError(f"{file.path} changed during the push (its sha256 no longer matches the "
                                      f"plan); nothing of it was sent: run the push again")
                self._data[file.remote] = data
            return self._data[file.remote]


def build_key(spec: Mapping[str, Any], shas: Mapping[str, str], *, mace_version: str, mace_format: str,
              fingerprint_id: str) -> str:
    """What a program's binary depends on, hashed: equal keys, equal binary (so it is reused)."""
    parts = {
        "build_modules": agent_bundle().build_id, "key": spec["key"], "name": spec["name"], "source": spec["source"],
        "files": [[p, shas.get(p)] for p in [spec["source"], *spec["headers"]]],
        "options": spec["options"], "compile_options": spec["compile_options"],
        "mace_version": mace_version, "mace_format": mace_format, "fingerprint": fingerprint_id,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class RemoteProgram:
    build_key: str | None
    sha256: str


@dataclass(frozen=True, slots=True)
class RemoteState:
    """What the device's `state` op said, validated (a device's reply is never trusted)."""

    current: str | None
    files: Mapping[str, tuple[int, str]]
    programs: Mapping[str, RemoteProgram]
    cache_sha256: str | None
    mace_version: str | None
    mace_format: str | None
    fingerprint: dict[str, Any] | None
    blobs: frozenset[str]


def _plain_path(path: str) -> bool:
    """A release file's name as this controller writes them: relative, normalised, printable, bounded."""
    return (0 < len(path) <= 1024 and path.isprintable() and not path.startswith("/")
            and os.path.normpath(path) == path and ".." not in path.split("/"))


def _sha(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value) \
        else None


def read_current(value: Any) -> str | None:
    """A board's word for its current release, as `state` (or the shell's no-op) gives it: shown on one line."""
    return one_line(value, 80) if isinstance(value, str) else None


def parse_state(reply: Reply) -> RemoteState:
    try:
        state = json.loads(reply.payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AgentError(f"the device's state is not JSON: {exc}", kind="bad_reply") from exc
    if not isinstance(state, dict):
        raise AgentError("the device's state is not a JSON object", kind="bad_reply")
    current = state.get("current")
    files: dict[str, tuple[int, str]] = {}
    raw_files = state.get("files")
    if isinstance(raw_files, dict):
        for path, rec in list(raw_files.items())[:MAX_STATE_FILES]:
            if not _plain_path(path):  # shown by --check and sent back in `drop`: never a raw device string
                raise AgentError(f"the device's release index names a file that is not a plain relative path: "
                                 f"{one_line(str(path), 120)}", kind="bad_reply")
            if isinstance(rec, dict) and isinstance(rec.get("size"), int) and _sha(rec.get("sha256")):
                files[path] = (rec["size"], rec["sha256"])
    manifest: dict[str, Any] = state["manifest"] if isinstance(state.get("manifest"), dict) else {}
    programs: dict[str, RemoteProgram] = {}
    for rec in manifest.get("programs") or []:
        if isinstance(rec, dict) and isinstance(rec.get("key"), str) and _sha(rec.get("sha256")):
            key = rec.get("build_key")
            programs[rec["key"]] = RemoteProgram(key if isinstance(key, str) else None, rec["sha256"])
    fingerprint = state.get("fingerprint")
    blobs: list[Any] = state["blobs"] if isinstance(state.get("blobs"), list) else []
    return RemoteState(
        current=read_current(current),
        files=files, programs=programs, cache_sha256=_sha(manifest.get("cache_sha256")),
        mace_version=manifest.get("mace_version") if isinstance(manifest.get("mace_version"), str) else None,
        mace_format=str(manifest.get("mace_format", "pb")) if manifest else None,
        fingerprint=fingerprint if isinstance(fingerprint, dict) else None,
        blobs=frozenset(b for b in blobs if _sha(b)),
    )


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """What this push does on one device; `new_release` is False for a no-op."""

    current: str | None
    upload: tuple[str, ...]  # files that travel
    unchanged: tuple[str, ...]  # files hard-linked from the current release
    removed: tuple[str, ...]  # files of the current release the new one no longer has
    rebuild: tuple[str, ...]  # program keys compiled on the device
    reuse: tuple[str, ...]  # program keys whose binary is taken from the current release
    dropped: tuple[str, ...]  # programs of the current release the new one no longer has
    settings_changed: bool  # MACE version or format differ from the current release's

    @property
    def new_release(self) -> bool:
        return bool(self.current is None or self.upload or self.removed or self.rebuild or self.dropped
                    or self.settings_changed)

    def to_json(self) -> dict[str, Any]:
        return {"current": self.current, "new_release": self.new_release, "upload": list(self.upload),
                "unchanged": len(self.unchanged), "removed": list(self.removed), "rebuild": list(self.rebuild),
                "reuse": len(self.reuse), "dropped": list(self.dropped)}


def plan_device(files: Iterable[LocalFile], build_keys: Mapping[str, str], state: RemoteState, *,
                mace_version: str, mace_format: str) -> DevicePlan:
    """Compare what would be deployed with what the device's current release holds."""
    files = list(files)
    upload = tuple(f.remote for f in files if state.files.get(f.remote) != (f.size, f.sha256))
    unchanged = tuple(f.remote for f in files if f.remote not in upload)
    wanted = {f.remote for f in files}
    rebuild = tuple(k for k, bk in build_keys.items()
                    if k not in state.programs or state.programs[k].build_key != bk)
    return DevicePlan(
        current=state.current, upload=upload, unchanged=unchanged,
        removed=tuple(sorted(p for p in state.files if p not in wanted)),
        rebuild=rebuild, reuse=tuple(k for k in build_keys if k not in rebuild),
        dropped=tuple(sorted(k for k in state.programs if k not in build_keys)),
        # a current release whose manifest is unreadable (or names no cache file) is rebuilt, never trusted
        settings_changed=state.current is not None and (
            (state.mace_version, state.mace_format) != (mace_version, mace_format) or state.cache_sha256 is None),
    )


def program_specs(library: Library, skipped: Mapping[str, str],
                  build_keys: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every program variant a device builds (those whose `requires` it meets), with their build keys."""
    specs: list[dict[str, Any]] = [
        {"key": program.key(variant), "name": program.name, "source": f"kernels/{program.source}",
         "headers": [f"kernels/{h}" for h in program.headers], "options": list(variant.options),
         "compile_options": list(library.compile_options)}
        for program in library.programs for variant in program.variants
        if program.key(variant) not in skipped
    ]
    if build_keys is not None:
        for spec in specs:
            spec["build_key"] = build_keys[spec["key"]]
    return specs
