"""`deploy run`: a playbook on a simulated fleet of real sshd boards, its history (a real SQLite file) and its
verdicts. One fleet of this module's own (runs push, so they write), changed between nights through
`deploy sim set` as a user would; earlier nights are seeded through the history code, not run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployer.errors import HistoryError
from deployer.history.db import History
from deployer.history.records import DeviceResult, Fingerprint, ItemResult, Status
from deployer.sim.fleet import Fleet, fleet_specs, start_fleet
from tests.conftest import REPO, Cli

KERNELS = REPO / "kernels"
SMALL_KERNELS = ("saxpy",)  # programs a run's push keeps to, so a night costs a few seconds


@pytest.fixture(scope="module")
def run_fleet(tmp_path_factory: pytest.TempPathFactory, pocl_cache: Path) -> Iterator[Fleet]:
    fleet = start_fleet(tmp_path_factory.mktemp("run-fleet"), fleet_specs(3), pocl_cache=pocl_cache)
    yield fleet
    fleet.stop()


@pytest.fixture(autouse=True)
def own_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's fleet locks in a folder of its own (they live under XDG_STATE_HOME)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def small_kernels(folder: Path, bench_n: int | None = None) -> Path:
    """The saxpy program alone, with its reference: a library whose nights are quick; `bench_n`: its bench
    size."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("saxpy.cl", "reference.py", "common.h"):
        (folder / name).write_bytes((KERNELS / name).read_bytes())
    manifest = (KERNELS / "kernels.yml").read_text()
    (folder / "kernels.yml").write_text(_only_saxpy(manifest, bench_n))
    return folder


def _only_saxpy(manifest: str, bench_n: int | None) -> str:
    import yaml

    data = yaml.safe_load(manifest)
    data["programs"] = {name: p for name, p in data["programs"].items() if name in SMALL_KERNELS}
    if bench_n is not None:
        data["programs"]["saxpy"]["kernels"][0]["bench_sizes"] = {"n": bench_n}
    return yaml.safe_dump(data, sort_keys=False)


def write_playbook(folder: Path, body: str, name: str = "night.yml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


NIGHT = """\
name: night
steps:
  - health:
      min_free_mb: 1
      limits:
        - name: temperature
          command: cat /sys/class/thermal/thermal_zone0/temp
          scale: 0.001
          unit: C
          max: 85
  - push:
      kernels: kernels
      smoke: always
  - smoke:
      kernels: kernels
  - name: load
    shell:
      command: cat /proc/loadavg
      metrics:
        regex: '^(?P<load1>[0-9.]+)'
    timeout: 20
"""


def run(cli: Cli, playbook: Path, fleet: Fleet, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    result = cli("run", playbook, "--fleet", fleet.inventory, "--history", tmp_path / "history.db",
                 "--cache", tmp_path / "cache", "--json", "--quiet", *extra)
    report = json.loads(result.out) if result.out.strip().startswith("{") else {}
    return result.code, report, result.err


def device(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in report["devices"] if d["name"] == name)


def results(entry: dict[str, Any], **match: str) -> list[dict[str, Any]]:
    return [r for r in entry["results"] if all(r[k] == v for k, v in match.items())]


def sim(cli: Cli, fleet: Fleet, name: str, *flags: str) -> None:
    result = cli("sim", "set", name, "--dir", fleet.folder, *flags)
    assert result.code == 0, result.err


def test_a_night_on_the_fleet_grades_each_board_and_keeps_it(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    """Healthy, hot and down boards in one night: the hot and the down one are offline (never failures),
    their other steps `miss`; the healthy one passes every item; all of it is in the history."""
    small_kernels(tmp_path / "kernels")
    playbook = write_playbook(tmp_path, NIGHT)
    sim(cli, run_fleet, "sim-02", "--temp-c", "95")
    sim(cli, run_fleet, "sim-03", "--down")
    try:
        code, report, err = run(cli, playbook, run_fleet, tmp_path)
    finally:
        sim(cli, run_fleet, "sim-02", "--temp-c", "45")
        sim(cli, run_fleet, "sim-03", "--up")
    assert code == 0, err
    healthy, hot, down = (device(report, n) for n in ("sim-01", "sim-02", "sim-03"))
    assert healthy["state"] == "ok" and healthy["status"] == "pass", healthy
    assert {r["status"] for r in healthy["results"]} == {"pass"}
    cases = results(healthy, step="smoke", kind="smoke")
    assert any(r["item"].startswith("case saxpy") for r in cases)
    temperature = results(healthy, step="health", item="temperature")[0]
    assert temperature["metrics"] == [{"name": "temperature", "value": 45.0, "unit": "C"}]
    assert results(healthy, step="load")[0]["metrics"][0]["name"] == "load1"
    assert hot["state"] == "offline" and "temperature 95 C > max 85" in hot["reason"]
    assert {r["status"] for r in hot["results"] if r["step"] != "health"} == {"miss"}
    assert down["state"] == "offline" and results(down, step="health")[0]["status"] == "error"
    assert report["summary"]["results"]["fail"] == 0
    with sqlite3.connect(tmp_path / "history.db") as db:
        assert db.execute("select status from runs").fetchall() == [("complete",)]
        stored = db.execute("select device, state from run_devices order by device").fetchall()
    assert stored == [("sim-01", "ok"), ("sim-02", "offline"), ("sim-03", "offline")]


def test_dry_run_prints_each_device_steps_and_touches_nothing(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    small_kernels(tmp_path / "kernels")
    playbook = write_playbook(tmp_path, NIGHT)
    result = cli("run", playbook, "--fleet", run_fleet.inventory, "--history", tmp_path / "history.db",
                 "--dry-run", "--limit", "sim-01")
    assert result.code == 0, result.err
    assert "sim-01" in result.out and "sim-02" not in result.out
    assert "4. load" in result.out
    assert not (tmp_path / "history.db").exists()


def test_a_bad_playbook_is_refused_with_its_line(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    playbook = write_playbook(tmp_path, "name: bad\nsteps:\n  - helth: {}\n")
    result = cli("run", playbook, "--fleet", run_fleet.inventory, "--history", tmp_path / "history.db")
    assert result.code == 2
    assert f"{playbook}:3" in result.err and "health" in result.err
    assert not (tmp_path / "history.db").exists()


def seed_night(db: History, *, fingerprint: Fingerprint, items: list[ItemResult], started: float,
               device_name: str = "sim-01") -> int:
    run_id = db.begin_run("night", "night.yml", "0" * 64, "fleet", [device_name], {}, started=started)
    db.record_device(run_id, DeviceResult(device_name, "ok", started, started + 1, fingerprint, tuple(items)))
    db.finish_run(run_id, "complete", ended=started + 2)
    return run_id


def test_new_failure_flaky_and_driver_change_verdicts(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    """A shell check that passed last night fails now (confirmed by its re-run): a new failure, exit 1.
    One that fails once and passes on its re-run: pass, flaky. Then the board's driver changes: the
    comparison restarts and says so."""
    playbook = write_playbook(tmp_path, """\
        name: night
        limit: sim-01
        steps:
          - health: {}
          - name: check
            shell:
              command: test -e /nonexistent-file
            continue_on_error: true
          - name: wobbly
            shell:
              command: if [ -e ~/.wobbly ]; then rm ~/.wobbly; else touch ~/.wobbly; exit 1; fi
        """)
    first_code, first, err = run(cli, playbook, run_fleet, tmp_path)  # no baseline yet: not a new failure
    assert first_code == 0, err
    check = results(device(first, "sim-01"), step="check")[0]
    assert check["status"] == "fail" and check["attempts"] == 2 and check["verdict"]["kind"] == "no_baseline"
    wobbly = results(device(first, "sim-01"), step="wobbly")[0]
    assert wobbly["status"] == "pass" and wobbly["flaky"] and wobbly["verdict"]["kind"] == "flaky"
    fingerprint = device(first, "sim-01")["fingerprint"]
    with History.open(tmp_path / "history.db") as db:  # the night before last: the check passed
        seed_night(db, fingerprint=Fingerprint(fingerprint["id"], fingerprint["label"]), started=time.time() - 86400,
                   items=[ItemResult("check", "shell", "", "pass", subject=check["subject"])])
    # the seeded night is older than the first run: the first run is still the last comparable one
    code, second, err = run(cli, playbook, run_fleet, tmp_path)
    assert code == 0, err
    assert results(device(second, "sim-01"), step="check")[0]["verdict"]["kind"] == "still_failing"
    with History.open(tmp_path / "history.db") as db:  # make last night (after the second run) a pass
        seed_night(db, fingerprint=Fingerprint(fingerprint["id"], fingerprint["label"]), started=time.time(),
                   items=[ItemResult("check", "shell", "", "pass", subject=check["subject"])])
    time.sleep(0.01)
    # fail now after pass, fail, fail, pass: a new failure (3 flips would call it flaky: --flaky-flips 5)
    code, third, err = run(cli, playbook, run_fleet, tmp_path, "--flaky-flips", "5")
    assert code == 1, err  # --fail-on new-failure
    assert results(device(third, "sim-01"), step="check")[0]["verdict"]["kind"] == "new_failure"
    code, flaky, err = run(cli, playbook, run_fleet, tmp_path)  # fail, fail, pass, fail, fail, pass: flaky
    assert code == 0, err
    assert results(device(flaky, "sim-01"), step="check")[0]["verdict"]["kind"] == "flaky"
    sim(cli, run_fleet, "sim-01", "--driver", "basic")
    try:
        code, fourth, err = run(cli, playbook, run_fleet, tmp_path)
    finally:
        sim(cli, run_fleet, "sim-01", "--driver", "pthread")
    verdict = results(device(fourth, "sim-01"), step="check")[0]["verdict"]
    assert device(fourth, "sim-01")["fingerprint"]["id"] != fingerprint["id"]
    assert verdict["kind"] == "no_baseline" and verdict["note"].startswith("driver changed"), verdict
    assert code == 0


def test_a_hung_command_costs_its_timeout_and_the_rest_go_on(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    playbook = write_playbook(tmp_path, """\
        name: hang
        limit: sim-01,sim-02
        steps:
          - name: hang
            shell:
              command: sleep 600
            timeout: 2
            retries: 0
            continue_on_error: true
          - name: after
            shell:
              command: echo fine
        """)
    start = time.monotonic()
    code, report, err = run(cli, playbook, run_fleet, tmp_path)
    assert time.monotonic() - start < 60
    assert code == 0, err
    for name in ("sim-01", "sim-02"):
        hang = results(device(report, name), step="hang")[0]
        assert hang["status"] == "error" and "timed out after 2 s" in hang["reason"]
        assert results(device(report, name), step="after")[0]["status"] == "pass"


def test_a_board_lost_mid_step_is_retried_on_a_new_connection(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    """The command kills the agent serving the session (the board's side of the link ends): an `error`,
    run again on a fresh connection when the step allows, never a failure."""
    kill_once = "if [ -e ~/.lost ]; then rm ~/.lost; else touch ~/.lost; kill -9 $PPID; fi"
    playbook = write_playbook(tmp_path, f"""\
        name: lost
        limit: sim-01
        steps:
          - name: lost
            shell:
              command: '{kill_once}'
            retries: 1
          - name: lost-again
            shell:
              command: '{kill_once}'
            retries: 0
          - name: after
            shell:
              command: echo fine
        """)
    code, report, err = run(cli, playbook, run_fleet, tmp_path)
    assert code == 0, err
    entry = device(report, "sim-01")
    lost = results(entry, step="lost")[0]
    assert lost["status"] == "pass" and lost["attempts"] == 2
    again = results(entry, step="lost-again")[0]
    assert again["status"] == "error"
    assert results(entry, step="after")[0]["status"] == "miss"  # the error stopped the device's later steps
    run_fleet_home = Path(run_fleet.device("sim-01").folder) / "home"
    (run_fleet_home / ".lost").unlink(missing_ok=True)


@pytest.mark.parametrize("damage", ["corrupt", "newer", "locked", "read_only"])
def test_an_unusable_history_stops_the_run_before_any_board(cli: Cli, make_fleet: Any, tmp_path: Path,
                                                           damage: str) -> None:
    fleet = make_fleet(fleet_specs(1))
    home = Path(fleet.devices[0].folder) / "home"
    db_path = tmp_path / "history.db"
    with History.open(db_path):
        pass
    holder = None
    if damage == "corrupt":
        db_path.write_bytes(b"not a database at all" * 100)
    elif damage == "newer":
        with sqlite3.connect(db_path) as db:
            db.execute("pragma user_version = 99")
    elif damage == "locked":
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("begin immediate")
    elif damage == "read_only":
        os.chmod(db_path, 0o444)
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(db_path)], check=True)
    before = db_path.read_bytes()
    playbook = write_playbook(tmp_path, "name: n\nsteps:\n  - health: {}\n")
    try:
        result = cli("run", playbook, "--fleet", fleet.inventory, "--history", db_path, "--cache", tmp_path / "c")
    finally:
        if holder is not None:
            holder.close()
        if damage == "read_only" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(db_path)], check=True)
    assert result.code == 3, (result.out, result.err)
    assert str(db_path) in result.err
    assert db_path.read_bytes() == before
    assert not (home / ".deployer").exists()  # no board was touched


def test_two_runs_on_one_fleet_never_overlap(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    from deployer.tasks.run import fleet_lock

    playbook = write_playbook(tmp_path, "name: n\nlimit: sim-01\nsteps:\n  - health: {}\n")
    with fleet_lock(run_fleet.inventory):
        code, _, err = run(cli, playbook, run_fleet, tmp_path)
        assert code == 3 and f"fleet {run_fleet.inventory} is in use by another deploy run" in err
        start = time.monotonic()
        code, _, err = run(cli, playbook, run_fleet, tmp_path, "--wait", "1")
        assert code == 3 and "still held after waiting 1 s" in err
        assert time.monotonic() - start >= 1
    assert run(cli, playbook, run_fleet, tmp_path)[0] == 0


HANG_NIGHT = """\
name: slow
limit: sim-01,sim-02
steps:
  - name: first
    shell:
      command: echo quick
  - name: slow
    shell:
      command: sleep 60
    timeout: 120
"""


def start_run(playbook: Path, fleet: Fleet, tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "deployer", "run", str(playbook), "--fleet", str(fleet.inventory), "--history",
         str(tmp_path / "history.db"), "--cache", str(tmp_path / "cache"), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})


def wait_for_sleep(fleet: Fleet, count: int) -> None:
    """Until `count` boards run the slow step's `sleep 60` (bounded)."""
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        found = subprocess.run(["pgrep", "-f", "-c", "^sleep 60$"], capture_output=True, text=True).stdout.strip()
        if found and int(found) >= count:
            return
        time.sleep(0.1)
    raise AssertionError("the slow step never started")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_a_run_killed_midway_keeps_a_consistent_history(run_fleet: Fleet, tmp_path: Path, how: int) -> None:
    playbook = write_playbook(tmp_path, HANG_NIGHT)
    proc = start_run(playbook, run_fleet, tmp_path)
    try:
        wait_for_sleep(run_fleet, 2)
        proc.send_signal(how)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if how == signal.SIGINT else -signal.SIGKILL), err
    with sqlite3.connect(tmp_path / "history.db") as db:
        status = db.execute("select status from runs").fetchall()
        rows = db.execute("select count(*) from run_devices").fetchone()[0]
        orphans = db.execute("select count(*) from results where device not in "
                             "(select device from run_devices)").fetchone()[0]
    assert orphans == 0
    if how == signal.SIGINT:
        assert status == [("incomplete",)] and rows == 2  # each device kept whole, marked where it stopped
    else:
        assert status == [("running",)] and rows == 0  # killed mid-device: nothing of a device half-written
    next_run = subprocess.run(  # the next run is fine, and finds the killed one for what it was
        [sys.executable, "-m", "deployer", "run", str(write_playbook(tmp_path, "name: n\nlimit: sim-01\nsteps:\n"
                                                                     "  - health: {}\n", "quick.yml")),
         "--fleet", str(run_fleet.inventory), "--history", str(tmp_path / "history.db"), "--cache",
         str(tmp_path / "cache"), "--quiet"],
        capture_output=True, text=True, env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}, timeout=120)
    assert next_run.returncode == 0, next_run.stderr
    with sqlite3.connect(tmp_path / "history.db") as db:
        assert [s for (s,) in db.execute("select status from runs order by id")] == ["incomplete", "complete"]
    assert subprocess.run(["pgrep", "-f", "^sleep 60$"], capture_output=True).returncode == 1  # none left


def test_a_board_locked_by_another_push_is_a_miss_not_a_failure(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    """Another controller holds the board's lock (RD/.lock) through the whole night: the push is `miss`."""
    import fcntl

    small_kernels(tmp_path / "kernels")
    playbook = write_playbook(tmp_path, """\
        name: locked
        limit: sim-01
        steps:
          - push:
              kernels: kernels
            retries: 0
        """)
    assert run(cli, playbook, run_fleet, tmp_path)[0] == 0  # a first push: the board has a release
    (kernels := tmp_path / "kernels" / "saxpy.cl").write_text(kernels.read_text() + "\n// changed\n")
    lock = Path(run_fleet.device("sim-01").folder) / "home" / ".deployer" / ".lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, report, err = run(cli, playbook, run_fleet, tmp_path)
    assert code == 0, err
    push = results(device(report, "sim-01"), step="push")[0]
    assert push["status"] == "miss" and "lock" in push["reason"], push
    assert push["verdict"] is None


def test_history_list_and_prune(cli: Cli, tmp_path: Path) -> None:
    db_path = tmp_path / "history.db"
    now = time.time()
    with History.open(db_path) as db:
        for age_days in (40, 20, 1):
            seed_night(db, fingerprint=Fingerprint("0123456789abcdef", "gpu driver 1"), started=now - age_days * 86400,
                       items=[ItemResult("smoke", "smoke", "case a", "pass")])
    listed = cli("history", "list", "--history", db_path, "--json")
    assert listed.code == 0 and [r["status"] for r in listed.json()["runs"]] == ["complete"] * 3
    pruned = cli("history", "prune", "--older-than", "30d", "--history", db_path)
    assert pruned.code == 0 and "1 run(s)" in pruned.out
    assert len(cli("history", "list", "--history", db_path, "--json").json()["runs"]) == 2
    bad = cli("history", "prune", "--older-than", "soon", "--history", db_path)
    assert bad.code == 2 and "--older-than" in bad.err
    missing = cli("history", "list", "--history", tmp_path / "none.db")
    assert missing.code == 3 and "none.db" in missing.err


@pytest.mark.parametrize(("regex", "as_json", "out", "expected", "why"), [
    (r"temp=(?P<temp>[0-9.]+)", False, "temp=47.5\n", [("temp", 47.5, "C")], ""),
    (r"temp=(?P<temp>\S+)", False, "temp=hot\n", [], "metric temp: 'hot' is not a number"),
    (r"temp=(?P<temp>[0-9.]+)", False, "nothing\n", [], "the metrics regex matched nothing in the output"),
    (None, True, '{"clock_mhz": 600, "name": "x", "ok": true}', [("clock_mhz", 600.0, "")], ""),
    (None, True, "[1, 2]", [], "JSON output is not an object"),
])
def test_shell_metrics(regex: str | None, as_json: bool, out: str, expected: list[tuple[str, float, str]],
                       why: str) -> None:
    from deployer.tasks.grading import shell_metrics

    metrics, reason = shell_metrics(regex, as_json, {"temp": "C"}, out)
    assert [(m.name, m.value, m.unit) for m in metrics] == expected
    assert reason == why


BENCH_NIGHT = """\
name: bench
steps:
  - push:
      kernels: kernels
      smoke: never
  - bench:
      kernels: kernels
      warmup: 2
      min_repeats: 15
      min_time_ms: 100
      pause_ms: 50
      min_change: {min_change}
"""


def bench_item(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in device(report, name)["results"] if r["item"].startswith("bench saxpy"))


def seed_bench_nights(db_path: Path, report: dict[str, Any], starts: list[float], rng_seed: int) -> None:
    """Nights like the reported one on each device: its own repeats, each night scaled by a log-normal 5%
    (night-to-night) and each repeat by 3% (within the night), on its own fingerprint and subject: a past
    of this machine as it is now, so the test does not depend on how fast these cores are."""
    import random

    from deployer.history.records import Sample

    rng = random.Random(rng_seed)
    with History.open(db_path) as db:
        tonight = {d.device: d for d in db.device_results(report["run"]["id"])}
        for started in starts:
            run_id = db.begin_run("bench", "bench.yml", "0" * 64, "fleet", list(tonight), {}, started=started)
            for name, result in tonight.items():
                level = rng.lognormvariate(0, 0.05)
                items = tuple(ItemResult(i.step, i.kind, i.item, i.status, subject=i.subject, samples=tuple(
                    Sample(s.name, s.unit, tuple(v * level * rng.lognormvariate(0, 0.03) for v in s.values))
                    for s in i.samples)) for i in result.items)
                db.record_device(run_id, DeviceResult(name, "ok", started, started + 1, result.fingerprint, items))
            db.finish_run(run_id, "complete", ended=started + 2)


@pytest.mark.slow
def test_a_slow_board_is_flagged_and_no_other(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    """Three real nights of a one-kernel bench among seeded ones: a board given a tenth of a CPU from the
    second night on is a latency regression naming that night; the others are not, and a board whose
    driver changed on the third night starts a new segment instead. The kernel runs longer than the quota's
    10 ms period, so every repeat of it is throttled alike."""
    small_kernels(tmp_path / "kernels", bench_n=1 << 23)
    playbook = write_playbook(tmp_path, BENCH_NIGHT.format(min_change=0.5))
    db_path = tmp_path / "history.db"
    code, first, err = run(cli, playbook, run_fleet, tmp_path)
    assert code == 0, err
    assert bench_item(first, "sim-01")["latency"]["kind"] == "no_baseline"  # too few nights: no alert
    assert {m["name"] for m in bench_item(first, "sim-01")["metrics"]} >= {"device_ms.median", "device_ms.p90"}
    seed_bench_nights(db_path, first, [first["run"]["started"] - (13 - n) * 86400 for n in range(12)], 11)
    sim(cli, run_fleet, "sim-02", "--cpu", "0.1")
    try:
        code, second, err = run(cli, playbook, run_fleet, tmp_path)
        assert bench_item(second, "sim-02")["latency"]["kind"] == "no_change"  # one slow night is not a step yet
        seed_bench_nights(db_path, second, [second["run"]["ended"] + 0.01], 12)  # a second slow night, just after
        sim(cli, run_fleet, "sim-03", "--driver", "basic")
        code, third, err = run(cli, playbook, run_fleet, tmp_path)
    finally:
        sim(cli, run_fleet, "sim-02", "--cpu", "0")
        sim(cli, run_fleet, "sim-03", "--driver", "pthread")
    slow, steady, changed = (bench_item(third, n)["latency"] for n in ("sim-02", "sim-01", "sim-03"))
    assert slow["kind"] == "regression" and slow["since_run"] == second["run"]["id"], slow
    assert slow["change"] > 0.5
    assert steady["kind"] == "no_change", steady
    assert changed["kind"] == "no_baseline", changed  # a driver change is a new segment, never a regression
    assert code == 1, err  # a regression fails the run for CI (--fail-on new-failure)
    assert third["summary"]["latency"]["regression"] == 1


def test_bench_items_that_cannot_run_are_errors_and_the_rest_go_on(cli: Cli, run_fleet: Fleet,
                                                                     tmp_path: Path) -> None:
    """A bench size past what the device can allocate, and a kernel slower than its item timeout: each is
    that item's `error`; the others are timed."""
    import yaml

    folder = small_kernels(tmp_path / "kernels")
    manifest = yaml.safe_load((folder / "kernels.yml").read_text())
    saxpy = manifest["programs"]["saxpy"]
    huge = dict(saxpy, kernels=[dict(saxpy["kernels"][0], bench_sizes={"n": (1 << 31) - 1})])  # 8 GiB buffers
    manifest["programs"]["huge"] = huge
    (folder / "kernels.yml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    playbook = write_playbook(tmp_path, """\
        name: bench-faults
        limit: sim-01
        steps:
          - push:
              kernels: kernels
              smoke: never
          - bench:
              kernels: kernels
              min_repeats: 5
              min_time_ms: 0
              pause_ms: 0
            retries: 0
            continue_on_error: true
          - name: endless
            bench:
              kernels: kernels
              min_repeats: 5
              min_time_ms: 600000
              max_repeats: 1000
              item_timeout_s: 0.01
              pause_ms: 0
        """)  # 1000 runs of a 1M-element saxpy never fit in 10 ms (at 1 s a quiet PoCL once managed them)
    code, report, err = run(cli, playbook, run_fleet, tmp_path)
    assert code == 0, err
    bench = {r["item"]: r for r in device(report, "sim-01")["results"] if r["step"] == "bench" and r["item"]}
    assert bench["bench huge.saxpy[f32]"]["status"] == "error", bench
    assert "does not fit" in bench["bench huge.saxpy[f32]"]["reason"]
    assert bench["bench saxpy[f32]"]["status"] == "pass" and bench["bench saxpy[f32]"]["samples"][0]["n"] >= 5
    step = results(device(report, "sim-01"), step="bench", item="")[0]
    assert "saxpy -DDATA_TYPE=float.create_ms" in {m["name"] for m in step["metrics"]}  # creation timed apart
    endless = results(device(report, "sim-01"), step="endless", item="bench saxpy[f32]")[0]
    assert endless["status"] == "error" and "timed out" in endless["reason"], endless


def seed_latency_nights(db_path: Path, levels: list[float], *, regression_from: int | None = None) -> list[int]:
    """Nights of one bench series on one device (20 repeats around each level), judged as given."""
    import random

    from deployer.history.records import LatencyKind, LatencyResult, Sample

    rng = random.Random(3)
    fingerprint = Fingerprint("0123456789abcdef", "gpu driver 1")
    ids: list[int] = []
    with History.open(db_path) as db:
        for night, level in enumerate(levels):
            started = 1_700_000_000 + night * 86400
            values = tuple(level * rng.uniform(0.98, 1.02) for _ in range(20))
            item = ItemResult("bench", "bench", "bench k[f32]", "pass", subject="ab" * 32,
                              samples=(Sample("device_ms", "ms", values),))
            ids.append(seed_night(db, fingerprint=fingerprint, items=[item], started=started, device_name="pi-1"))
            kind: LatencyKind = "regression" if regression_from is not None and night >= regression_from \
                else "no_change"
            since = ids[regression_from] if kind == "regression" and regression_from is not None else None
            db.record_latency(ids[-1], [LatencyResult("pi-1", "bench", "bench k[f32]", "device_ms", kind,
                                                      since_run=since, note="seeded")])
    return ids


def test_history_show_accept_and_compare(cli: Cli, tmp_path: Path) -> None:
    db_path = tmp_path / "history.db"
    ids = seed_latency_nights(db_path, [1.0] * 4 + [1.5] * 3, regression_from=4)
    shown = cli("history", "show", "--history", db_path, "--device", "pi-1", "--item", "k[f32]")
    assert shown.code == 0, shown.err
    assert f"regression since run {ids[4]}" in shown.out and shown.out.count("median") == 7
    accepted = cli("history", "accept", "pi-1", "bench k[f32]", "--history", db_path)
    assert accepted.code == 0 and f"since run {ids[4]}" in accepted.out, accepted.out
    with History.open(db_path) as db:  # the segment starts again at the night the change began
        nights = db.sample_nights(ids[-1], "pi-1", "bench", "bench k[f32]", "device_ms",
                                  fingerprint_id="0123456789abcdef", subject="ab" * 32)
    assert [n[0] for n in nights] == ids[4:]
    compared = cli("compare", str(ids[3]), str(ids[4]), "--history", db_path, "--json")
    assert compared.code == 0, compared.err
    row = compared.json()["items"][0]
    assert row["significant"] and 0.45 < row["change"] < 0.55 and row["p_value"] < 0.002
    same = cli("compare", str(ids[0]), str(ids[1]), "--history", db_path, "--json").json()["items"][0]
    assert not same["significant"]
    assert cli("compare", "1", "999", "--history", db_path).code == 2
    unknown = cli("history", "accept", "pi-9", "bench k[f32]", "--history", db_path)
    assert unknown.code == 2 and "no latency verdict" in unknown.err


@pytest.mark.parametrize("spec", ["0/3", "4/3", "a/b", "1/0", "2"])
def test_a_bad_shard_is_refused(cli: Cli, run_fleet: Fleet, tmp_path: Path, spec: str) -> None:
    playbook = write_playbook(tmp_path, "name: n\nsteps:\n  - health: {}\n")
    result = cli("run", playbook, "--fleet", run_fleet.inventory, "--shard", spec, "--run-id", "ci-1", "--dry-run")
    assert result.code == 2 and "--shard" in result.err, result.err


def test_shards_are_stable_and_cover_the_fleet(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    from deployer.history.shards import shard_of

    names = [f"board-{i:03d}" for i in range(200)]
    before = {n: shard_of(n, 4) for n in names}
    assert {shard_of(n, 4) for n in [*names, "board-new"] if n in before} == set(range(1, 5))
    assert all(shard_of(n, 4) == before[n] for n in names)  # adding a device moved none
    assert all(20 < sum(1 for s in before.values() if s == k) < 80 for k in range(1, 5))
    playbook = write_playbook(tmp_path, "name: n\nsteps:\n  - health: {}\n")
    picked = set()
    for k in (1, 2):
        out = cli("run", playbook, "--fleet", run_fleet.inventory, "--shard", f"{k}/2", "--run-id", "ci-1",
                  "--dry-run", "--json").json()
        picked |= {d["name"] for d in out["devices"]}
        assert all(shard_of(d["name"], 2) == k for d in out["devices"])
    assert picked == {"sim-01", "sim-02", "sim-03"}


def test_shards_merged_give_the_report_of_the_whole_run(cli: Cli, tmp_path: Path) -> None:
    """One night recorded whole, and the same night recorded as two shards on copies of the history and
    merged: the merged run's report is the whole run's; merging again changes nothing; a shard of another
    playbook is refused with nothing written."""
    import shutil

    from deployer.history.report import run_report
    from deployer.history.shards import merge_history, shard_of
    from deployer.history.verdicts import judge

    names = [f"pi-{i:02d}" for i in range(6)]
    fingerprint = Fingerprint("0123456789abcdef", "gpu driver 1")

    def night(name: str, status: Status) -> DeviceResult:
        return DeviceResult(name, "ok", 1_800_000_000.0, 1_800_000_010.0, fingerprint,
                            (ItemResult("smoke", "smoke", "case a", status, subject="cd" * 32),))

    cumulative = tmp_path / "history.db"
    with History.open(cumulative) as db:
        for n in range(3):
            seed_night(db, fingerprint=fingerprint, started=1_700_000_000 + n * 86400, device_name=names[0],
                       items=[ItemResult("smoke", "smoke", "case a", "pass", subject="cd" * 32)])
    copies = {k: tmp_path / f"{k}.db" for k in ("whole", "shard1", "shard2")}
    for path in copies.values():
        shutil.copy(cumulative, path)
    tonight = {n: night(n, "fail" if n == names[0] else "pass") for n in names}

    def record(path: Path, devices: list[str], settings: dict[str, str]) -> int:
        with History.open(path) as db:
            run_id = db.begin_run("night", "night.yml", "ef" * 32, "/lab/fleet.yml", devices, settings,
                                  started=1_800_000_000.0)
            for name in devices:
                db.record_device(run_id, tonight[name])
            db.record_verdicts(run_id, judge(db, run_id, [tonight[n] for n in devices]))
            db.finish_run(run_id, "complete", ended=1_800_000_020.0)
            return run_id

    whole = record(copies["whole"], names, {})
    for k in (1, 2):
        record(copies[f"shard{k}"], [n for n in names if shard_of(n, 2) == k], {"run_key": "ci-7", "shard": f"{k}/2"})
    merged = cli("history", "merge", copies["shard1"], copies["shard2"], "--history", cumulative)
    assert merged.code == 0, merged.err

    def report(path: Path, run_id: int) -> dict[str, Any]:
        with History.open(path) as db:
            info = db.run(run_id)
            assert info is not None
            made = run_report(info, db.device_results(run_id), db.verdicts(run_id), history="h",
                              latency=db.latency(run_id))
        made["run"] = {k: v for k, v in made["run"].items() if k not in ("id",)}
        made["run"]["devices"] = sorted(info.devices)
        return made

    with History.open(cumulative) as db:
        merged_id = db.runs(limit=1)[0].id
    assert report(cumulative, merged_id) == report(copies["whole"], whole)
    assert report(cumulative, merged_id)["summary"]["verdicts"]["new_failure"] == 1
    again = cli("history", "merge", copies["shard1"], copies["shard2"], "--history", cumulative)
    assert again.code == 0 and "0 device(s) added" in again.out
    with History.open(cumulative) as db:
        assert len(db.runs(limit=100)) == 4 and db.device_results(merged_id) == [tonight[n] for n in names]
    other = tmp_path / "other.db"
    shutil.copy(copies["shard1"], other)
    with sqlite3.connect(other) as raw:
        raw.execute("UPDATE runs SET playbook_sha256 = ? WHERE json_extract(settings, '$.run_key') = 'ci-7'",
                    ("00" * 32,))
    before = cumulative.read_bytes()
    with History.open(cumulative) as db, pytest.raises(HistoryError, match="another playbook"):
        merge_history(db, other)
    assert cumulative.read_bytes() == before  # refused whole: nothing of it written


@pytest.mark.slow
def test_a_board_throttled_mid_run_is_timed_and_not_judged_yet(cli: Cli, run_fleet: Fleet, tmp_path: Path) -> None:
    """The quota lands while the bench repeats: nothing breaks, the night's repeats are kept, and one odd
    night is never a verdict (too few nights: no baseline yet)."""
    import threading

    from deployer.sim.fleet import set_cpu

    small_kernels(tmp_path / "kernels", bench_n=1 << 22)
    night = BENCH_NIGHT.format(min_change=0.05).replace("steps:", "limit: sim-02\nsteps:")
    playbook = write_playbook(tmp_path, night.replace("min_time_ms: 100", "min_time_ms: 3000"))
    assert run(cli, playbook, run_fleet, tmp_path)[0] == 0  # pushed, one night of baseline
    throttle = threading.Timer(1.0, set_cpu, (run_fleet.device("sim-02"), 0.1))
    throttle.start()
    try:
        code, report, err = run(cli, playbook, run_fleet, tmp_path)
    finally:
        throttle.cancel()
        set_cpu(run_fleet.device("sim-02"), 0)
    assert code == 0, err
    item = bench_item(report, "sim-02")
    assert item["status"] == "pass" and item["samples"][0]["n"] >= 15
    assert item["latency"]["kind"] == "no_baseline"
    with History.open(tmp_path / "history.db") as db:
        night_result = db.device_results(report["run"]["id"])[0]
    values = next(i for i in night_result.items if i.samples).samples[0].values
    assert max(values) > 3 * min(values)  # the quota did land mid-bench: fast repeats, then throttled ones


def test_a_read_only_history_is_read_by_the_commands_that_only_read(cli: Cli, tmp_path: Path) -> None:
    """A history kept as a CI artifact or on a read-only mount: report, list, show and compare read it;
    the commands that write refuse with exit 3 and change nothing."""
    db_path = tmp_path / "history.db"
    ids = seed_latency_nights(db_path, [1.0, 1.0, 1.5])
    set_read_only(db_path, True)
    try:
        before = db_path.read_bytes()
        assert cli("history", "list", "--history", db_path, "--json").json()["runs"][0]["id"] == ids[-1]
        assert "median" in cli("history", "show", "--history", db_path).out
        assert cli("compare", str(ids[0]), str(ids[2]), "--history", db_path, "--json").code == 0
        report = cli("report", "latest", "--history", db_path, "--out", tmp_path / "reports")
        assert report.code == 0, report.err
        assert (tmp_path / "reports" / "report.json").exists() and (tmp_path / "reports" / "junit.xml").exists()
        pruned = cli("history", "prune", "--older-than", "1d", "--history", db_path)
        assert pruned.code == 3 and str(db_path) in pruned.err
        assert db_path.read_bytes() == before
    finally:
        set_read_only(db_path, False)


def set_read_only(path: Path, on: bool) -> None:
    """Root writes through file modes, so as root the file is made immutable instead."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        os.chmod(path, 0o444 if on else 0o644)
