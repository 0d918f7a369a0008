"""Writing a set of report files into a folder so that each appears whole or not at all.

Every file is first written under a temporary name in the folder itself (`.NAME.PID.tmp`) and fsynced; only
when all of them are written is each renamed to its name, then the folder fsynced. A failure before the
renames (a folder that cannot be created or written, a full disk, a writer's own error) removes the
temporary files: no file of the set appears, and an earlier set of the same names is left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from deployer.errors import LocalStateError

Writer = Callable[[Path], None]  # writes one file, whole, at the path it is given


def write_files(folder: Path, writers: Mapping[str, Writer]) -> list[Path]:
    """Create `folder` if needed and write `folder/NAME` with each writer; the paths written, in order."""
    temps: dict[str, Path] = {}
    done: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, write in writers.items():
            temp = temps[name] = folder / f".{name}.{os.getpid()}.tmp"
            write(temp)
            _fsync_file(temp)
        for name, temp in temps.items():
            os.replace(temp, folder / name)
            done.append(folder / name)
        _fsync_folder(folder)
    except OSError as exc:
        raise LocalStateError(f"cannot write the reports in {folder}: {exc.strerror or exc}"
                              f"{_outcome(done, len(writers))}") from exc
    finally:
        for temp in temps.values():
            _discard(temp)
    return done


def _outcome(done: list[Path], wanted: int) -> str:
    if not done:
        return "; nothing was written"
    if len(done) < wanted:  # a rename failed: only the folder's own failure can do that
        return f" ({', '.join(p.name for p in done)} written, the rest not)"
    return " (every file is written; the folder could not be synced)"


def write_bytes(data: bytes) -> Writer:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the folder is no longer writable: the error being raised already says what is wrong
