"""The tables of `history.db` and the migrations that build them (read by `deployer.history.db`).

The schema's version is SQLite's `PRAGMA user_version`. `MIGRATIONS[i]` is the SQL script that takes a
database from version i to version i + 1; a new database runs them all, an older one the ones it lacks, in
one transaction either way. A script, once released, never changes: a change of schema is a new script
appended here. `PRAGMA application_id` marks the file as ours, so another program's SQLite file is refused.

Version 1: the runs and what each device did in them.
- `runs`: one row per `deploy run`: its playbook (name, path, sha256), `fleet` (the inventory path),
  `devices` (JSON: the devices it set out to run, in order), `started`/`ended` (epoch seconds; ended NULL
  while running), `status` ('running' | 'complete' | 'incomplete'), the `pid` and `host` of the controller
  that ran it, `settings` (JSON: the flaky window...).
- `run_devices`: one row per device of a run: its state ('ok' | 'offline' | 'incomplete'), its OpenCL
  fingerprint (`fingerprint_id`, `fingerprint_label`; NULL when unknown), started, ended, reason.
- `results`: one row per device x step x item: kind, status, reason, flaky (0/1), attempts, `subject`
  (sha256 of what ran, "" when nothing identifies it), duration_s. (run, device, step, item) is unique.
- `subjects`: what ran on a device in a run (kind, name, sha256); a result's `subject` names one by sha256.

Version 2: what the first nightly reports needed.
- `metrics`: numbers a result measured (name, value, unit), by `result_id`.
- `verdicts`: each pass/fail result judged against the device's past (kind, note) and the run it was
  judged against (`baseline_run`; set to NULL if that run is pruned later).

Version 3: latency (docs/regressions.md).
- `samples`: every repeat of a bench measurement (name, unit, `vals`: a JSON array), by `result_id`.
- `latency`: each latency series judged tonight (device, step, item, metric): kind, the night a step
  began (`since_run`), the change, its p-value, the levels before and now, a note.
- `accepted`: `deploy history accept`: a series' segment starts again at `since` (epoch seconds), so an
  intended change stops being reported.

Every child row names its run with `ON DELETE CASCADE`: deleting a run (prune) deletes all of its rows.
"""

from __future__ import annotations

APPLICATION_ID = 0x44504C59  # "DPLY" in the SQLite header: this file is a deployer history

V1 = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    playbook TEXT NOT NULL,
    playbook_path TEXT NOT NULL,
    playbook_sha256 TEXT NOT NULL,
    fleet TEXT NOT NULL,
    devices TEXT NOT NULL DEFAULT '[]',
    started REAL NOT NULL,
    ended REAL,
    status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'incomplete')),
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX runs_started ON runs (started);
CREATE INDEX runs_status ON runs (status);

CREATE TABLE run_devices (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    device TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('ok', 'offline', 'incomplete')),
    fingerprint_id TEXT,
    fingerprint_label TEXT,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, device)
);

CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    step TEXT NOT NULL,
    kind TEXT NOT NULL,
    item TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('fail', 'error', 'miss', 'pass', 'skip')),
    reason TEXT NOT NULL DEFAULT '',
    flaky INTEGER NOT NULL DEFAULT 0 CHECK (flaky IN (0, 1)),
    attempts INTEGER NOT NULL DEFAULT 1,
    subject TEXT NOT NULL DEFAULT '',
    duration_s REAL,
    UNIQUE (run_id, device, step, item),
    FOREIGN KEY (run_id, device) REFERENCES run_devices (run_id, device) ON DELETE CASCADE
);
-- A device's past for one (step, item): the verdicts' one query per result.
CREATE INDEX results_history ON results (device, step, item, run_id);

CREATE TABLE subjects (
    run_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    FOREIGN KEY (run_id, device) REFERENCES run_devices (run_id, device) ON DELETE CASCADE
);
CREATE INDEX subjects_device ON subjects (run_id, device, sha256);
"""

V2 = """
CREATE TABLE metrics (
    result_id INTEGER NOT NULL REFERENCES results (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT NOT NULL DEFAULT ''
);
CREATE INDEX metrics_result ON metrics (result_id);

CREATE TABLE verdicts (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    device TEXT NOT NULL,
    step TEXT NOT NULL,
    item TEXT NOT NULL,
    kind TEXT NOT NULL
        CHECK (kind IN ('new_failure', 'fixed', 'still_failing', 'still_passing', 'flaky', 'no_baseline')),
    note TEXT NOT NULL DEFAULT '',
    baseline_run INTEGER REFERENCES runs (id) ON DELETE SET NULL,
    PRIMARY KEY (run_id, device, step, item)
);
-- ON DELETE SET NULL looks verdicts up by the pruned run: without this index each pruned run scans them all.
CREATE INDEX verdicts_baseline ON verdicts (baseline_run);
"""

V3 = """
CREATE TABLE samples (
    result_id INTEGER NOT NULL REFERENCES results (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    unit TEXT NOT NULL DEFAULT '',
    vals TEXT NOT NULL
);
CREATE INDEX samples_result ON samples (result_id);

CREATE TABLE latency (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    device TEXT NOT NULL,
    step TEXT NOT NULL,
    item TEXT NOT NULL,
    metric TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('regression', 'improvement', 'no_change', 'no_baseline')),
    since_run INTEGER REFERENCES runs (id) ON DELETE SET NULL,
    change REAL,
    p_value REAL,
    baseline REAL,
    current REAL,
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, device, step, item, metric)
);
CREATE INDEX latency_since ON latency (since_run);

CREATE TABLE accepted (
    device TEXT NOT NULL,
    step TEXT NOT NULL,
    item TEXT NOT NULL,
    metric TEXT NOT NULL,
    since REAL NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (device, step, item, metric)
);
"""

MIGRATIONS: tuple[str, ...] = (V1, V2, V3)
VERSION = len(MIGRATIONS)


def upgrade_script(current: int, target: int = VERSION) -> str:
    """One script taking a database from `current` to `target`: the missing migrations and the new version.
    The caller runs it inside its own transaction, so a failure anywhere leaves the file as it was. (A
    `target` below VERSION is for the tests, which build the databases older deployers left.)"""
    parts = list(MIGRATIONS[current:target])
    if current == 0:
        parts.append(f"PRAGMA application_id = {APPLICATION_ID};")
    parts.append(f"PRAGMA user_version = {target};")
    return "\n".join(parts)
