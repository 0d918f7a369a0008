"""The reports CI and scripts read: `deploy report RUN|latest` (report.json, junit.xml, report.html from the
history alone), `deploy run --report DIR`, and the nightly scheduling files in contrib/.

Nights are seeded through the history code (History, judge) into a real SQLite file; report.json is checked
against docs/report.schema.json, junit.xml against two published JUnit schemas (tests/data/junit/README.md);
one real run on simulated boards goes through the systemd unit's own ExecStart command line.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from deployer.errors import LocalStateError
from deployer.history.db import History, RunInfo
from deployer.history.records import STATUSES, DeviceResult, DeviceState, Fingerprint, ItemResult, Metric, Status
from deployer.history.report import run_report
from deployer.history.verdicts import judge
from deployer.reports.files import write_bytes, write_files
from deployer.reports.junit import DOT, junit_xml
from deployer.sim.fleet import Fleet, fleet_specs
from tests.conftest import REPO, Cli

SCHEMA = json.loads((REPO / "docs" / "report.schema.json").read_text())
XSDS = {name: etree.XMLSchema(etree.parse(str(REPO / "tests" / "data" / "junit" / name)))
        for name in ("junit-10.xsd", "JUnit.xsd")}
SERVICE = REPO / "contrib" / "systemd" / "deploy-nightly.service"
TIMER = REPO / "contrib" / "systemd" / "deploy-nightly.timer"
CRON = REPO / "contrib" / "cron" / "deploy-nightly"

GPU = Fingerprint("0123456789abcdef", "OpenCL 3.0 PoCL 3.1 / cpu / 3.1")
SAXPY = "5b0e" + "0" * 60  # the sha256 of what a smoke case ran: equal across nights, so they compare
WRONG = "y: max |err| 3.2 > tolerance 1e-05"
HOT = "device offline: temperature: temperature 95 C > max 85"
REFUSED = "connect: connection refused"


@pytest.fixture(autouse=True)
def own_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's fleet locks in a folder of its own (they live under XDG_STATE_HOME)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(autouse=True)
def html_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dict[str, Any], int, Path]]:
    """report.html is written by `deployer.reports.html.write_html`, another change than this one. Until it is
    on this branch, a stand-in takes its place in-process and records each call (report, run id, path); once
    it is, the real one runs and this list stays empty."""
    calls: list[tuple[dict[str, Any], int, Path]] = []
    if importlib.util.find_spec("deployer.reports.html") is None:
        def write_html(report: dict[str, Any], history: History, run_id: int, path: Path) -> None:
            assert isinstance(history, History)
            calls.append((report, run_id, path))
            path.write_text(f"<!doctype html><title>run {run_id}</title>\n")

        stand_in = types.ModuleType("deployer.reports.html")
        stand_in.write_html = write_html  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "deployer.reports.html", stand_in)
    return calls


# seeding nights through the history code


def night(db: History, devices: list[DeviceResult], *, started: float, playbook: str = "night") -> int:
    """One finished run of `devices`, judged against their past as `deploy run` does."""
    run_id = db.begin_run(playbook, f"{playbook}.yml", "9c1e" + "0" * 60, "/srv/lab/fleet.yml",
                          [d.device for d in devices], {}, started=started)
    for result in devices:
        db.record_device(run_id, result)
    db.record_verdicts(run_id, judge(db, run_id, devices))
    db.finish_run(run_id, "complete", ended=started + 60)
    return run_id


def board(name: str, started: float, items: list[ItemResult], *, state: DeviceState = "ok", reason: str = "",
          fingerprint: Fingerprint | None = GPU) -> DeviceResult:
    return DeviceResult(name, state, started, started + 21.5, fingerprint, tuple(items), reason=reason)


def seed_two_nights(path: Path) -> tuple[int, int]:
    """Last night every check passed on lab.pi-01; tonight saxpy fails there (a new failure), the load check
    errs, a model is skipped; pi-02 runs hot and pi-03 is unreachable: both offline, their smoke step missed."""
    start = time.time() - 3600
    with History.open(path) as db:
        first = night(db, [board("lab.pi-01", start - 86400, [
            ItemResult("health", "health", "reachable", "pass"),
            ItemResult("smoke", "smoke", "case saxpy[f32]", "pass", subject=SAXPY, duration_s=1.5)])],
            started=start - 86400)
        second = night(db, [
            board("lab.pi-01", start, [
                ItemResult("health", "health", "reachable", "pass", duration_s=0.4),
                ItemResult("smoke", "smoke", "case saxpy[f32]", "fail", WRONG, attempts=2, subject=SAXPY,
                           duration_s=1.9, metrics=(Metric("temperature", 47.0, "C"),)),
                ItemResult("smoke", "smoke", "model tiny", "skip", "no model for this device"),
                ItemResult("load", "shell", "", "error", "command timed out after 20 s", duration_s=20.0)]),
            board("pi-02", start, [ItemResult("health", "health", "temperature", "error",
                                              "temperature 95 C > max 85"),
                                   ItemResult("smoke", "smoke", "", "miss", HOT)], state="offline", reason=HOT),
            board("pi-03", start, [ItemResult("health", "health", "reachable", "error", REFUSED),
                                   ItemResult("smoke", "smoke", "", "miss", f"device offline: reachable: {REFUSED}")],
                  state="offline", reason=f"device offline: reachable: {REFUSED}", fingerprint=None),
        ], started=start)
    return first, second


def expected_report(path: Path, run_id: int, history: str) -> dict[str, Any]:
    with History.open(path, create=False) as db:
        info = db.run(run_id)
        assert info is not None
        return run_report(info, db.device_results(run_id), db.verdicts(run_id), history=history,
                          interrupted=info.status == "incomplete")


# checking what was written


def closed(schema: Any) -> Any:
    """The schema with every object closed (no field it does not list): the published schema stays open for
    the fields later versions add, the test holds the code to the documented fields."""
    if isinstance(schema, dict):
        out = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and schema.get("type") == "object":
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(value) for value in schema]
    return schema


def check_schema(report: Any) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(closed(SCHEMA)).validate(report)


def junit(path: Path) -> etree._Element:
    """The parsed junit.xml, after validating it against both vendored JUnit schemas."""
    document = etree.parse(str(path))
    for name, xsd in XSDS.items():
        assert xsd.validate(document), (name, str(xsd.error_log))
    return document.getroot()


def suite(root: etree._Element, device: str) -> etree._Element:
    found = root.findall(f"testsuite[@name='{device}']")
    assert len(found) == 1, [s.get("name") for s in root]
    return found[0]


def case(parent: etree._Element, name: str) -> etree._Element:
    found = [c for c in parent.iter("testcase") if c.get("name") == name]
    assert len(found) == 1, [c.get("name") for c in parent.iter("testcase")]
    return found[0]


def properties(parent: etree._Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in parent.iter("property")}


# deploy report


def test_report_writes_the_run_as_json_junit_and_html(cli: Cli, tmp_path: Path,
                                                      html_calls: list[tuple[dict[str, Any], int, Path]]) -> None:
    db_path = tmp_path / "history.db"
    first, second = seed_two_nights(db_path)
    out = tmp_path / "reports" / "tonight"  # created, parents too
    result = cli("report", "latest", "--history", db_path, "--out", out)
    assert result.code == 0, result.err
    assert f"run #{second} (night, complete)" in result.out
    written = json.loads((out / "report.json").read_text())
    assert written == expected_report(db_path, second, str(db_path))
    check_schema(written)
    assert written["summary"]["results"] == {"fail": 1, "error": 3, "miss": 2, "pass": 1, "skip": 1}
    assert written["summary"]["offline"] == 2
    assert written["summary"]["verdicts"]["new_failure"] == 1
    saxpy = next(r for r in written["devices"][0]["results"] if r["item"] == "case saxpy[f32]")
    assert saxpy["verdict"] == {"kind": "new_failure", "label": "new failure", "note": "", "baseline_run": first}
    assert (out / "report.html").stat().st_size > 0
    if html_calls:  # the stand-in: called once, with the very report written and the run's id
        [(report, run_id, path)] = html_calls
        assert report == written and run_id == second and path.parent == out
    assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "report.html", "report.json"]  # no temp left

    older = cli("report", str(first), "--history", db_path, "--out", tmp_path / "first")
    assert older.code == 0, older.err
    assert json.loads((tmp_path / "first" / "report.json").read_text())["run"]["id"] == first


def test_junit_maps_every_result_and_leaves_no_device_out(cli: Cli, tmp_path: Path) -> None:
    db_path = tmp_path / "history.db"
    first, second = seed_two_nights(db_path)
    assert cli("report", "latest", "--history", db_path, "--out", tmp_path / "out").code == 0
    root = junit(tmp_path / "out" / "junit.xml")
    assert [s.get("name") for s in root] == ["lab.pi-01", "pi-02", "pi-03"]

    pi01 = suite(root, "lab.pi-01")
    assert (pi01.get("tests"), pi01.get("failures"), pi01.get("errors"), pi01.get("skipped")) == ("4", "1", "1", "1")
    assert pi01.get("hostname") == "lab.pi-01" and pi01.get("time") == "21.500"
    assert properties(pi01) == {
        "run.id": str(second), "run.status": "complete", "run.history": str(db_path), "playbook.name": "night",
        "playbook.file": "night.yml", "playbook.sha256": "9c1e" + "0" * 60, "fleet": "/srv/lab/fleet.yml",
        "device.state": "ok", "device.status": "fail", "device.reason": "",
        "device.fingerprint": f"{GPU.id} {GPU.label}"}
    failure = case(pi01, "smoke: case saxpy[f32]").find("failure")
    assert failure is not None and failure.get("message") == WRONG and failure.get("type") == "fail"
    assert failure.text is not None
    assert failure.text.splitlines() == [WRONG, f"verdict: new failure (against run {first})", "attempts: 2",
                                         "temperature: 47 C"]
    assert case(pi01, "smoke: case saxpy[f32]").get("time") == "1.900"
    error = case(pi01, "load").find("error")
    assert error is not None and error.get("message") == "command timed out after 20 s"
    skipped = case(pi01, "smoke: model tiny").find("skipped")
    assert skipped is not None and skipped.get("message") == "no model for this device"
    assert len(case(pi01, "health: reachable")) == 0  # a pass: no child

    # offline boards are in the report, their missed steps skipped with the reason, never left out
    hot, down = suite(root, "pi-02"), suite(root, "pi-03")
    too_hot = case(hot, "health: temperature").find("error")  # health items are pass or error, never fail
    assert too_hot is not None and too_hot.get("message") == "temperature 95 C > max 85"
    missed = case(hot, "smoke").find("skipped")
    assert missed is not None and missed.get("message") == f"not run: {HOT}"
    unreachable = case(down, "health: reachable").find("error")
    assert unreachable is not None and unreachable.get("message") == REFUSED
    assert (down.get("tests"), down.get("errors"), down.get("skipped")) == ("2", "1", "1")
    assert properties(down)["device.fingerprint"] == "" and properties(down)["device.state"] == "offline"

    # one suite per device in GitLab (suite = classname) and in Jenkins (package.class at the last dot)
    for entry in root:
        classnames = {c.get("classname") for c in entry.iter("testcase")}
        assert len(classnames) == 1
        package, _, cls = str(classnames.pop()).rpartition(".")
        assert package == "night" and cls.replace(DOT, ".") == entry.get("name")
        names = [c.get("name") for c in entry.iter("testcase")]
        assert len(names) == len(set(names))


def test_a_killed_run_reports_the_devices_it_never_recorded(cli: Cli, tmp_path: Path) -> None:
    """A run killed after one of its two boards was recorded: the other is still a suite in junit.xml."""
    db_path = tmp_path / "history.db"
    with History.open(db_path) as db:
        run_id = db.begin_run("night", "night.yml", "9c1e" + "0" * 60, "/srv/lab/fleet.yml", ["pi-01", "pi-02"], {})
        db.record_device(run_id, board("pi-01", time.time(), [ItemResult("health", "health", "reachable", "pass")]))
        db.finish_run(run_id, "incomplete")
    assert cli("report", "latest", "--history", db_path, "--out", tmp_path / "out").code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["run"]["status"] == "incomplete" and report["run"]["interrupted"] is True
    check_schema(report)
    lost = case(suite(junit(tmp_path / "out" / "junit.xml"), "pi-02"), "device").find("skipped")
    assert lost is not None and "no result was recorded for this device" in lost.get("message", "")


@pytest.mark.parametrize("mutate", [
    lambda r: r["devices"][0]["results"][0].update(status="passed"),
    lambda r: r["devices"][1]["results"][1].update(verdict={"kind": "fixed", "label": "fixed", "note": "",
                                                            "baseline_run": 1}),  # a miss is never judged
    lambda r: r["devices"][0]["results"][0].pop("reason"),
    lambda r: r["devices"][0].update(owner="lab"),  # a field docs/report.md does not list
    lambda r: r["run"]["playbook"].update(sha256="9c1e"),
    lambda r: r["summary"]["results"].pop("miss"),
    lambda r: r.update(schema_version=2),
])
def test_the_report_schema_refuses_what_the_contract_does_not_allow(tmp_path: Path,
                                                                    mutate: Callable[[dict[str, Any]], None]) -> None:
    _, second = seed_two_nights(tmp_path / "history.db")
    report = expected_report(tmp_path / "history.db", second, "history.db")
    check_schema(report)
    broken = copy.deepcopy(report)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        check_schema(broken)


# junit.xml for any text a board may send and any device name


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
text = st.text(st.characters(codec="utf-8"), max_size=40)  # control characters, lone surrogates excluded by utf-8


@given(devices=st.lists(names, min_size=1, max_size=4, unique=True), reasons=st.lists(text, min_size=1, max_size=4),
       statuses=st.lists(st.sampled_from(STATUSES), min_size=1, max_size=4), playbook=names)
def test_junit_is_valid_for_any_reasons_and_names(devices: list[str], reasons: list[str], statuses: list[Status],
                                                  playbook: str) -> None:
    items = tuple(ItemResult("step", "shell", f"item {i}", status, reason)
                  for i, (status, reason) in enumerate(zip(statuses, reasons, strict=False)))
    results = [DeviceResult(name, "ok", 1.7e9, 1.7e9 + 3, None, items, reason=reasons[0]) for name in devices]
    info = RunInfo(1, playbook, "p.yml", "0" * 64, "fleet.yml", tuple(devices), 1.7e9, None, "running", 1, "h", {})
    root = etree.fromstring(junit_xml(run_report(info, results, [], history="h.db")))
    for name, xsd in XSDS.items():
        assert xsd.validate(root), (name, str(xsd.error_log))
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == devices
    classnames = [str(s.find("testcase").get("classname")) for s in suites]  # type: ignore[union-attr]
    assert len(set(classnames)) == len(devices)  # dotted or not, no two devices share one
    assert all(c.count(".") == 1 for c in classnames)
    for entry in suites:  # every result is a testcase: none dropped, whatever its status
        assert len(entry.findall("testcase")) == len(items)


# bad input and unusable state


@pytest.mark.parametrize(("args", "code", "says"), [
    (["99"], 2, "has no run 99 (its newest are 2, 1"),
    (["yesterday"], 2, "expected a run id"),
    (["0"], 2, "expected a run id"),
])
def test_a_run_that_is_not_there_is_bad_input(cli: Cli, tmp_path: Path, args: list[str], code: int, says: str) -> None:
    seed_two_nights(tmp_path / "history.db")
    result = cli("report", *args, "--history", tmp_path / "history.db", "--out", tmp_path / "out")
    assert result.code == code, (result.out, result.err)
    assert says in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("state", ["empty", "newer", "missing"])
def test_an_unusable_history_writes_nothing(cli: Cli, tmp_path: Path, state: str) -> None:
    db_path = tmp_path / "history.db"
    if state != "missing":
        with History.open(db_path):
            pass
    if state == "newer":
        with sqlite3.connect(db_path) as db:
            db.execute("pragma user_version = 99")
    result = cli("report", "latest", "--history", db_path, "--out", tmp_path / "out")
    assert result.code == 3, (result.out, result.err)
    assert {"empty": f"{db_path} holds no run yet", "newer": "has schema 99", "missing": f"no history at {db_path}"
            }[state] in result.err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Make a folder unwritable even for root (chattr +i; chmod for others), undone after the test."""
    made: list[Path] = []

    def make(folder: Path) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(folder)], check=True)
        else:
            folder.chmod(0o555)
        made.append(folder)

    yield make
    for folder in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_an_unwritable_out_folder_is_refused_and_the_last_reports_stay(cli: Cli, tmp_path: Path,
                                                                       immutable: Callable[[Path], None]) -> None:
    db_path = tmp_path / "history.db"
    first, _ = seed_two_nights(db_path)
    out = tmp_path / "out"
    assert cli("report", str(first), "--history", db_path, "--out", out).code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    immutable(out)
    result = cli("report", "latest", "--history", db_path, "--out", out)
    assert result.code == 3, (result.out, result.err)
    assert f"cannot write the reports in {out}" in result.err and "nothing was written" in result.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # last reports whole, no temp file

    in_a_file = cli("report", "latest", "--history", db_path, "--out", tmp_path / "history.db" / "out")
    assert in_a_file.code == 3 and "cannot write the reports in" in in_a_file.err


def test_a_set_of_files_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """The third writer fails after two files are written: neither of them appears, the set written before
    stays as it was, no temp file is left."""
    def full(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert write_files(tmp_path, {"a.json": write_bytes(b"old")}) == [tmp_path / "a.json"]
    with pytest.raises(LocalStateError, match="No space left on device; nothing was written"):
        write_files(tmp_path, {"a.json": write_bytes(b"{}"), "b.xml": write_bytes(b"<a/>"), "c.html": full})
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("a.json", b"old")]


# the nightly schedule: systemd units, cron line, and a real run through the unit's ExecStart


def unit_values(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith(f"{key}=")]


def exec_start() -> list[str]:
    [command] = unit_values(SERVICE, "ExecStart")
    return shlex.split(command)


PLACES = ("/opt/deployer", "/etc/deployer", "/var/lib")  # where the units put things on a real controller


def relocated(words: list[str], root: Path) -> list[str]:
    """The words with every path of PLACES moved under `root`; none is left outside it."""
    moved = [re.sub(rf"^({'|'.join(map(re.escape, PLACES))})(?=/|$)", lambda m: str(root) + m.group(1), w)
             for w in words]
    assert not [w for w in moved if w.startswith(PLACES)], moved
    return moved


def install_deploy(root: Path) -> Path:
    """`/opt/deployer/.venv/bin/deploy` under `root`: the console script of this checkout's venv."""
    script = Path(sys.executable).parent / "deploy"
    if not script.exists():
        pytest.fail(f"{script} is missing: run scripts/install.sh --test")
    target = root / "opt" / "deployer" / ".venv" / "bin" / "deploy"
    target.parent.mkdir(parents=True)
    target.symlink_to(script)
    return target


def systemd_verify(folder: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: run scripts/install.sh --test (Debian package systemd)")
    return subprocess.run([tool, "verify", "--man=no", str(folder / TIMER.name), str(folder / SERVICE.name)],
                          capture_output=True, text=True, timeout=60)


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    install_deploy(tmp_path)  # verify checks that ExecStart's program exists
    service = SERVICE.read_text().replace("/opt/deployer", f"{tmp_path}/opt/deployer")
    (tmp_path / SERVICE.name).write_text(service)
    (tmp_path / TIMER.name).write_text(TIMER.read_text())
    result = systemd_verify(tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
    assert unit_values(TIMER, "Persistent") == ["true"] and unit_values(TIMER, "RandomizedDelaySec") == ["30min"]
    assert unit_values(SERVICE, "Type") == ["oneshot"] and unit_values(SERVICE, "KillSignal") == ["SIGINT"]
    # and verify does look: a misspelt key and a bad calendar are reported
    (tmp_path / TIMER.name).write_text(TIMER.read_text().replace("Persistent=", "Persistant=")
                                       .replace("02:30:00", "25:30:00"))
    broken = systemd_verify(tmp_path)
    assert "Unknown key 'Persistant'" in broken.stderr and "Failed to parse calendar" in broken.stderr


def test_the_cron_line_runs_the_units_command() -> None:
    lines = [line for line in CRON.read_text().splitlines() if line.strip() and not line.startswith("#")]
    environment = [line for line in lines if re.fullmatch(r"[A-Z_]+=\S+", line)]
    assert environment == unit_values(SERVICE, "Environment")
    [entry] = [line for line in lines if line not in environment]
    fields = entry.split(None, 6)
    assert len(fields) == 7 and fields[5] == "deployer" == unit_values(SERVICE, "User")[0]
    words = shlex.split(fields[6])
    assert words[:3] == ["cd", unit_values(SERVICE, "WorkingDirectory")[0], "&&"]
    assert words[3:3 + len(exec_start())] == exec_start()
    assert words[3 + len(exec_start()):] == [">>/var/lib/deployer/nightly.log", "2>&1"]


def test_the_units_command_runs_a_night_and_writes_its_reports(cli: Cli, make_fleet: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """ExecStart as written in the unit, its paths moved under a test folder, with the unit's Environment= and
    WorkingDirectory=: a cheap real night on two simulated boards, one of them down. The command runs
    in-process (`deploy`'s console script calls the same `main`), so the report.html writer can be stood in
    for until it is merged."""
    fleet: Fleet = make_fleet(fleet_specs(2))
    assert cli("sim", "set", "sim-02", "--dir", fleet.folder, "--down").code == 0
    root = tmp_path / "root"
    deploy = install_deploy(root)
    playbook = root / "opt" / "deployer" / "playbooks" / "nightly.yml"
    playbook.parent.mkdir(parents=True)
    playbook.write_text("name: n\nsteps:\n  - health: {}\n")
    (root / "etc" / "deployer").mkdir(parents=True)
    shutil.copy(fleet.inventory, root / "etc" / "deployer" / "fleet.yml")
    state = root / "var" / "lib" / "deployer"  # StateDirectory=deployer: systemd creates it
    state.mkdir(parents=True)
    for assignment in unit_values(SERVICE, "Environment"):
        name, value = assignment.split("=", 1)
        monkeypatch.setenv(name, relocated([value], root)[0])
    monkeypatch.chdir(relocated(unit_values(SERVICE, "WorkingDirectory"), root)[0])

    words = relocated(exec_start(), root)
    assert Path(words[0]) == deploy and os.access(words[0], os.X_OK)
    night_result = cli(*words[1:])
    assert night_result.code == 0, night_result.err
    reports = state / "reports" / "latest"
    assert sorted(p.name for p in reports.iterdir()) == ["junit.xml", "report.html", "report.json"]
    written = json.loads((reports / "report.json").read_text())
    check_schema(written)
    assert written["run"]["playbook"]["name"] == "n" and written["run"]["status"] == "complete"
    assert [d["state"] for d in written["devices"]] == ["ok", "offline"]
    root_xml = junit(reports / "junit.xml")
    assert case(suite(root_xml, "sim-01"), "health: opencl").find("*") is None  # passed
    down = [c.find("error") for c in suite(root_xml, "sim-02").iter("testcase")]
    assert any(e is not None for e in down), etree.tostring(root_xml)
    assert (root / "var" / "lib" / "deployer" / "locks").is_dir()  # the fleet lock where the unit says

    # deploy report writes the same report.json from the history alone
    again = cli("report", "latest", "--history", words[words.index("--history") + 1], "--out", tmp_path / "again")
    assert again.code == 0, again.err
    assert json.loads((tmp_path / "again" / "report.json").read_text()) == written
