"""One nightly run split over a CI system's parallel jobs (docs/nightly.md, "Past one controller").

Each job runs `deploy run --shard K/N --run-id ID` on a copy of the cumulative history: a stable share of
the devices (a device is in shard `sha256(name) mod N + 1`, so it always lands in the same shard and adding
a device moves no other), judged against the whole past in that copy. `deploy history merge` then appends
every shard's run into the cumulative history, as one run per ID, idempotently.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from deployer.errors import HistoryError, InputError
from deployer.history.db import (
    RUN_COLUMNS,
    History,
    RunInfo,
    insert_device,
    insert_latency,
    insert_verdicts,
    run_info,
)
from deployer.history.records import DeviceResult, LatencyResult, Verdict

SHARD_RE = re.compile(r"([0-9]{1,4})/([0-9]{1,4})")
RUN_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` with 1 <= K <= N: the Kth of N shards."""
    match = SHARD_RE.fullmatch(text.strip())
    if match is None:
        raise InputError(None, "--shard", f"expected K/N such as 2/4 (got {text!r})")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise InputError(None, "--shard", f"{text!r}: K must be between 1 and N (shards count from 1)")
    return index, count


def parse_run_key(text: str) -> str:
    if not RUN_KEY_RE.fullmatch(text):
        raise InputError(None, "--run-id", f"expected letters, digits, . _ : - (at most 128), such as a CI "
                                           f"pipeline id (got {text!r})")
    return text


def shard_of(name: str, count: int) -> int:
    """The shard (1..count) a device belongs to: by a hash of its name alone."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % count + 1


def merge_history(target: History, shard_path: Path) -> list[tuple[str, int, list[str]]]:
    """Every sharded run of `shard_path` appended to `target`: (run id given, run here, devices added)."""
    merged = []
    with History.open(shard_path, create=False) as shard:
        for run in reversed(shard.runs(limit=1_000_000)):  # oldest first
            key = run.settings.get("run_key")
            if not isinstance(key, str):
                continue  # a run of the restored history itself, or an unsharded one: the target has it
            here, added = merge_run(target, run, shard.device_results(run.id), shard.verdicts(run.id),
                                    shard.latency(run.id), key)
            merged.append((key, here, added))
    return merged


def merge_run(history: History, run: RunInfo, devices: Sequence[DeviceResult], verdicts: Sequence[Verdict],
              latency: Sequence[LatencyResult], key: str) -> tuple[int, list[str]]:
    """Append one shard's run (`key`: the run id every shard of it was given) in one transaction: the
    run is made on its first shard and joined by the others; a device already there is left as it is,
    so merging twice changes nothing. Returns (the run's id here, the devices added). A shard of another
    playbook or fleet is refused (HistoryError) with nothing written."""
    with history.writing(f"merge run {key}") as db:
        row = db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE json_extract(settings, '$.run_key') = ?",
                         (key,)).fetchone()
        if row is None:
            target = _insert_run(db, run, key)
        else:
            target = _join_run(db, run_info(row), run, history.path, key)
        known = {r[0] for r in db.execute("SELECT device FROM run_devices WHERE run_id = ?", (target,))}
        added = [d for d in devices if d.device not in known]
        names = {d.device for d in added}
        for device in added:
            insert_device(db, target, device)
        here = {run.id: target}  # a shard's own run id, where its verdicts name it, is this run here
        insert_verdicts(db, target, [replace(v, baseline_run=here.get(v.baseline_run or -1, v.baseline_run))
                                     for v in verdicts if v.device in names])
        insert_latency(db, target, [replace(t, since_run=here.get(t.since_run or -1, t.since_run))
                                    for t in latency if t.device in names])
        return target, sorted(names)


def _insert_run(db: sqlite3.Connection, run: RunInfo, key: str) -> int:
    settings = {k: v for k, v in run.settings.items() if k != "shard"}
    cursor = db.execute(
        "INSERT INTO runs (playbook, playbook_path, playbook_sha256, fleet, devices, started, ended, status, pid,"
        " host, settings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run.playbook, run.playbook_path, run.playbook_sha256, run.fleet, json.dumps(list(run.devices)),
         run.started, run.ended, "incomplete" if run.status != "complete" else "complete", run.pid, run.host,
         json.dumps(dict(settings, run_key=key), sort_keys=True)))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _join_run(db: sqlite3.Connection, here: RunInfo, shard: RunInfo, path: Path, key: str) -> int:
    """A later shard of a run already merged: the same playbook and fleet, or nothing is written."""
    for what, mine, theirs in (("playbook", here.playbook_sha256, shard.playbook_sha256),
                               ("fleet", here.fleet, shard.fleet)):
        if mine != theirs:
            raise HistoryError(f"{path}: run {key} is of another {what} ({theirs!r} in the shard, {mine!r} here): "
                               "refusing to merge shards of different runs")
    devices = list(dict.fromkeys([*here.devices, *shard.devices]))
    status = "complete" if here.status == shard.status == "complete" else "incomplete"
    ended = max((e for e in (here.ended, shard.ended) if e is not None), default=None)
    db.execute("UPDATE runs SET devices = ?, started = ?, ended = ?, status = ? WHERE id = ?",
               (json.dumps(devices), min(here.started, shard.started), ended, status, here.id))
    return here.id
