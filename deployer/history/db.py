"""`history.db`: every nightly run, what each device did in it, and the verdicts, in one SQLite file.

The tables and their migrations are in `deployer.history.schema` (its docstring lists each table).
`History.open` checks everything before the caller touches a board (`deployer.history.opening`): a
missing folder, not a SQLite database or corrupt, another program's database, a newer schema, read-only,
locked by another writer; each raises `HistoryError` (exit 3) naming the file and the fix, and leaves the
file untouched. A new file is created complete in one transaction; an older one is migrated in one.

Durability: rollback journal (not WAL, which needs a writable folder for its shared memory and breaks on
network file systems), `synchronous=FULL`, foreign keys on, and explicit transactions (`BEGIN IMMEDIATE`
... `COMMIT`): each device's result is one transaction, so a crash leaves all of its rows or none. The
phase `history record` (deployer.phases) is reached with every row of a device written and not yet
committed: the tests kill a process there.

Threads: the executor records from its worker threads. One connection is shared under a lock held for
each transaction and each read, so any thread may call any method.

A run killed outright (SIGKILL, power loss) stays 'running'. The next `begin_run` (and `prune`) on the
same host marks 'incomplete' every 'running' run of that host whose pid is no longer alive. Runs of other
hosts (a history on a shared folder) are left alone: their pids cannot be checked from here.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deployer import phases
from deployer.errors import HistoryError
from deployer.history import opening
from deployer.history.records import (
    DeviceResult,
    Fingerprint,
    ItemResult,
    LatencyResult,
    Metric,
    Sample,
    Status,
    Subject,
    Verdict,
)

RunStatus = Literal["running", "complete", "incomplete"]
FinalStatus = Literal["complete", "incomplete"]

LOCK_WAIT_S = 2.0  # opening: another writer's transaction is a run in progress; say so rather than wait
WRITE_WAIT_S = 10.0  # mid-run: a reader or another run's commit holds the file for moments, not minutes
PRUNE_BATCH = 50  # runs deleted per transaction, so a concurrent run waits for one batch at most


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One row of `runs`."""

    id: int
    playbook: str
    playbook_path: str
    playbook_sha256: str
    fleet: str
    devices: tuple[str, ...]  # as planned at begin_run; a killed run may have recorded fewer
    started: float
    ended: float | None  # None while running, and for a run found dead (its end is unknown)
    status: RunStatus
    pid: int
    host: str
    settings: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SampleRow:
    """One night of one latency series, as `sample_rows` reads it."""

    run_id: int
    started: float
    device: str
    step: str
    item: str
    metric: str
    values: tuple[float, ...]
    fingerprint_id: str | None
    fingerprint_label: str | None
    latency: str | None  # the night's latency verdict kind, if judged
    since_run: int | None


@dataclass(frozen=True, slots=True)
class PastResult:
    """An earlier pass/fail result of one device for one (step, item), with what it ran on."""

    run_id: int
    started: float  # the run's start
    status: Status
    flaky: bool
    fingerprint_id: str | None
    fingerprint_label: str | None
    subject: str  # sha256, "" when nothing identified it
    subject_kind: str | None  # the kind of the Subject recorded with that sha256 (kernel, model...), if any


class History:
    """An open `history.db`; build with `History.open`. Usable as a context manager (closes)."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, create: bool = True, wait_s: float = LOCK_WAIT_S, read_only: bool = False
             ) -> History:
        """Open (or, with `create`, create) the history at `path`, checked whole; see the module docstring.
        `read_only`: for the commands that only read (reports, list, show, compare), so a history on a
        read-only mount or kept as a CI artifact can be read; it must exist and be of this schema."""
        path = Path(path)
        db = opening.connect(path, create=create and not read_only, wait_s=wait_s, read_only=read_only)
        db.execute(f"PRAGMA busy_timeout = {int(WRITE_WAIT_S * 1000)}")
        return cls(path, db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # writes: one transaction each

    def begin_run(self, playbook_name: str, playbook_path: str, playbook_sha256: str, fleet: str,
                  devices: Sequence[str], settings: Mapping[str, Any], *, started: float | None = None) -> int:
        """Insert a 'running' run and return its id, first marking this host's dead 'running' runs
        'incomplete'. `started` (default now) lets tests seed earlier nights."""
        row = (playbook_name, playbook_path, playbook_sha256, fleet, json.dumps(list(devices)),
               time.time() if started is None else started, os.getpid(), socket.gethostname(),
               json.dumps(dict(settings), sort_keys=True))
        with self._transaction("begin a run") as db:
            _mark_dead_runs(db)
            cursor = db.execute(
                "INSERT INTO runs (playbook, playbook_path, playbook_sha256, fleet, devices, started, status, pid,"
                " host, settings) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)", row)
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def record_device(self, run_id: int, result: DeviceResult) -> None:
        """Store one device's result whole (device row, results, metrics, subjects) in one transaction.
        A device already recorded for this run, or a run that is not running, is refused."""
        with self._transaction(f"record device {result.device!r} of run {run_id}") as db:
            _require_running(db, self.path, run_id)
            if db.execute("SELECT 1 FROM run_devices WHERE run_id = ? AND device = ?",
                          (run_id, result.device)).fetchone():
                raise HistoryError(f"{self.path}: device {result.device!r} is already recorded for run {run_id}")
            insert_device(db, run_id, result)
            phases.reached("history record")  # every row written, not committed: a kill here leaves none

    def record_verdicts(self, run_id: int, verdicts: Sequence[Verdict]) -> None:
        """Store verdicts of the run (all at once or per device; one verdict per result, ever)."""
        with self._transaction(f"record the verdicts of run {run_id}") as db:
            insert_verdicts(db, run_id, verdicts)

    def finish_run(self, run_id: int, status: FinalStatus, *, ended: float | None = None) -> None:
        """Close a running run: 'complete' (every device recorded) or 'incomplete' (interrupted)."""
        if status not in ("complete", "incomplete"):
            raise ValueError(f"a run finishes 'complete' or 'incomplete', not {status!r}")
        with self._transaction(f"finish run {run_id}") as db:
            _require_running(db, self.path, run_id)
            db.execute("UPDATE runs SET status = ?, ended = ? WHERE id = ?",
                       (status, time.time() if ended is None else ended, run_id))

    def mark_dead_runs(self) -> list[int]:
        """Mark 'incomplete' this host's 'running' runs whose pid is gone; their ids."""
        with self._transaction("mark dead runs") as db:
            return _mark_dead_runs(db)

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Delete the runs that started more than `older_than_s` before `now`, with all their rows; how many.
        A 'running' run is kept (after dead ones are marked): it may be live, or of another host."""
        if older_than_s < 0:
            raise ValueError(f"older_than_s must not be negative (got {older_than_s})")
        cutoff = (time.time() if now is None else now) - older_than_s
        self.mark_dead_runs()
        deleted = 0
        while True:
            with self._transaction("prune old runs") as db:
                ids = [row[0] for row in db.execute(
                    "SELECT id FROM runs WHERE started < ? AND status != 'running' ORDER BY started LIMIT ?",
                    (cutoff, PRUNE_BATCH))]
                db.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in ids])
            deleted += len(ids)
            if len(ids) < PRUNE_BATCH:
                return deleted

    # reads

    def run(self, run_id: int) -> RunInfo | None:
        with self._reading() as db:
            row = db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else run_info(row)

    def runs(self, limit: int = 20) -> list[RunInfo]:
        """The latest runs, newest first."""
        with self._reading() as db:
            rows = db.execute(f"SELECT {RUN_COLUMNS} FROM runs ORDER BY started DESC, id DESC LIMIT ?",
                              (limit,)).fetchall()
        return [run_info(row) for row in rows]

    def device_results(self, run_id: int) -> list[DeviceResult]:
        """The recorded devices of a run as records, by device name; items, metrics, subjects in record order."""
        with self._reading() as db:
            return _read_devices(db, run_id)

    def verdicts(self, run_id: int) -> list[Verdict]:
        with self._reading() as db:
            rows = db.execute("SELECT device, step, item, kind, note, baseline_run FROM verdicts"
                              " WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall()
        return [Verdict(device=r[0], step=r[1], item=r[2], kind=r[3], note=r[4], baseline_run=r[5]) for r in rows]

    # latency (schema 3, docs/regressions.md)

    def record_latency(self, run_id: int, results: Sequence[LatencyResult]) -> None:
        with self._transaction(f"record the latency verdicts of run {run_id}") as db:
            insert_latency(db, run_id, results)

    def latency(self, run_id: int) -> list[LatencyResult]:
        with self._reading() as db:
            rows = db.execute("SELECT device, step, item, metric, kind, since_run, change, p_value, baseline, current,"
                              " note FROM latency WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall()
        return [LatencyResult(*row) for row in rows]

    def sample_nights(self, run_id: int, device: str, step: str, item: str, metric: str, *, fingerprint_id: str | None,
                      subject: str, limit: int = 60) -> list[tuple[int, float, list[float]]]:
        """(run id, start, repeats) of a latency series' segment, oldest first, up to and including
        `run_id`: the nights of this device and item with samples of `metric`, on the same fingerprint and
        subject, since the series was last accepted (`accept`); at most the `limit` newest."""
        with self._reading() as db:
            since = db.execute("SELECT since FROM accepted WHERE device = ? AND step = ? AND item = ? AND metric = ?",
                               (device, step, item, metric)).fetchone()
            rows = db.execute(
                "SELECT r.id, r.started, s.vals FROM samples s JOIN results res ON res.id = s.result_id"
                " JOIN runs r ON r.id = res.run_id"
                " JOIN run_devices rd ON rd.run_id = res.run_id AND rd.device = res.device"
                " WHERE res.device = ? AND res.step = ? AND res.item = ? AND s.name = ? AND res.status = 'pass'"
                " AND rd.fingerprint_id IS ? AND res.subject = ? AND r.started >= ?"
                " AND (r.id = ? OR (r.status IN ('complete', 'incomplete')"
                " AND (r.started, r.id) < (SELECT started, id FROM runs WHERE id = ?)))"
                " ORDER BY r.started DESC, r.id DESC LIMIT ?",
                (device, step, item, metric, fingerprint_id, subject, since[0] if since else 0.0, run_id, run_id,
                 limit)).fetchall()
        return [(r[0], r[1], json.loads(r[2])) for r in reversed(rows)]

    def sample_rows(self, *, device: str | None = None, item: str | None = None, metric: str | None = None,
                    runs: int = 30) -> list[SampleRow]:
        """The samples of the newest `runs` runs, filtered (`item` may be a substring), oldest first: the
        timeline `deploy history show` prints, with each night's latency verdict and fingerprint."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT r.id, r.started, res.device, res.step, res.item, s.name, s.vals, rd.fingerprint_id,"
                " rd.fingerprint_label, l.kind, l.since_run FROM samples s"
                " JOIN results res ON res.id = s.result_id JOIN runs r ON r.id = res.run_id"
                " JOIN run_devices rd ON rd.run_id = res.run_id AND rd.device = res.device"
                " LEFT JOIN latency l ON l.run_id = r.id AND l.device = res.device AND l.step = res.step"
                " AND l.item = res.item AND l.metric = s.name"
                " WHERE r.id IN (SELECT id FROM runs ORDER BY started DESC, id DESC LIMIT ?)"
                " AND (? IS NULL OR res.device = ?) AND (? IS NULL OR instr(res.item, ?) > 0)"
                " AND (? IS NULL OR s.name = ?) ORDER BY res.device, res.step, res.item, s.name, r.started, r.id",
                (runs, device, device, item, item, metric, metric)).fetchall()
        return [SampleRow(run_id=r[0], started=r[1], device=r[2], step=r[3], item=r[4], metric=r[5],
                          values=tuple(json.loads(r[6])), fingerprint_id=r[7], fingerprint_label=r[8], latency=r[9],
                          since_run=r[10]) for r in rows]

    def accept(self, device: str, step: str, item: str, metric: str, *, since: float) -> None:
        """Accept a series' new level: its segment starts again at `since` (the night the change began)."""
        with self._transaction(f"accept {device} {step} {item} {metric}") as db:
            db.execute("INSERT OR REPLACE INTO accepted (device, step, item, metric, since, at)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (device, step, item, metric, since, time.time()))

    def earlier_results(self, run_id: int, device: str, step: str, item: str, *, limit: int = 10) -> list[PastResult]:
        """The device's pass/fail results for (step, item) in finished runs that started before `run_id`,
        newest first, at most `limit`; whatever they ran on."""
        return self._past(run_id, device, step, item, limit, None)

    def comparable_results(self, run_id: int, device: str, step: str, item: str, *, fingerprint_id: str | None,
                           subject: str, limit: int = 10) -> list[PastResult]:
        """As `earlier_results`, only those on the same fingerprint id and subject sha256: the first one is
        the comparable run (deployer.history.verdicts)."""
        return self._past(run_id, device, step, item, limit, (fingerprint_id, subject))

    def _past(self, run_id: int, device: str, step: str, item: str, limit: int,
              same: tuple[str | None, str] | None) -> list[PastResult]:
        query, args = _PAST_QUERY, [device, step, item, run_id, run_id]
        if same is not None:
            query += " AND rd.fingerprint_id IS ? AND res.subject = ?"
            args += list(same)
        with self._reading() as db:
            rows = db.execute(query + _PAST_ORDER, [*args, limit]).fetchall()
        return [PastResult(run_id=r[0], started=r[1], status=r[2], flaky=bool(r[3]), fingerprint_id=r[4],
                           fingerprint_label=r[5], subject=r[6], subject_kind=r[7]) for r in rows]

    # transactions

    def writing(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction for code of this package that writes rows itself (shards.py)."""
        return self._transaction(what)

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the lock; any failure rolls back and sqlite's errors become
        HistoryError naming the file and what was being done."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                opening.rollback(self._db)
                raise _failure(self.path, what, exc) from exc
            except BaseException:
                opening.rollback(self._db)
                raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (one snapshot across its queries) under the lock."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                opening.rollback(self._db)
                raise _failure(self.path, "read", exc) from exc
            except BaseException:
                opening.rollback(self._db)
                raise


def _failure(path: Path, what: str, exc: sqlite3.Error) -> HistoryError:
    """A failed transaction (already rolled back: nothing of it was written)."""
    cause = opening.cause(exc)
    if cause == "locked":
        return HistoryError(f"cannot {what} in {path}: locked by another writer for over {WRITE_WAIT_S:g} s")
    detail = "the disk is full" if cause == "full" else str(exc)
    return HistoryError(f"cannot {what} in {path}: {detail}; nothing of it was written")


# writes


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _mark_dead_runs(db: sqlite3.Connection) -> list[int]:
    rows = db.execute("SELECT id, pid FROM runs WHERE status = 'running' AND host = ?", (socket.gethostname(),))
    dead = [run_id for run_id, pid in rows.fetchall() if not _pid_alive(pid)]
    db.executemany("UPDATE runs SET status = 'incomplete' WHERE id = ?", [(run_id,) for run_id in dead])
    return dead


def _require_running(db: sqlite3.Connection, path: Path, run_id: int) -> None:
    row = db.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise HistoryError(f"{path} has no run {run_id}")
    if row[0] != "running":
        raise HistoryError(f"{path}: run {run_id} is {row[0]}, no longer running")


def insert_verdicts(db: sqlite3.Connection, run_id: int, verdicts: Sequence[Verdict]) -> None:
    db.executemany("INSERT INTO verdicts (run_id, device, step, item, kind, note, baseline_run)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [(run_id, v.device, v.step, v.item, v.kind, v.note, v.baseline_run) for v in verdicts])


def insert_latency(db: sqlite3.Connection, run_id: int, results: Sequence[LatencyResult]) -> None:
    db.executemany(
        "INSERT INTO latency (run_id, device, step, item, metric, kind, since_run, change, p_value, baseline,"
        " current, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(run_id, r.device, r.step, r.item, r.metric, r.kind, r.since_run, r.change, r.p_value, r.baseline,
          r.current, r.note) for r in results])


def insert_device(db: sqlite3.Connection, run_id: int, result: DeviceResult) -> None:
    fingerprint_id, label = (result.fingerprint.id, result.fingerprint.label) if result.fingerprint else (None, None)
    db.execute("INSERT INTO run_devices (run_id, device, state, fingerprint_id, fingerprint_label, started, ended,"
               " reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (run_id, result.device, result.state, fingerprint_id, label, result.started, result.ended,
                result.reason))
    for item in result.items:
        cursor = db.execute(
            "INSERT INTO results (run_id, device, step, kind, item, status, reason, flaky, attempts, subject,"
            " duration_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, result.device, item.step, item.kind, item.item, item.status, item.reason, int(item.flaky),
             item.attempts, item.subject, item.duration_s))
        db.executemany("INSERT INTO metrics (result_id, name, value, unit) VALUES (?, ?, ?, ?)",
                       [(cursor.lastrowid, m.name, m.value, m.unit) for m in item.metrics])
        db.executemany("INSERT INTO samples (result_id, name, unit, vals) VALUES (?, ?, ?, ?)",
                       [(cursor.lastrowid, x.name, x.unit, json.dumps(list(x.values))) for x in item.samples])
    db.executemany("INSERT INTO subjects (run_id, device, kind, name, sha256) VALUES (?, ?, ?, ?, ?)",
                   [(run_id, result.device, s.kind, s.name, s.sha256) for s in result.subjects])


# reads

RUN_COLUMNS = ("id, playbook, playbook_path, playbook_sha256, fleet, devices, started, ended, status, pid, host,"
                " settings")

# Earlier: started before the run (id breaks a tie), finished, not the run itself; pass/fail only.
_PAST_QUERY = """
SELECT r.id, r.started, res.status, res.flaky, rd.fingerprint_id, rd.fingerprint_label, res.subject,
       (SELECT s.kind FROM subjects s WHERE s.run_id = res.run_id AND s.device = res.device
        AND s.sha256 = res.subject ORDER BY s.rowid LIMIT 1)
FROM results res
JOIN runs r ON r.id = res.run_id
JOIN run_devices rd ON rd.run_id = res.run_id AND rd.device = res.device
WHERE res.device = ? AND res.step = ? AND res.item = ? AND res.status IN ('pass', 'fail')
  AND r.status IN ('complete', 'incomplete') AND r.id != ?
  AND (r.started, r.id) < (SELECT started, id FROM runs WHERE id = ?)"""
_PAST_ORDER = " ORDER BY r.started DESC, r.id DESC LIMIT ?"


def run_info(row: Sequence[Any]) -> RunInfo:
    return RunInfo(id=row[0], playbook=row[1], playbook_path=row[2], playbook_sha256=row[3], fleet=row[4],
                   devices=tuple(json.loads(row[5])), started=row[6], ended=row[7], status=row[8], pid=row[9],
                   host=row[10], settings=json.loads(row[11]))


def _read_devices(db: sqlite3.Connection, run_id: int) -> list[DeviceResult]:
    metrics: dict[int, list[Metric]] = {}
    for result_id, name, value, unit in db.execute(
            "SELECT m.result_id, m.name, m.value, m.unit FROM metrics m JOIN results r ON r.id = m.result_id"
            " WHERE r.run_id = ? ORDER BY m.rowid", (run_id,)):
        metrics.setdefault(result_id, []).append(Metric(name=name, value=value, unit=unit))
    samples: dict[int, list[Sample]] = {}
    for result_id, name, unit, vals in db.execute(
            "SELECT s.result_id, s.name, s.unit, s.vals FROM samples s JOIN results r ON r.id = s.result_id"
            " WHERE r.run_id = ? ORDER BY s.rowid", (run_id,)):
        samples.setdefault(result_id, []).append(Sample(name, unit, tuple(json.loads(vals))))
    items: dict[str, list[ItemResult]] = {}
    for row in db.execute("SELECT id, device, step, kind, item, status, reason, flaky, attempts, subject,"
                          " duration_s FROM results WHERE run_id = ? ORDER BY id", (run_id,)):
        items.setdefault(row[1], []).append(ItemResult(
            step=row[2], kind=row[3], item=row[4], status=row[5], reason=row[6], flaky=bool(row[7]),
            attempts=row[8], subject=row[9], duration_s=row[10], metrics=tuple(metrics.get(row[0], ())),
            samples=tuple(samples.get(row[0], ()))))
    subjects: dict[str, list[Subject]] = {}
    for device, kind, name, sha256 in db.execute(
            "SELECT device, kind, name, sha256 FROM subjects WHERE run_id = ? ORDER BY rowid", (run_id,)):
        subjects.setdefault(device, []).append(Subject(kind=kind, name=name, sha256=sha256))
    devices = db.execute("SELECT device, state, fingerprint_id, fingerprint_label, started, ended, reason"
                         " FROM run_devices WHERE run_id = ? ORDER BY device", (run_id,)).fetchall()
    return [_device(row, items.get(row[0], []), subjects.get(row[0], [])) for row in devices]


def _device(row: Sequence[Any], items: list[ItemResult], subjects: list[Subject]) -> DeviceResult:
    device, state, fingerprint_id, fingerprint_label, started, ended, reason = row
    fingerprint = None if fingerprint_id is None else Fingerprint(id=fingerprint_id, label=fingerprint_label or "")
    return DeviceResult(device=device, state=state, started=started, ended=ended, fingerprint=fingerprint,
                        items=tuple(items), subjects=tuple(subjects), reason=reason)

