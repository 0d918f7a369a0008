"""A hostile board: one sim device per lie the agent protocol allows, beside an honest one, in one fleet.

Each lying device runs `tests/hooks/hostile_agent.py` in place of the agent (the inventory's `python:` is a
wrapper that starts it, so the real sshd runs it) and lies in one way (its case): sizes that do not match,
payloads far larger than announced, `..`/absolute/symlinked paths, escape sequences in every string, a
fingerprint that is not one, malformed and truncated frames, a reply to a question it was not asked, a flood
on stdout. The whole fleet goes through what consumes a board's answers: `push` (three times: table, JSON,
JSON) and `push --check`, `collect` and `rollback` (twice each), `cache install` (twice), a nightly `run`
(a shell step, its reports), then `cache ls`, `show` and `verify`, which show again what boards sent; each
a `deploy` subprocess. For every run: each lying device fails with a clear message, the honest device passes, the
controller's peak RSS and time stay bounded, nothing is written outside the cache (and the run's history,
reports and lock), and no raw escape byte reaches stdout, stderr, the JSON or the reports.

Trickling and silent boards and a flood on stderr are in tests/test_faults.py
(`test_a_trickling_or_silent_board_costs_one_timeout`, `test_a_flood_on_stderr_*`), as are the single cases
of a payload announced over its op's limit and a streamed payload of wrong bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import yaml

from deployer.cache.mace import DEVICE_NAME_KEY, PLATFORM_INFO_KEY, encode_mace_pb
from deployer.protocol.bundle import agent_bundle
from deployer.sim.fleet import DeviceSpec, Fleet, start_fleet
from tests.conftest import REPO
from tests.hooks import hostile_agent
from tests.hooks.hostile_agent import CASES, ESC
from tests.test_faults import _saxpy_only, device_entry

pytestmark = pytest.mark.slow

HONEST = "honest"
COMMAND_S = 10  # each lying device's `timeouts.command`: a lie that stalls costs this, once
RSS_LIMIT_KIB = 300 * 1024  # a flood is 400 MB: a controller that held one would break this bound
RUN_LIMIT_S = 90  # generous: a run takes 2-10 s here; a hang costs COMMAND_S per device, in parallel
INSTALL_TO = "~/app/mace_cl_compiled_program.bin"
RAW_ESCAPES = ("\x1b", "\x07", "\x9b")


@dataclass
class Run:
    name: str
    code: int
    out: bytes
    err: bytes
    maxrss_kib: int
    elapsed: float
    written: list[str]  # files created or changed outside the fleet's folder, relative to the root

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in json.loads(self.out)["devices"]}


@dataclass
class Hostile:
    root: Path
    fleet: Fleet
    cache: Path
    runs: dict[str, Run]


def _container() -> bytes:
    """A valid MACE container whose every string is an escape sequence: what `escapes` serves to collect."""
    return encode_mace_pb([(PLATFORM_INFO_KEY, ESC.encode()), (DEVICE_NAME_KEY, ESC.encode()),
                           (ESC + "saxpy", b"poclbin" + ESC.encode()), ("program_hash_ " + ESC, ESC.encode())])


def _install_liars(fleet: Fleet) -> Path:
    """Each lying device's python: a wrapper running the hostile agent with its case; the edited inventory."""
    agent = agent_bundle().id
    for case in CASES:
        home = Path(fleet.device(case).folder) / "home"
        (home / "hostile").mkdir()
        shutil.copy(hostile_agent.__file__, home / "hostile" / "hostile_agent.py")
        (home / "hostile" / "container.bin").write_bytes(_container())
        wrapper = home / "fake-python"
        wrapper.write_text(f"#!/bin/sh\nexec python3 /home/deploysim/hostile/hostile_agent.py {case} {agent}\n")
        wrapper.chmod(0o755)
    document = yaml.safe_load(fleet.inventory.read_text())
    for case in CASES:
        device_entry(document, case).update(python="/home/deploysim/fake-python", timeouts={"command": COMMAND_S})
    path = fleet.folder / "hostile.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# Starts `deploy` and writes its peak RSS (os.wait4's ru_maxrss) to argv[1]. A small launcher of its own,
# because a child's ru_maxrss counts the copy of its parent it was between fork and exec: started from the
# test process (several hundred MiB late in the suite), every run measured the suite, not deploy.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and skip not in p.parents}


def _deploy(root: Path, fleet: Fleet, name: str, *args: str | Path) -> Run:
    """`deploy ARGS` as a subprocess of its own (HOME, TMPDIR, state and cwd inside `root`), measured."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")}
    env.update(PYTHONPATH=str(REPO), HOME=str(root / "home"), TMPDIR=str(root / "tmp"),
               XDG_STATE_HOME=str(root / "state"), PYTHONDONTWRITEBYTECODE="1", COLUMNS="200")
    before = _snapshot(root, fleet.folder)
    start = time.monotonic()
    rss_file = root / "maxrss"
    with open(root / "out", "w+b") as out, open(root / "err", "w+b") as err:
        command = [sys.executable, "-S", "-c", LAUNCHER, str(rss_file), sys.executable, "-m", "deployer",
                   *map(str, args)]
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=root / "work",
                                   start_new_session=True)
        try:  # bounded, so a hung run fails the test rather than the suite
            process.wait(timeout=2 * RUN_LIMIT_S)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        elapsed = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    (root / "out").unlink()
    (root / "err").unlink()
    maxrss = int(rss_file.read_text())
    rss_file.unlink()
    after = _snapshot(root, fleet.folder)
    written = sorted(p for p, stat in after.items() if before.get(p) != stat)
    return Run(name, process.returncode, stdout, stderr, maxrss, elapsed, written)


def _playbook(root: Path) -> Path:
    path = root / "night.yml"
    path.write_text("name: hostile\nsteps:\n  - name: probe\n    shell:\n      command: 'echo {\\\"speed\\\": 2.5}'\n"
                    "      metrics:\n        json: true\n")
    return path


def _seed_install(cache: Path) -> None:
    """Give each lying device a pushed cache (the honest device's file) recorded under the fingerprint it
    will show, so `cache install` goes as far as asking it: a board pushed once, hostile since."""
    source = cache / HONEST
    for case in CASES:
        folder = cache / case
        folder.mkdir(exist_ok=True)
        shutil.copy(source / "mace_cl_compiled_program.bin", folder / "mace_cl_compiled_program.bin")
        shown = hostile_agent.fingerprint(ESC if case == "escapes" else "")
        (folder / "fingerprints.jsonl").write_text(json.dumps({"seen_at": 1.0, "id": shown["id"],
                                                               "fingerprint": shown}) + "\n")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, pocl_cache: Path) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    for folder in ("home", "tmp", "state", "work", "libs", "night"):
        (root / folder).mkdir()
    fleet = start_fleet(root / "fleet", [DeviceSpec(HONEST), *(DeviceSpec(c) for c in CASES)], pocl_cache=pocl_cache)
    try:
        inventory = _install_liars(fleet)
        libs = [_saxpy_only(root / "libs", scale) for scale in ("one", "two", "three")]
        cache = root / "cache"
        fleet_args = ("--fleet", inventory, "--cache", cache)
        runs = [
            _deploy(root, fleet, "push (table)", "push", *fleet_args, "--kernels", libs[0]),
            _deploy(root, fleet, "push", "push", *fleet_args, "--kernels", libs[1], "--json"),
            _deploy(root, fleet, "push --smoke never", "push", *fleet_args, "--kernels", libs[2], "--json",
                    "--smoke", "never"),
            _deploy(root, fleet, "push --check (table)", "push", *fleet_args, "--kernels", libs[0], "--check"),
            _deploy(root, fleet, "collect", "collect", *fleet_args, "--path", "/data/*", "--json"),
            _deploy(root, fleet, "collect (table)", "collect", *fleet_args, "--path", "/data/*"),
            _deploy(root, fleet, "rollback (table)", "rollback", *fleet_args),
            _deploy(root, fleet, "rollback", "rollback", *fleet_args, "--json"),
        ]
        _seed_install(cache)
        runs += [
            _deploy(root, fleet, "cache install", "cache", "install", *fleet_args, "--to", INSTALL_TO, "--json"),
            _deploy(root, fleet, "cache install (table)", "cache", "install", *fleet_args, "--to", INSTALL_TO),
            # A nightly run: a shell step's output and metrics, its reports, its history.
            _deploy(root, fleet, "run", "run", _playbook(root), *fleet_args, "--history", root / "night" / "h.db",
                    "--report", root / "night" / "reports", "--json"),
            # What the boards sent, shown again later from the cache alone.
            _deploy(root, fleet, "cache ls (table)", "cache", "ls", "--cache", cache),
            _deploy(root, fleet, "cache show", "cache", "show", "escapes", "--cache", cache),
            _deploy(root, fleet, "cache verify (table)", "cache", "verify", "--cache", cache),
        ]
        yield Hostile(root, fleet, cache, {r.name: r for r in runs})
    finally:
        fleet.stop()


# What each lie comes to, per JSON run: (the device passes?, a phrase its error must hold). A board's answer a
# lie does not touch is plausible (a build that fails, nothing found); None: no lie reaches that command.
Expect = dict[str, tuple[bool, str] | None]
EXPECTED: dict[str, Expect] = {
    "paths": {"push": (False, "names a file that is not a plain relative path: ../../outside.cl [bad_reply]"),
              "collect": (False, "not an absolute path"),  # every entry refused, each for its reason (below)
              "rollback": (True, "that release has no cache file: local cache unchanged"),
              "cache install": (False, "this board refuses install [io]")},
    "fingerprint": {"push": (False, "is not the hash of the platform and device it describes"),
                    "collect": None,  # collected from without a fingerprint, as from a board without OpenCL
                    "rollback": (False, "fingerprint: expected an object"),
                    "cache install": (False, "is not the hash of the platform and device it describes")},
    "escapes": {"push": (False, "program(s) failed to build"),
                "collect": (False, "permission denied"),
                "rollback": (True, ""),
                "cache install": (False, "unknown error kind")},
    "keys": {"push": (False, "build reply names a program that was not asked for: ../../\\x1b[2J"),
             "collect": None, "rollback": (False, "no release older than"),
             "cache install": (False, "this board refuses install [io]")},
    "manifest": {"push": (False, "build reply field 'manifest_file': expected a plain relative path"),
                 "collect": None, "rollback": (False, "no release older than"),
                 "cache install": (False, "this board refuses install [io]")},
    "oversize": {"push": (False, "a line longer than 1048576 bytes"),
                 "collect": (False, "announced 400000000 bytes for its 'read' reply, over the 100 it may send"),
                 "rollback": (False, "announced 400000000 bytes for its 'rollback' reply, over the 268435456"),
                 "cache install": (False, "announced 400000000 bytes for its 'install' reply, over the 1048576")},
    "sizes": {"push": (False, "size does not match what the agent announced [bad_cache]"),
              "collect": (False, "pulled bytes differ from what the device announced"),
              "rollback": (False, "the rolled-back cache file arrived corrupted [checksum]"),
              "cache install": (False, "this board refuses install [io]")},
    "truncated": {"push": (False, "stream ended after 21 of 10000000 bytes"),
                  "collect": (False, "connection lost"),
                  "rollback": (False, "the agent exited with status 0: "),  # then its stderr, made printable
                  "cache install": (False, "the agent exited with status 0: ")},
    **{case: dict.fromkeys(("push", "collect", "rollback", "cache install"), (False, phrase)) for case, phrase in [
        ("malformed", "agent sent a malformed reply"), ("not_object", "agent reply is not a JSON object"),
        ("flood", "a line longer than 1048576 bytes"), ("hello", "the device runs agent ")]},
    "unasked": {"push": (False, "the device's state is not JSON"),
                "collect": (False, "neither ok nor a well-formed error"),
                "rollback": (False, "rollback reply field 'previous'"),
                "cache install": (False, "fingerprint: expected an object, got None")},  # commit's reply
    "error_text": {"push": (False, "[io]"), "collect": (False, "unknown error kind"), "rollback": (False, "[io]"),
                   "cache install": (False, "[io]")},
    "pull": {"push": (False, "the pulled cache file is not a valid MACE pb container: crc mismatch [bad_cache]"),
             "collect": None,
             "rollback": (False, "the rolled-back cache file is not a MACE container"),
             "cache install": (False, "this board refuses install [io]")},
}
JSON_RUNS = ("push", "push --smoke never", "collect", "rollback", "cache install")


def _said(device: dict[str, Any]) -> str:
    """Everything a device's JSON record says went wrong: its error, and each collected file's detail."""
    files = device.get("files") or []
    return " | ".join([str(device.get("error") or device.get("detail") or "")] +
                      [f"{f['remote_path']}: {f['status']}: {f['detail']}" for f in files])


def test_the_cases_are_the_agents() -> None:
    assert sorted(EXPECTED) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_each_lie_fails_its_device_with_a_clear_message_and_only_it(hostile: Hostile, case: str) -> None:
    for name in JSON_RUNS:
        run = hostile.runs[name]
        devices = run.devices()
        assert devices[HONEST]["ok"] is True, (name, devices[HONEST])
        expected = EXPECTED[case][name.split(" --")[0]]
        said = _said(devices[case])
        assert len(said) < 6000, (name, len(said))  # a 200 KB message or a 2000-line log is cut
        assert not [c for c in RAW_ESCAPES if c in said], (name, said[:300])  # kept printable (docs/json.md)
        if expected is not None:
            ok, phrase = expected
            assert devices[case]["ok"] is ok and phrase in said, (name, devices[case])


def test_a_lying_find_is_refused_entry_by_entry(hostile: Hostile) -> None:
    """`..`, relative, not normalised, symlinked, oversized, badly hashed, NUL-bearing and non-record entries:
    each refused for its reason, none read; the escape-named file is read, kept under a slug in the cache."""
    devices = hostile.runs["collect"].devices()
    refused = {f["remote_path"]: f["detail"] for f in devices["paths"]["files"]}
    assert all(f["status"] == "refused" for f in devices["paths"]["files"])
    assert refused["../../etc/passwd"] == "not an absolute path"
    assert "'..'" in refused["/data/../../etc/shadow"] and "'..'" in refused["/data/./x.bin"]
    assert refused["/data/link.bin"].startswith("symlink to /etc/")
    assert "refused before pulling" in refused["/data/big.bin"] and refused["/data/hash.bin"] == "malformed sha256"
    assert refused["/data/nul\\x00.bin"] == "not an absolute path" and refused["None"] == "malformed entry"
    assert refused["/data/\\ud800.bin"] == "not a file name: a lone surrogate"  # was the device's "local cache" error
    statuses = sorted(f["status"] for f in devices["escapes"]["files"])
    assert statuses == ["new", "refused"], devices["escapes"]
    (kept,) = (hostile.cache / "escapes" / "collected").iterdir()
    assert kept.name.startswith("data_") and kept.name.isprintable()


@pytest.mark.parametrize("name", ["push (table)", "push", "push --smoke never", "push --check (table)",
                                  "collect", "collect (table)",
                                  "rollback (table)", "rollback", "cache install", "cache install (table)", "run",
                                  "cache ls (table)", "cache show", "cache verify (table)"])
def test_a_hostile_fleet_costs_bounded_memory_and_time_and_shows_no_raw_escape(hostile: Hostile, name: str) -> None:
    """Every run: exit 1 (not 70), the honest device named as done, peak RSS under 300 MiB although boards
    flood 400 MB (a run measured 71-78 MB here), well within its time bound, and no escape byte, bell or 8-bit
    CSI on stdout or stderr (JSON escapes C0 controls; the collected file's own strings brought a raw
    U+009B to `collect --json` before `emit_json` wrote ASCII)."""
    run = hostile.runs[name]
    # run: 0, a board's error is no new failure; verify: 1, the seeded devices have no manifest
    expected_code = 0 if name in ("run", "cache ls (table)", "cache show") else 1
    assert run.code == expected_code, (run.code, run.err[-2000:])
    assert b"Traceback" not in run.err and b"internal error" not in run.err
    assert run.maxrss_kib < RSS_LIMIT_KIB, run.maxrss_kib
    assert run.elapsed < RUN_LIMIT_S, run.elapsed
    for stream in (run.out, run.err):
        text = stream.decode("utf-8")  # strict: no stray bytes either
        assert not [c for c in RAW_ESCAPES if c in text], (name, [c for c in RAW_ESCAPES if c in text])
    if name in ("push (table)", "push --check (table)", "rollback (table)", "cache install (table)"):
        assert any(line.startswith(HONEST) or f"{HONEST} " in line for line in run.out.decode().splitlines())


def test_nothing_is_written_outside_the_cache(hostile: Hostile) -> None:
    """No run wrote anywhere under its HOME, TMPDIR, state folder, working folder or the kernels libraries
    but into the cache (the boards' homes aside); no crash file; every file in the cache is a plain file or
    folder inside it, under a name the controller chose."""
    for run in hostile.runs.values():
        allowed = ("cache/",) + (("night/", "state/deployer/locks/") if run.name == "run" else ())
        assert all(p.startswith(allowed) for p in run.written), (run.name, run.written)
    assert "cache/honest/mace_cl_compiled_program.bin" in hostile.runs["push"].written  # the snapshot sees writes
    assert not list((hostile.root / "tmp").iterdir())
    cache = hostile.cache.resolve()
    for path in cache.rglob("*"):
        assert not path.is_symlink() and path.resolve().is_relative_to(cache), path
        assert path.name.isprintable() and ".." not in path.name.split("/"), path
    assert not (hostile.root / "home" / "app").exists()  # `cache install` wrote on the boards, not here



def test_a_nightly_run_keeps_and_reports_board_text_printable(hostile: Hostile) -> None:
    """A `shell` step on every board: the honest one passes with its metric; the escape-named metrics of
    `escapes` are kept and reported made visible; every other lie is that board's error with a printable
    reason; report.json, report.html and junit.xml (parsed as XML) hold no raw control character."""
    devices = hostile.runs["run"].devices()
    results = {name: device["results"] for name, device in devices.items()}
    assert [(r["status"], [m["name"] for m in r["metrics"]]) for r in results[HONEST]] == [("pass", ["speed"])]
    (escaped,) = results["escapes"]
    assert escaped["status"] == "pass" and {m["name"] for m in escaped["metrics"]} == {
        "\\x1b[2J\\x1b]0;owned\\x07\\x9b31m", "speed\\x1b[2J\\x1b]0;owned\\x07\\x9b31m"}
    for case in set(CASES) - {"escapes"}:
        assert [r["status"] for r in results[case]] == ["error"] and results[case][0]["reason"], case
    for result in (r for rs in results.values() for r in rs):
        assert not [c for c in RAW_ESCAPES if c in result["reason"] + "".join(m["name"] for m in result["metrics"])]
    reports = hostile.root / "night" / "reports"
    ElementTree.parse(reports / "junit.xml")  # XML 1.0 cannot hold ESC even escaped: a raw one breaks it
    for name in ("junit.xml", "report.html", "report.json"):
        text = (reports / name).read_text("utf-8")
        assert not [c for c in RAW_ESCAPES if c in text], name
