"""The history database and the verdicts: real SQLite files in tmp_path, no mocks.

Faults are made real: garbage and truncated files, a file or folder that cannot be written (chmod, or the
immutable attribute when running as root, which ignores modes), another connection holding the write
lock, a process SIGKILLed in the middle of a transaction.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer.errors import HistoryError, InputError, LocalStateError
from deployer.history import db as db_module
from deployer.history import schema
from deployer.history.db import History
from deployer.history.durations import parse_age
from deployer.history.records import (
    DeviceResult,
    Fingerprint,
    ItemResult,
    Metric,
    Status,
    Subject,
    Verdict,
    VerdictKind,
)
from deployer.history.verdicts import VerdictCounts, change_note, flips, judge, summarize
from deployer.sim.fleet import Fleet

REPO = Path(__file__).resolve().parents[1]
DAY = 86400.0
BASE = 1_700_000_000.0  # night 0
POCL_A = Fingerprint("a1a1a1a1a1a1a1a1", "PoCL 3.1 pthread cpu")
POCL_B = Fingerprint("b2b2b2b2b2b2b2b2", "PoCL 5.0 pthread cpu")
ADD_V1 = Subject("kernel", "add", "1" * 64)
ADD_V2 = Subject("kernel", "add", "2" * 64)
MODEL = Subject("model", "tiny.bin", "3" * 64)
OTHERS: tuple[Status, ...] = ("error", "miss", "skip")
FLIPPING: tuple[Status, ...] = ("pass", "fail", "pass", "fail")


def item(status: Status, name: str = "add/case0", *, step: str = "smoke", subject: str = ADD_V1.sha256,
         flaky: bool = False) -> ItemResult:
    return ItemResult(step=step, kind="smoke", item=name, status=status, subject=subject, flaky=flaky)


def device(items: Sequence[ItemResult], *, name: str = "pi-1", fingerprint: Fingerprint | None = POCL_A,
           subjects: Sequence[Subject] = (ADD_V1,), night: int = 0) -> DeviceResult:
    return DeviceResult(device=name, state="ok", started=BASE + night * DAY, ended=BASE + night * DAY + 60,
                        fingerprint=fingerprint, items=tuple(items), subjects=tuple(subjects))


def begin(history: History, night: float, devices: Sequence[str] = ("pi-1",)) -> int:
    return history.begin_run("nightly", "playbooks/nightly.yml", "f" * 64, "inventory/lab.yml", devices,
                             {"flaky_window": 10}, started=BASE + night * DAY)


def seed(history: History, night: float, *results: DeviceResult, status: str = "complete") -> int:
    """An earlier night, recorded as the executor would, without running it."""
    run_id = begin(history, night, [r.device for r in results])
    for result in results:
        history.record_device(run_id, result)
    if status != "running":
        history.finish_run(run_id, "complete" if status == "complete" else "incomplete",
                           ended=BASE + night * DAY + 3600)
    return run_id


def judged(history: History, night: float, *results: DeviceResult, **options: int) -> list[Verdict]:
    """Tonight's run: begun, judged against the past (its results need not be recorded to be judged)."""
    return judge(history, begin(history, night, [r.device for r in results]), results, **options)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count(path: Path, table: str, where: str = "1", *args: object) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT count(*) FROM {table} WHERE {where}", args).fetchone()[0])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "history.db"


@pytest.fixture
def history(path: Path) -> Iterator[History]:
    with History.open(path) as opened:
        yield opened


# opening and creating


def test_a_new_history_is_created_whole_at_the_current_version(path: Path) -> None:
    History.open(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION == 3
        assert db.execute("PRAGMA application_id").fetchone()[0] == schema.APPLICATION_ID
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"runs", "run_devices", "results", "subjects", "metrics", "verdicts", "samples", "latency",
                      "accepted"}
    assert not path.with_name("history.db-journal").exists()


def test_a_missing_folder_or_file_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match=r"folder .*nowhere does not exist: create it"):
        History.open(tmp_path / "nowhere" / "history.db")
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(HistoryError, match=r"no history at .*history.db: the first `deploy run` creates it"):
        History.open(tmp_path / "history.db", create=False)
    assert not (tmp_path / "history.db").exists()


def test_an_empty_file_becomes_a_history(path: Path) -> None:
    path.touch()  # SQLite reads a 0-byte file as an empty database
    with History.open(path) as history:
        assert history.runs() == []
    assert count(path, "runs") == 0


# one device result: a round trip, one transaction


def test_a_device_result_round_trips(path: Path) -> None:
    full = DeviceResult(
        device="pi-2", state="ok", started=BASE + 1.5, ended=BASE + 99.25, fingerprint=POCL_B,
        items=(ItemResult("health", "health", "", "pass", duration_s=0.5),
               ItemResult("smoke", "smoke", "add/case0", "fail", reason="max error 3e-2 > 1e-3", attempts=2,
                          subject=ADD_V1.sha256, duration_s=1.25,
                          metrics=(Metric("max_error", 0.03), Metric("build", 2.5, "s"))),
               ItemResult("smoke", "smoke", "add/case1", "pass", flaky=True, attempts=2, subject=ADD_V1.sha256),
               ItemResult("temp", "shell", "", "pass", subject="c" * 64, metrics=(Metric("temp", 61.0, "C"),))),
        subjects=(ADD_V1, MODEL, Subject("command", "temp", "c" * 64)))
    offline = DeviceResult(device="pi-1", state="offline", started=BASE, ended=BASE + 5, reason="connect: refused",
                           items=(ItemResult("health", "health", "", "error", reason="connect: refused"),
                                  ItemResult("smoke", "smoke", "", "miss", reason="device offline")))
    with History.open(path) as history:
        run_id = history.begin_run("nightly", "playbooks/nightly.yml", "e" * 64, "inventory/lab.yml",
                                   ["pi-2", "pi-1"], {"flaky_window": 7, "flaky_flips": 2}, started=BASE)
        history.record_device(run_id, full)
        history.record_device(run_id, offline)
        history.finish_run(run_id, "complete", ended=BASE + 100)
    with History.open(path, create=False) as history:  # read back by a fresh connection
        assert history.device_results(run_id) == [offline, full]  # by device name
        run = history.run(run_id)
    assert run is not None
    assert (run.playbook, run.playbook_path, run.playbook_sha256, run.fleet) == (
        "nightly", "playbooks/nightly.yml", "e" * 64, "inventory/lab.yml")
    assert (run.devices, run.started, run.ended, run.status) == (("pi-2", "pi-1"), BASE, BASE + 100, "complete")
    assert (run.pid, run.settings) == (os.getpid(), {"flaky_window": 7, "flaky_flips": 2})
    assert count(path, "metrics") == 3


def test_runs_are_listed_newest_first_and_unknown_ones_are_none(history: History) -> None:
    ids = [seed(history, night, device([item("pass")])) for night in (2, 0, 1)]
    assert [run.id for run in history.runs()] == [ids[0], ids[2], ids[1]]
    assert [run.id for run in history.runs(limit=2)] == [ids[0], ids[2]]
    assert history.run(999) is None and history.device_results(999) == [] and history.verdicts(999) == []


def test_a_record_that_fails_midway_leaves_none_of_its_rows(history: History, path: Path) -> None:
    run_id = begin(history, 0)
    broken = device([item("pass", "a"), item("fail", "b"), item("pass", "a")],  # (step, item) twice
                    subjects=(ADD_V1, MODEL))
    with pytest.raises(HistoryError, match=r"cannot record device 'pi-1' of run \d+ in .*UNIQUE.*nothing of it"):
        history.record_device(run_id, broken)
    for table in ("run_devices", "results", "subjects"):
        assert count(path, table) == 0, table
    assert count(path, "metrics") == 0
    good = device([item("pass", "a"), item("fail", "b")])
    history.record_device(run_id, good)  # the connection is still usable, and the device not taken
    assert history.device_results(run_id) == [good]


def test_recording_a_device_twice_is_refused_and_the_first_kept(history: History) -> None:
    run_id = begin(history, 0)
    first = device([item("pass")])
    history.record_device(run_id, first)
    with pytest.raises(HistoryError, match="device 'pi-1' is already recorded for run"):
        history.record_device(run_id, device([item("fail")]))
    assert history.device_results(run_id) == [first]


def test_a_finished_or_unknown_run_takes_no_more_records(history: History) -> None:
    run_id = seed(history, 0, device([item("pass")]))
    with pytest.raises(HistoryError, match=f"run {run_id} is complete, no longer running"):
        history.record_device(run_id, device([item("pass")], name="pi-2"))
    with pytest.raises(HistoryError, match=f"run {run_id} is complete"):
        history.finish_run(run_id, "incomplete")
    with pytest.raises(HistoryError, match="has no run 12345"):
        history.record_device(12345, device([item("pass")]))
    run = history.run(run_id)
    assert run is not None and run.status == "complete" and run.ended == BASE + 3600


def test_worker_threads_record_devices_at_once(history: History) -> None:
    names = [f"pi-{n}" for n in range(12)]
    run_id = begin(history, 0, names)
    results = {name: device([item("pass", f"case{i}") for i in range(20)], name=name) for name in names}
    errors: list[BaseException] = []

    def record(result: DeviceResult) -> None:
        try:
            history.record_device(run_id, result)
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(result,)) for result in results.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert history.device_results(run_id) == [results[name] for name in sorted(names)]


KILLED = """
import os, signal, sys
from pathlib import Path
from deployer import phases
from deployer.history.db import History
from deployer.history.records import DeviceResult, ItemResult, Metric, Subject

history = History.open(Path(sys.argv[1]))
run_id = history.begin_run("nightly", "p.yml", "f" * 64, "lab.yml", ["pi-1"], {})
print(run_id, flush=True)
if sys.argv[2] == "record":
    phases.observe(lambda phase, fd: os.kill(os.getpid(), signal.SIGKILL) if phase == "history record" else None)
    items = tuple(ItemResult("smoke", "smoke", "case%d" % i, "pass", metrics=(Metric("t", 1.0),)) for i in range(50))
    history.record_device(run_id, DeviceResult("pi-1", "ok", 1.0, 2.0, items=items,
                                               subjects=(Subject("kernel", "add", "1" * 64),)))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("moment", ["record", "between devices"])
def test_a_killed_run_leaves_whole_rows_and_is_marked_incomplete_by_the_next(path: Path, moment: str) -> None:
    History.open(path).close()
    killed = subprocess.run([sys.executable, "-c", KILLED, str(path), moment], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_id = int(killed.stdout)
    # killed inside the transaction: its rows sit in the file, the journal beside it can undo them
    assert path.with_name("history.db-journal").exists() == (moment == "record")
    with History.open(path) as history:
        assert history.device_results(run_id) == []
        assert count(path, "results") == count(path, "metrics") == 0
        run = history.run(run_id)
        assert run is not None and run.status == "running"  # nobody has looked yet
        later = begin(history, 1)
        run = history.run(run_id)
        assert run is not None and (run.status, run.ended) == ("incomplete", None)
        assert history.run(later) is not None
        assert history.mark_dead_runs() == []


def test_a_running_run_of_a_live_process_stays_running(history: History) -> None:
    first = begin(history, 0)  # this process: alive
    begin(history, 1)
    run = history.run(first)
    assert run is not None and run.status == "running"


# migrations and refusals


def make_v1(path: Path) -> None:
    """A history as a deployer of schema 1 left it, with one run."""
    with sqlite3.connect(path, isolation_level=None) as db:
        db.executescript(f"BEGIN; {schema.upgrade_script(0, 1)} COMMIT;")
        db.executescript(f"""
            INSERT INTO runs (id, playbook, playbook_path, playbook_sha256, fleet, devices, started, ended, status,
                              pid, host, settings)
            VALUES (7, 'nightly', 'p.yml', '{"f" * 64}', 'lab.yml', '["pi-1"]', {BASE}, {BASE + 60}, 'complete', 1,
                    'old-host', '{{}}');
            INSERT INTO run_devices VALUES (7, 'pi-1', 'ok', '{POCL_A.id}', '{POCL_A.label}', {BASE}, {BASE + 60}, '');
            INSERT INTO results (run_id, device, step, kind, item, status, subject)
            VALUES (7, 'pi-1', 'smoke', 'smoke', 'add/case0', 'pass', '{ADD_V1.sha256}');
            INSERT INTO subjects VALUES (7, 'pi-1', 'kernel', 'add', '{ADD_V1.sha256}');""")
    db.close()


def test_a_v1_history_is_migrated_in_place_and_keeps_its_runs(path: Path) -> None:
    make_v1(path)
    assert count(path, "sqlite_master", "name = 'metrics'") == 0
    with History.open(path) as history:
        assert history.device_results(7) == [device([item("pass")])]
        verdicts = judged(history, 1, device([item("fail")], night=1))
        assert [(v.kind, v.baseline_run) for v in verdicts] == [("new_failure", 7)]  # the v1 run is a baseline
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION
    assert count(path, "sqlite_master", "name IN ('metrics', 'verdicts', 'samples', 'latency')") == 4


def test_a_migration_that_fails_leaves_the_file_as_it_was(path: Path) -> None:
    make_v1(path)
    with sqlite3.connect(path) as db:  # something in the way of migration 2
        db.execute("CREATE TABLE verdicts (x)")
    db.close()
    before = digest(path)
    with pytest.raises(HistoryError, match="table verdicts already exists"):
        History.open(path)
    assert digest(path) == before  # migration 2's metrics table, created first, was rolled back too


def test_a_newer_schema_is_refused_and_left_byte_identical(path: Path) -> None:
    History.open(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 5")
    db.close()
    before = digest(path)
    with pytest.raises(HistoryError) as refused:
        History.open(path)
    assert str(refused.value) == f"{path} has schema 5; this deployer knows up to {schema.VERSION}: upgrade deployer"
    assert isinstance(refused.value, LocalStateError) and refused.value.exit_code == 3
    assert digest(path) == before


@pytest.mark.parametrize("content", [b"not a database at all\n" * 100, b"SQLite", os.urandom(8192),
                                     b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_file_that_is_not_a_database_is_refused_and_left_byte_identical(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    with pytest.raises(HistoryError, match=r"history.db is not a SQLite database.*: move it aside"):
        History.open(path)
    assert path.read_bytes() == content


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def scribble(path: Path) -> None:
    """Overwrite a page in the middle (page 1, the schema, stays whole: only `PRAGMA quick_check` sees it)."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 4096 // 2 * 4096)
        handle.write(b"\xff" * 4096)


@pytest.mark.parametrize("damage", [truncate, scribble])
def test_a_damaged_history_is_refused_and_left_byte_identical(path: Path, damage: Callable[[Path], None]) -> None:
    with History.open(path) as history:
        for night in range(30):
            seed(history, night, device([item("pass", f"case{i}") for i in range(40)]))
    assert path.stat().st_size > 40 * 4096
    damage(path)
    before = digest(path)
    with pytest.raises(HistoryError, match=r"history.db is (not a SQLite database or is )?corrupt .*restore a backup"):
        History.open(path)
    assert digest(path) == before


def test_another_programs_database_is_refused(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text)")
    db.close()
    before = digest(path)
    with pytest.raises(HistoryError, match="of another program, not a deployer history"):
        History.open(path)
    assert digest(path) == before


@contextmanager
def unwritable(target: Path) -> Iterator[None]:
    """Make a file or folder really unwritable. Modes stop everyone but root; root is stopped only by the
    immutable attribute (chattr +i on ext4, xfs, btrfs), so that is used when running as root."""
    if os.geteuid() != 0:
        mode = target.stat().st_mode
        target.chmod(mode & ~0o222)
        try:
            yield
        finally:
            target.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("running as root without chattr: nothing here makes a file read-only for root")
    made = subprocess.run([chattr, "+i", str(target)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"running as root, and {target.parent} has no immutable attribute: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(target)], check=True)


def test_a_read_only_file_is_refused_and_left_byte_identical(path: Path) -> None:
    History.open(path).close()
    before = digest(path)
    with unwritable(path):
        with pytest.raises(PermissionError):
            open(path, "r+b").close()  # the premise: this file cannot be written, even by root
        with pytest.raises(HistoryError, match=r"history.db is read-only: make it writable"):
            History.open(path)
    assert digest(path) == before


def test_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    History.open(folder / "history.db").close()
    before = digest(folder / "history.db")
    with unwritable(folder):
        with pytest.raises(PermissionError):
            (folder / "probe").touch()  # the premise: nothing can be created here (SQLite's journal neither)
        with pytest.raises(HistoryError, match=r"its folder .*ro is not writable \(sqlite writes its journal"):
            History.open(folder / "history.db")
        with pytest.raises(HistoryError, match=r"its folder .*ro is not writable"):
            History.open(folder / "new.db")
        assert sorted(p.name for p in folder.iterdir()) == ["history.db"]
    assert digest(folder / "history.db") == before


@pytest.mark.parametrize(("begin_sql", "wait_s"), [("BEGIN IMMEDIATE", None), ("BEGIN EXCLUSIVE", 0.5)])
def test_another_writer_holding_the_file_is_reported_after_a_short_wait(
        path: Path, begin_sql: str, wait_s: float | None) -> None:
    History.open(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute(begin_sql)
    other.execute("INSERT INTO runs (playbook, playbook_path, playbook_sha256, fleet, started, status, pid, host)"
                  " VALUES ('x', 'x', 'x', 'x', 0, 'complete', 1, 'h')")
    start = time.monotonic()
    with pytest.raises(HistoryError, match=r"history.db is locked by another writer .*try again when"):
        History.open(path) if wait_s is None else History.open(path, wait_s=wait_s)
    waited = time.monotonic() - start
    expected = db_module.LOCK_WAIT_S if wait_s is None else wait_s
    assert expected * 0.9 <= waited < expected + 1.5, waited
    other.execute("ROLLBACK")
    other.close()
    with History.open(path) as history:  # free again
        assert history.runs() == []


def test_a_write_mid_run_waits_out_a_short_holder(path: Path) -> None:
    """Opening gives up quickly (a run in progress); a write mid-run waits up to WRITE_WAIT_S, since a reader or
    another run's commit holds the file for moments."""
    with History.open(path, wait_s=0.2) as history:
        run_id = begin(history, 0)
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        releaser = threading.Timer(1.0, lambda: other.execute("ROLLBACK"))
        releaser.start()
        start = time.monotonic()
        history.record_device(run_id, device([item("pass")]))
        assert time.monotonic() - start >= 0.8
        releaser.join()
        other.close()
        assert len(history.device_results(run_id)) == 1


# prune


def test_prune_deletes_old_runs_with_all_their_rows_and_keeps_recent_ones(
        history: History, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db_module, "PRUNE_BATCH", 2)  # several batches: the loop must not stop early
    rich = device([ItemResult("smoke", "smoke", "add/case0", "pass", subject=ADD_V1.sha256,
                              metrics=(Metric("t", 1.0),))], subjects=(ADD_V1, MODEL))
    ids = []
    for night in range(10):
        ids.append(seed(history, night, rich))
        history.record_verdicts(ids[-1], judge(history, ids[-1], [rich]))
    live = begin(history, 1)  # this process's run: live, kept however old
    assert history.prune(4.5 * DAY, now=BASE + 9.5 * DAY) == 5  # nights 0-4 started before the cutoff
    assert {run.id for run in history.runs(limit=100)} == set(ids[5:]) | {live}
    for table, column in (("run_devices", "run_id"), ("results", "run_id"), ("subjects", "run_id"),
                          ("verdicts", "run_id")):
        assert count(path, table, f"{column} <= ?", ids[4]) == 0, table
        assert count(path, table, f"{column} >= ?", ids[5]) > 0, table
    assert count(path, "metrics") == 5
    # night 5 was judged against night 4, now pruned: the verdict stays, its baseline is unknown
    assert [(v.kind, v.baseline_run) for v in history.verdicts(ids[5])] == [("still_passing", None)]
    assert [(v.kind, v.baseline_run) for v in history.verdicts(ids[6])] == [("still_passing", ids[5])]
    assert history.prune(4.5 * DAY, now=BASE + 9.5 * DAY) == 0


def test_prune_deletes_an_old_run_whose_process_died(path: Path) -> None:
    History.open(path).close()
    killed = subprocess.run([sys.executable, "-c", KILLED, str(path), "begin"], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    run_id = int(killed.stdout)
    with History.open(path) as history:
        assert history.prune(1.0, now=time.time() + 10) == 1
        assert history.run(run_id) is None


# parse_age


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("45m", 2700), ("12h", 43200), ("90d", 90 * DAY),
                                               ("2w", 14 * DAY), ("1.5d", 1.5 * DAY), (" 7D ", 7 * DAY)])
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "30x", "-3d", "3 d", "1e3d", "0d", "0.0h", "30dd", "3d4h"])
def test_parse_age_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(InputError) as refused:
        parse_age(text)
    assert refused.value.field == "--older-than" and refused.value.exit_code == 2
    assert repr(text) in str(refused.value) and "like 30d" in str(refused.value)


@given(st.text(max_size=12))
def test_parse_age_raises_only_input_error(text: str) -> None:
    try:
        assert parse_age(text) > 0
    except InputError:
        pass


# verdicts


@pytest.mark.parametrize(("before", "now", "kind"), [
    ("pass", "fail", "new_failure"), ("fail", "pass", "fixed"), ("fail", "fail", "still_failing"),
    ("pass", "pass", "still_passing")])
def test_each_result_is_judged_against_its_comparable_run(history: History, before: Status, now: Status,
                                                          kind: VerdictKind) -> None:
    baseline = seed(history, 0, device([item(before)]))
    verdicts = judged(history, 1, device([item(now)], night=1))
    assert verdicts == [Verdict("pi-1", "smoke", "add/case0", kind, "", baseline)]


def test_a_first_result_has_no_baseline_and_no_note(history: History) -> None:
    seed(history, 0, device([item("pass", "other")]), device([item("pass")], name="pi-2"))  # other item, device
    assert judged(history, 1, device([item("fail")], night=1)) == [
        Verdict("pi-1", "smoke", "add/case0", "no_baseline", "", None)]


def test_the_most_recent_comparable_run_is_the_baseline(history: History) -> None:
    seed(history, 0, device([item("fail")]))
    latest = seed(history, 1, device([item("pass")]))
    seed(history, 3, device([item("fail")]))  # started after tonight: not earlier
    running = seed(history, 1.5, device([item("fail")]), status="running")  # not finished: not a baseline
    [verdict] = judged(history, 2, device([item("fail")], night=2))
    assert (verdict.kind, verdict.baseline_run) == ("new_failure", latest)
    assert running != latest


def test_error_miss_and_skip_are_passed_over_as_baselines(history: History) -> None:
    passed = seed(history, 0, device([item("pass")]))
    for night, status in enumerate(OTHERS, start=1):
        seed(history, night, device([item(status)]))
    [verdict] = judged(history, 4, device([item("fail")], night=4))
    assert (verdict.kind, verdict.baseline_run) == ("new_failure", passed)


def test_error_miss_and_skip_results_get_no_verdict(history: History) -> None:
    seed(history, 0, device([item("pass", "a"), item("pass", "b"), item("pass", "c")]))
    tonight = device([item("error", "a"), item("miss", "b"), item("skip", "c"), item("pass", "d")], night=1)
    assert [(v.item, v.kind) for v in judged(history, 1, tonight)] == [("d", "no_baseline")]


def test_an_incomplete_earlier_run_counts_as_comparable(history: History) -> None:
    interrupted = seed(history, 0, device([item("pass")]), status="incomplete")
    [verdict] = judged(history, 1, device([item("fail")], night=1))
    assert (verdict.kind, verdict.baseline_run) == ("new_failure", interrupted)


def test_a_result_marked_flaky_is_flaky_whatever_its_baseline(history: History) -> None:
    baseline = seed(history, 0, device([item("fail")]))
    [verdict] = judged(history, 1, device([item("pass", flaky=True)], night=1))
    assert (verdict.kind, verdict.baseline_run) == ("flaky", baseline)  # not "fixed"
    [first] = judged(history, 2, device([item("pass", "new", flaky=True)], night=2))
    assert (first.kind, first.baseline_run) == ("flaky", None)


def test_flips_within_the_window_make_a_result_flaky(history: History) -> None:
    for night, status in enumerate(FLIPPING):
        seed(history, night, device([item(status)]))
    tonight = device([item("pass")], night=4)
    run_id = begin(history, 4)
    # newest first: pass (tonight), fail, pass, fail, pass: 4 flips
    assert [v.kind for v in judge(history, run_id, [tonight])] == ["flaky"]
    assert [v.kind for v in judge(history, run_id, [tonight], flaky_flips=5)] == ["fixed"]
    # a window of 3 sees pass, fail, pass: 2 flips, under 3
    assert [v.kind for v in judge(history, run_id, [tonight], flaky_window=3)] == ["fixed"]
    assert [v.kind for v in judge(history, run_id, [tonight], flaky_window=3, flaky_flips=2)] == ["flaky"]
    assert [v.kind for v in judge(history, run_id, [tonight], flaky_window=1, flaky_flips=1)] == ["fixed"]


def test_flips_count_only_comparable_results(history: History) -> None:
    for night, status in enumerate(FLIPPING[:3]):  # on the old driver
        seed(history, night, device([item(status)]))
    seed(history, 3, device([item("fail")], fingerprint=POCL_B))
    [verdict] = judged(history, 4, device([item("pass")], fingerprint=POCL_B, night=4))
    assert verdict.kind == "fixed"  # fail -> pass is one flip on this driver


def test_flips_counts_changes_between_neighbours() -> None:
    assert flips([]) == flips(["pass"]) == flips(["pass", "pass"]) == 0
    assert flips(["pass", "fail", "pass", "pass", "fail"]) == 3


def test_a_driver_change_restarts_the_comparison_with_a_note(history: History) -> None:
    seed(history, 0, device([item("pass")]))
    changed = device([item("fail")], fingerprint=POCL_B, night=1)
    run_id = begin(history, 1)
    history.record_device(run_id, changed)
    history.finish_run(run_id, "complete", ended=BASE + DAY + 60)
    assert judge(history, run_id, [changed]) == [Verdict(
        "pi-1", "smoke", "add/case0", "no_baseline", "driver changed PoCL 3.1 pthread cpu -> PoCL 5.0 pthread cpu")]
    [next_night] = judged(history, 2, device([item("pass")], fingerprint=POCL_B, night=2))
    assert (next_night.kind, next_night.baseline_run, next_night.note) == ("fixed", run_id, "")
    [back] = judged(history, 3, device([item("fail")], night=3))  # the old driver again: its own past counts
    assert (back.kind, back.note) == ("new_failure", "")


@pytest.mark.parametrize(("subject", "subjects", "note"), [
    (ADD_V2, (ADD_V2,), "kernel changed"),
    (MODEL, (MODEL,), "model changed"),
    (Subject("command", "temp", "9" * 64), (), "kernel changed"),  # tonight's subject unrecorded: the old kind
])
def test_a_subject_change_restarts_the_comparison_with_a_note(history: History, subject: Subject,
                                                              subjects: tuple[Subject, ...], note: str) -> None:
    seed(history, 0, device([item("pass")]))
    [verdict] = judged(history, 1, device([item("pass", subject=subject.sha256)], subjects=subjects, night=1))
    assert (verdict.kind, verdict.note, verdict.baseline_run) == ("no_baseline", note, None)


def test_a_driver_and_kernel_change_are_both_noted_driver_first(history: History) -> None:
    seed(history, 0, device([item("pass")]))
    seed(history, 1, device([item("error")], fingerprint=POCL_B))  # an error is never what changed from
    [verdict] = judged(history, 2, device([item("pass", subject=ADD_V2.sha256)], fingerprint=POCL_B,
                                          subjects=(ADD_V2,), night=2))
    assert verdict.note == "driver changed PoCL 3.1 pthread cpu -> PoCL 5.0 pthread cpu; kernel changed"


def test_change_note_with_unknown_fingerprints() -> None:
    from deployer.history.db import PastResult

    before = PastResult(1, BASE, "pass", False, None, None, ADD_V1.sha256, "kernel")
    assert change_note(before, device([item("pass")]), item("pass")) == \
        "driver changed unknown -> PoCL 3.1 pthread cpu"
    assert change_note(before, device([item("pass")], fingerprint=None), item("pass")) == ""


def test_devices_are_judged_each_against_its_own_past(history: History) -> None:
    seed(history, 0, device([item("pass")], name="pi-1"), device([item("fail")], name="pi-2"))
    verdicts = judged(history, 1, device([item("fail")], name="pi-1", night=1),
                      device([item("fail")], name="pi-2", night=1))
    assert [(v.device, v.kind) for v in verdicts] == [("pi-1", "new_failure"), ("pi-2", "still_failing")]


def test_verdicts_round_trip_and_once_per_result(history: History) -> None:
    seed(history, 0, device([item("pass")]))
    tonight = device([item("fail"), item("pass", "new")], night=1)
    run_id = begin(history, 1)
    verdicts = judge(history, run_id, [tonight])
    history.record_verdicts(run_id, verdicts)
    assert history.verdicts(run_id) == verdicts and len(verdicts) == 2
    with pytest.raises(HistoryError, match="cannot record the verdicts of run .*UNIQUE"):
        history.record_verdicts(run_id, verdicts[:1])
    assert history.verdicts(run_id) == verdicts


def test_judging_a_run_not_in_the_history_is_refused(history: History) -> None:
    with pytest.raises(HistoryError, match="has no run 41: begin_run it before judging"):
        judge(history, 41, [device([item("pass")])])
    with pytest.raises(ValueError, match="at least 1"):
        judge(history, begin(history, 0), [], flaky_window=0)


def test_summarize_counts_per_device() -> None:
    verdicts = [Verdict("pi-1", "s", "a", "new_failure"), Verdict("pi-1", "s", "b", "new_failure"),
                Verdict("pi-1", "s", "c", "flaky"), Verdict("pi-2", "s", "a", "fixed"),
                Verdict("pi-2", "s", "b", "still_failing"), Verdict("pi-2", "s", "c", "still_passing")]
    assert summarize(verdicts, devices=["pi-3"]) == {
        "pi-3": VerdictCounts(),
        "pi-1": VerdictCounts(new_failure=2, flaky=1),
        "pi-2": VerdictCounts(fixed=1, still_failing=1, still_passing=1),
    }


def test_files_that_hold_a_labs_details_are_their_owners_only(tmp_path: Path, fleet: Fleet) -> None:
    """history.db names boards, drivers and commands; a cache holds binaries and build logs; a key is a key:
    none is readable by other users of the controller (SQLite alone made the history 0644)."""
    from deployer.cache.store import cache_lock

    History.open(tmp_path / "history.db").close()
    with cache_lock(tmp_path / "cache"):
        pass
    for path in (tmp_path / "history.db", tmp_path / "cache", fleet.folder / "client_key"):
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
