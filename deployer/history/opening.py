"""Opening `history.db` (for `deployer.history.db.History.open`): every check before a board is touched.

`connect` raises `HistoryError` naming the file and the fix for: a missing folder, a file that is not a
SQLite database or is corrupt (`PRAGMA quick_check`), another program's database (`application_id`), a
schema newer than this deployer, a read-only file or folder, another writer holding the file past
`wait_s`. Read-only and locked are found the only sure way: a write of the version the file already has,
inside `BEGIN IMMEDIATE`, rolled back (running as root, `os.access` says yes to everything). A file it
refuses is never written: nothing is "repaired". A new file is created complete, tables and version, in
one transaction; an older one is migrated in one.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from deployer.errors import HistoryError
from deployer.history import schema

SQLITE_MAGIC = b"SQLite format 3\x00"


def connect(path: Path, *, create: bool, wait_s: float, read_only: bool = False) -> sqlite3.Connection:
    """A connection to a checked, up-to-date, writable history (or, `read_only`, a readable one of this
    schema); autocommit (the caller BEGINs), shared between threads (the caller locks), foreign keys on,
    synchronous FULL, rollback journal."""
    exists = _check_file(path, create=create)
    if not exists and not read_only:
        _create_private(path)
    uri = f"{path.absolute().as_uri()}?mode=ro" if read_only else _uri(path, create=not exists)
    try:
        db = sqlite3.connect(uri, uri=True, timeout=wait_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _opening_error(path, exc) from exc
    try:
        if read_only:
            _check_readable(db, path)
            return db
        _prepare(db, path)
    except BaseException:
        db.close()
        if not exists:
            _discard_empty(path)
        raise
    return db


def _create_private(path: Path) -> None:
    """An empty file readable by its owner only, for SQLite to make a database of (it would use 0644, and its
    journal takes the database's mode): the history names boards, drivers and commands."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise HistoryError(f"cannot write {path}: its folder {path.absolute().parent} is not writable "
                           f"({exc.strerror or exc}): make the folder writable or choose another history file"
                           ) from exc


def _check_file(path: Path, *, create: bool) -> bool:
    """Whether the file exists, after the checks that need no SQLite; reads at most 16 bytes."""
    folder = path.absolute().parent
    if not folder.is_dir():
        raise HistoryError(f"cannot open {path}: folder {folder} does not exist: create it or choose another file")
    if path.is_dir():
        raise HistoryError(f"cannot open {path}: it is a folder, not a history file")
    if not path.exists():
        if not create:
            raise HistoryError(f"no history at {path}: the first `deploy run` creates it")
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise HistoryError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head and head != SQLITE_MAGIC:  # an empty file is a new database to SQLite, and to us
        raise HistoryError(f"{path} is not a SQLite database: move it aside or choose another history file")
    return True


def _uri(path: Path, *, create: bool) -> str:
    """mode=rw never creates a file: one that vanished after the checks is an error, not a new history."""
    return f"{path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}"


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Check the file whole, then bring its schema up to date (or prove it writable) in one transaction."""
    try:
        db.execute("PRAGMA foreign_keys = ON")  # per connection, and ignored inside a transaction
        db.execute("PRAGMA synchronous = FULL")
        version = _inspect(db, path)
        if version < schema.VERSION:
            _upgrade(db, version)
        else:
            _probe_write(db, version)
        db.execute("PRAGMA journal_mode = DELETE")  # after the checks: on a WAL file this is a write
    except sqlite3.Error as exc:
        rollback(db)
        raise _opening_error(path, exc) from exc


def _check_readable(db: sqlite3.Connection, path: Path) -> None:
    """A read-only history must be whole and of this schema: it cannot be brought up to date here."""
    try:
        version = _inspect(db, path)
    except sqlite3.Error as exc:
        raise _opening_error(path, exc) from exc
    if version < schema.VERSION:
        raise HistoryError(f"{path} has schema {version}, older than this deployer's {schema.VERSION}, and is "
                           "opened read-only: open it writable once (deploy history list on a copy) to upgrade it")


def _inspect(db: sqlite3.Connection, path: Path) -> int:
    """The schema version of a file that is ours, intact and not newer than this deployer."""
    application = db.execute("PRAGMA application_id").fetchone()[0]
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    empty = application == 0 and version == 0 and tables == 0
    if application != schema.APPLICATION_ID and not empty:
        raise HistoryError(f"{path} is a SQLite database of another program, not a deployer history:"
                           " choose another history file")
    if version > schema.VERSION:
        raise HistoryError(f"{path} has schema {version}; this deployer knows up to {schema.VERSION}:"
                           " upgrade deployer")
    problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        found = " ".join("; ".join(map(str, problems)).split())  # sqlite's report spans lines: one line here
        raise HistoryError(f"{path} is corrupt ({found}): move it aside (a new one"
                           " is created) or restore a backup")
    return version


def _upgrade(db: sqlite3.Connection, version: int) -> None:
    """Every missing migration and the new version, in one transaction. executescript would commit an open
    transaction first, so BEGIN is part of the script; a failure leaves it open for the caller's rollback."""
    db.executescript(f"BEGIN IMMEDIATE;\n{schema.upgrade_script(version)}\nCOMMIT;")


def _probe_write(db: sqlite3.Connection, version: int) -> None:
    """Write the version it already has, then roll back: this needs the file writable, the folder writable
    (the journal is created beside it) and no other writer, and changes nothing."""
    db.execute("BEGIN IMMEDIATE")
    db.execute(f"PRAGMA user_version = {version}")
    db.execute("ROLLBACK")


def _discard_empty(path: Path) -> None:
    """A history this call began to create and could not finish: remove the empty file it left."""
    try:
        if path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass


def rollback(db: sqlite3.Connection) -> None:
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # the transaction is gone with the error (sqlite rolls back on some failures itself)


def cause(exc: sqlite3.Error) -> str:
    """locked | read-only | cannot-open | corrupt | full | other, from sqlite's code (3.11+) or its text."""
    name, text = str(getattr(exc, "sqlite_errorname", "")), str(exc).lower()
    for kind, names, words in (("locked", ("SQLITE_BUSY", "SQLITE_LOCKED"), ("locked", "busy")),
                                ("read-only", ("SQLITE_READONLY",), ("readonly", "read-only")),
                                ("cannot-open", ("SQLITE_CANTOPEN",), ("unable to open",)),
                                ("corrupt", ("SQLITE_CORRUPT", "SQLITE_NOTADB"), ("malformed", "not a database")),
                                ("full", ("SQLITE_FULL",), ("disk is full", "database or disk is full"))):
        if name.startswith(names) or any(word in text for word in words):
            return kind
    return "other"


def _opening_error(path: Path, exc: sqlite3.Error) -> HistoryError:
    folder = path.absolute().parent
    return HistoryError({
        "locked": f"{path} is locked by another writer (another deploy run or history command): try again when"
                  " it has finished",
        "read-only": f"{path} is read-only: make it writable or choose another history file",
        "cannot-open": f"cannot write {path}: its folder {folder} is not writable (sqlite writes its journal"
                       " beside the file): make the folder writable or choose another history file",
        "corrupt": f"{path} is not a SQLite database or is corrupt ({exc}): move it aside (a new one is created)"
                   " or restore a backup",
        "full": f"cannot write {path}: the disk is full",
    }.get(cause(exc), f"cannot open {path}: {exc}"))
