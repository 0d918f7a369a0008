"""The local per-device cache (docs/design.md, section 6): layout, atomic writes, a lock, path safety.

Every file is written to a temp name in its own folder, fsynced, then renamed, so a killed run never
leaves a half file. Every path is resolved and checked to lie inside `<cache>/<device>/` before writing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from deployer import phases
from deployer.errors import LocalStateError

CACHE_FILE = "mace_cl_compiled_program.bin"
MANIFEST_FILE = "manifest.json"
FINGERPRINT_FILE = "fingerprint.json"
LOGS = "logs"
LAST_FAILURE = "last-failure"
COLLECTED = "collected"
RECORD_FILE = "record.json"
CONTENT_FILE = "content.bin"
HISTORY_FILE = "fingerprints.jsonl"
LAST_RUN_FILE = "last-run.json"
TEMP_MARK = ".tmp-"  # .<name>.tmp-<pid>: a file being written; stale once its run has ended
FINGERPRINT_ID = re.compile(r"[0-9a-f]{16}")  # docs/design.md, section 4
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]")


def slug(text: str, limit: int = 200) -> str:
    """A file name for a program key or remote path: unsafe characters become '_'."""
    cleaned = SLUG_UNSAFE.sub("_", text)[:limit].lstrip(".")
    return cleaned or "_"


def device_dir(cache: Path, device: str) -> Path:
    if not SAFE_NAME.match(device) or device in (".", ".."):
        raise LocalStateError(f"device name {device!r} cannot be a cache folder name")
    return cache / device


def inside(root: Path, relative: str) -> Path:
    """`root/relative`, refused if it would land outside `root` (.., absolute, symlinks)."""
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise LocalStateError(f"refusing to write {relative!r}: outside {root}")
    return target


def write_atomic(path: Path, data: bytes, *, phase: str | None = None) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder. `phase`: the test hook's name for
    the moment before the rename (docs/design.md, section 12)."""
    with AtomicFile(path) as out:
        out.write(data)
        out.commit(phase=phase)


class AtomicFile:
    """A file written under a temp name in its own folder and renamed into place by `commit`; left without
    a commit (an error, a refused payload), the temp file is removed and `path` is untouched."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temp = path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}"
        self._file: BinaryIO | None = None
        self._made: list[Path] = []  # folders this file's writing created, deepest first

    def __enter__(self) -> AtomicFile:
        try:
            self._made = [f for f in (self.path.parent, *self.path.parent.parents) if not f.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.temp, "w+b")
        except OSError as exc:
            raise self._error(exc) from exc
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            _discard(self.temp)
            for folder in self._made:  # a refused file leaves no empty folders behind
                try:
                    folder.rmdir()
                except OSError:
                    break

    def write(self, data: bytes) -> None:
        assert self._file is not None, "write outside the with block"
        try:
            self._file.write(data)
        except OSError as exc:
            raise self._error(exc) from exc

    def read_back(self) -> bytes:
        """What was written so far (to check it before it is committed)."""
        assert self._file is not None, "read_back outside the with block"
        self._file.flush()
        self._file.seek(0)
        data = self._file.read()
        self._file.seek(0, os.SEEK_END)
        return data

    def commit(self, *, phase: str | None = None) -> None:
        assert self._file is not None, "commit outside the with block"
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            if phase is not None:
                phases.reached(phase)
            os.rename(self.temp, self.path)
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError as exc:
            _discard(self.temp)
            raise self._error(exc) from exc

    def _error(self, exc: OSError) -> LocalStateError:
        return LocalStateError(f"cannot write {self.path}: {exc.strerror or exc}")


def _discard(path: Path) -> None:
    """Remove a temp file if it can be: on a read-only file system even a missing one raises EROFS."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


LOCK_POLL_S = 0.1  # how often `--wait` tries the lock again


def cache_lock(cache: Path, *, wait: float = 0.0) -> AbstractContextManager[None]:
    """Hold `<cache>/.lock` for a run; a second run on the same cache is refused, never interleaved.

    With `wait` > 0 a held lock is tried again every LOCK_POLL_S for up to `wait` seconds (`--wait`)."""
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new cache is its owner's only (binaries, logs)
    except OSError as exc:
        raise LocalStateError(f"cannot use cache folder {cache}: {exc.strerror or exc}") from exc
    return hold_lock(cache / ".lock", f"cache {cache}", wait=wait)


@contextmanager
def hold_lock(path: Path, what: str, *, wait: float = 0.0) -> Iterator[None]:
    """An exclusive flock on `path` (created; it says the holder's pid) for the block: refused at once
    when held, or after `wait` seconds of trying. The kernel drops it when the holder dies, so a killed
    run never leaves a stale lock behind."""
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise LocalStateError(f"cannot open lock file {path}: {exc.strerror or exc}") from exc
    with handle:
        give_up = time.monotonic() + max(0.0, wait)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise LocalStateError(f"cannot lock {path}: {exc.strerror}") from exc
                left = give_up - time.monotonic()
                if left <= 0:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    then = f"still held after waiting {wait:g} s" if wait > 0 else "or queue with --wait SECONDS"
                    raise LocalStateError(
                        f"{what} is in use by another deploy run ({holder}); wait for it to finish ({then})"
                    ) from exc
                time.sleep(min(LOCK_POLL_S, left))
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_json(path: Path) -> Any:
    """A JSON file of the cache, or None if it is missing or unreadable (reported by `cache verify`)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collected_entries(root: Path) -> list[dict[str, Any]]:
    """The records of every file collected from one device."""
    folder = root / COLLECTED
    records = [read_json(p / RECORD_FILE) for p in sorted(folder.iterdir())] if folder.is_dir() else []
    return [r for r in records if isinstance(r, dict)]


def fingerprint_history(root: Path) -> list[dict[str, Any]]:
    """Every fingerprint the device has shown, oldest first: {"seen_at", "id", "fingerprint"}."""
    try:
        lines = (root / HISTORY_FILE).read_text().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        # an id is a folder and tarball name: a malformed one (written before ids were checked, or by hand)
        # is skipped, never used as a path or allowed to block the other devices' export
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and FINGERPRINT_ID.fullmatch(entry["id"]):
            entries.append(entry)
    return entries


def record_fingerprint(root: Path, fingerprint: Mapping[str, Any] | None) -> None:
    """Append the fingerprint to the device's history when it differs from the last one seen."""
    if not fingerprint or not fingerprint.get("id"):
        return
    history = fingerprint_history(root)
    if history and history[-1].get("id") == fingerprint["id"]:
        return
    history.append({"seen_at": time.time(), "id": fingerprint["id"], "fingerprint": dict(fingerprint)})
    text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in history)
    write_atomic(inside(root, HISTORY_FILE), text.encode())


def record_run(cache: Path, command: str, fleet: str, outcomes: Mapping[str, str | None]) -> None:
    """`<cache>/last-run.json`: each device of the last run and its error (None: passed), for `@failed`."""
    write_json(cache / LAST_RUN_FILE, {"command": command, "fleet": fleet, "finished_at": time.time(),
                                       "devices": {name: {"ok": error is None, "error": error}
                                                   for name, error in outcomes.items()}})


def last_run_sets(cache: Path) -> dict[str, list[str]]:
    """`--limit` sets from the last run on this cache: `@failed` and `@passed` (empty if none ran)."""
    record = read_json(cache / LAST_RUN_FILE)
    devices = record.get("devices") if isinstance(record, dict) else None
    if not isinstance(devices, dict):
        return {}
    entries = [(name, d) for name, d in devices.items() if isinstance(d, dict)]
    return {"failed": [name for name, d in entries if d.get("ok") is False],
            "passed": [name for name, d in entries if d.get("ok") is True]}


def remove_stale_temps(folder: Path) -> None:
    """Delete the `.<name>.tmp-<pid>` files a killed run left in `folder` (they are never read). Called
    under the cache lock, by the one thread writing this device's folder: no temp file there is live."""
    try:
        names = [p for p in folder.iterdir() if p.name.startswith(".") and TEMP_MARK in p.name and p.is_file()]
    except OSError:
        return
    for path in names:
        _discard(path)


def store_device(cache: Path, device: str, cache_bytes: bytes, manifest: Mapping[str, Any],
                 fingerprint: Mapping[str, Any], logs: Mapping[str, str]) -> Path:
    """Store a passed push: logs, fingerprint, the cache file, and the manifest last (it names the others)."""
    root = device_dir(cache, device)
    for folder in (root, root / LOGS):
        remove_stale_temps(folder)
    record_fingerprint(root, fingerprint)
    for key, text in logs.items():
        write_atomic(inside(root, f"{LOGS}/{slug(key)}.log"), text.encode())
    write_json(inside(root, FINGERPRINT_FILE), fingerprint)
    target = inside(root, CACHE_FILE)
    write_atomic(target, cache_bytes, phase="local-cache rename")
    write_json(inside(root, MANIFEST_FILE), manifest)
    return target


def store_failure(cache: Path, device: str, error: Mapping[str, Any], logs: Mapping[str, str]) -> Path:
    """What a failed run leaves to look at, apart from the last good cache (which stays untouched)."""
    root = inside(device_dir(cache, device), LAST_FAILURE)
    for key, text in logs.items():
        write_atomic(inside(root, f"{LOGS}/{slug(key)}.log"), text.encode())
    write_json(inside(root, "error.json"), error)
    return root
