"""Incremental pushes on a real device: only what changed travels, builds, is pulled and smoke-tested.

One device of this module's own is pushed once (cold); each test then pushes again and checks what the
device's sshd saw, what landed in `releases/`, and what the JSON says. Tests that change the kernels work
on a copy and push the original back before they end, so every test starts from "device up to date".
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployer.cli.main import main
from deployer.config.inventory import load_inventory
from deployer.config.kernels import load_library
from deployer.sim.fleet import DeviceSpec, Fleet, start_fleet
from deployer.tasks import plan as plan_module
from deployer.tasks.plan import HashIndex, local_files
from deployer.tasks.progress import Progress
from deployer.tasks.push import PushJob, prepare_push, release_paths, run_fleet
from deployer.tasks.smoke import Smoke, load_references, plan_smoke
from tests.conftest import KERNELS, Cli

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny_cnn.npz"


@dataclass
class Deployed:
    fleet: Fleet
    cache: Path
    kernels: Path

    @property
    def rd(self) -> Path:
        return Path(self.fleet.device("inc-01").folder) / "home" / ".deployer"

    def releases(self) -> list[str]:
        return sorted(p.name for p in (self.rd / "releases").iterdir())

    def current(self) -> str:
        return os.readlink(self.rd / "current").split("/")[-1]

    def sshd_log(self) -> str:
        return (Path(self.fleet.device("inc-01").folder) / "sshd.log").read_text()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, pocl_cache: Path) -> Iterator[Deployed]:
    folder = tmp_path_factory.mktemp("incremental")
    fleet = start_fleet(folder / "fleet", [DeviceSpec("inc-01")], pocl_cache=pocl_cache)
    kernels = folder / "kernels"
    shutil.copytree(KERNELS, kernels)
    state = Deployed(fleet, folder / "cache", kernels)
    try:
        code, report = _push(state)
        assert code == 0, report
        yield state
    finally:
        fleet.stop()


def _push(state: Deployed, *extra: str | Path) -> tuple[int, dict[str, Any]]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["push", "--fleet", str(state.fleet.inventory), "--kernels", str(state.kernels), "--cache",
                     str(state.cache), "--model", str(MODEL), "--json", *map(str, extra)])
    assert "Traceback" not in err.getvalue()
    return code, json.loads(out.getvalue())["devices"][0]


def _sessions(log: str) -> tuple[int, int]:
    """(SSH connections accepted, remote commands started) in an sshd VERBOSE log."""
    return log.count("Accepted publickey"), len(re.findall(r"Starting session: command", log))


def _assert_noop(deployed: Deployed, device: dict[str, Any], before: str, releases: list[str]) -> None:
    assert device["ok"] and device["changed"] is False and device["pulled"] is False, device
    assert device["plan"]["new_release"] is False and device["plan"]["upload"] == []
    assert device["plan"]["rebuild"] == [] and device["plan"]["reuse"] == 16
    assert deployed.current() == before and deployed.releases() == releases
    assert device["release"] == before and device["plan"]["current"] == before
    assert {k["smoke"] for k in device["kernels"]} == {"unchanged", "skipped"}
    assert device["startup"] is None and device["models"][0]["ok"] is None
    assert set(device["origin"].values()) == {"reused"} and len(device["origin"]) == 16
    assert device["fingerprint"]["id"] and device["cache_file"]


def test_noop_push_is_answered_by_the_boards_shell(deployed: Deployed) -> None:
    before, releases, log_before = deployed.current(), deployed.releases(), deployed.sshd_log()
    code, device = _push(deployed)
    assert code == 0
    _assert_noop(deployed, device, before, releases)
    assert device["shell_noop"] is True  # the push before armed the board: no agent started
    assert set(device["stages"]) == {"connect", "pull", "smoke"}  # no `state`: pull and smoke found nothing to do
    assert _sessions(deployed.sshd_log()[len(log_before):]) == (1, 1)
    assert device["bytes_sent"] < 1024 and device["bytes_received"] < 256  # a command and the release's id


def test_noop_push_through_the_agent_is_one_command_then_arms_the_shell(deployed: Deployed) -> None:
    (deployed.rd / "noop").unlink()  # as a board armed by no deploy (or by another version) is
    before, releases, log_before = deployed.current(), deployed.releases(), deployed.sshd_log()
    code, device = _push(deployed)
    assert code == 0 and device["shell_noop"] is False
    _assert_noop(deployed, device, before, releases)
    assert set(device["stages"]) == {"connect", "state", "pull", "smoke", "arm"}  # no fingerprint: the stamp held
    assert _sessions(deployed.sshd_log()[len(log_before):]) == (1, 1)
    assert device["bytes_sent"] < 1024  # the state, noop and bye requests
    code, device = _push(deployed)
    assert code == 0 and device["shell_noop"] is True  # armed again


def test_the_shells_noop_starts_no_python(deployed: Deployed) -> None:
    import yaml

    document = yaml.safe_load(deployed.fleet.inventory.read_text())
    document["defaults"]["python"] = "/nonexistent/python3"
    inventory = deployed.fleet.folder / "no-python.yml"
    inventory.write_text(yaml.safe_dump(document))
    code, device = _run(deployed, inventory)
    assert code == 0 and device["shell_noop"] is True, device
    (deployed.kernels / "relu.cl").touch()  # same content: still a no-op, still the shell's
    code, device = _run(deployed, inventory)
    assert code == 0 and device["shell_noop"] is True, device


@pytest.mark.parametrize("change", ["driver", "current", "cache file", "token", "local record"])
def test_any_change_the_shell_cannot_vouch_for_goes_to_the_agent(deployed: Deployed, change: str) -> None:
    """The shell answers only for the release, driver and files it was armed with; anything else is the
    agent's to judge (and the push through it arms the board again)."""
    before = deployed.current()
    probe = (deployed.rd / "noop.probe").read_text()
    if change == "driver":  # the size, mtime or inode of an ICD file or a library: here a new mtime second
        stat = next(line for line in probe.splitlines() if line.startswith("stat "))
        icd = next(p for p in shlex.split(stat) if p.endswith(".icd"))
        os.utime(icd, (os.stat(icd).st_atime, os.stat(icd).st_mtime + 5))
    elif change == "current":  # another deploy (or a hand) moved `current`, even to the same content
        shutil.copytree(deployed.rd / "releases" / before, deployed.rd / "releases" / COPY, symlinks=True)
        (deployed.rd / "current.tmp").symlink_to(f"releases/{COPY}")
        os.rename(deployed.rd / "current.tmp", deployed.rd / "current")
    elif change == "cache file":  # rewritten on the board: a new inode
        cache = deployed.rd / "current" / "build" / "mace_cl_compiled_program.bin"
        data = cache.read_bytes()
        cache.unlink()
        cache.write_bytes(data)
    elif change == "token":
        line = (deployed.rd / "noop").read_text()
        (deployed.rd / "noop").write_text(("0" if line[0] != "0" else "1") + line[1:])
    else:  # this controller's record of what it armed: a push from a fresh cache offers nothing
        (deployed.cache / "inc-01" / "noop.json").unlink()
    try:
        code, device = _push(deployed)
        assert code == 0 and device["ok"] and device["shell_noop"] is False, device
        assert "state" in device["stages"] and "arm" in device["stages"]
        code, device = _push(deployed)
        assert code == 0 and device["shell_noop"] is True, device
    finally:
        if deployed.current() != before:
            (deployed.rd / "current.tmp").symlink_to(f"releases/{before}")
            os.rename(deployed.rd / "current.tmp", deployed.rd / "current")
            shutil.rmtree(deployed.rd / "releases" / COPY)
            assert _push(deployed)[0] == 0


COPY = "20000101T000000-c0ffee"  # a release id older than any push's


def test_a_shell_answer_naming_no_release_fails_that_device(deployed: Deployed) -> None:
    answer = deployed.rd / "noop.json"
    saved = answer.read_text()
    try:
        answer.write_text('{"op": "noop", "current": "../../etc"}\n')  # a board's word is checked as any reply
        code, device = _push(deployed)
        assert code == 1 and not device["ok"] and device["failed_stage"] == "connect", device
        assert "no id" in device["error"]
    finally:
        answer.write_text(saved)


def test_one_kernel_changed_moves_one_file_and_rebuilds_one_program(deployed: Deployed) -> None:
    relu = deployed.kernels / "relu.cl"
    original = relu.read_text()
    previous = deployed.current()
    try:
        relu.write_text(original + "\n// a comment changes the source hash\n")
        code, device = _push(deployed)
        assert code == 0 and device["ok"], device
        plan = device["plan"]
        assert plan["upload"] == ["kernels/relu.cl"] and plan["unchanged"] == 12
        assert plan["rebuild"] == ["relu -DDATA_TYPE=float"] and plan["reuse"] == 15
        assert device["changed"] is True and device["pulled"] is True
        assert device["bytes_sent"] <= 2 * relu.stat().st_size + 4096, device["bytes_sent"]
        smoked = {k["name"]: k["smoke"] for k in device["kernels"]}
        assert smoked["relu[f32]"] == "passed"
        assert smoked["saxpy[f32]"] == "unchanged" and smoked["matmul[f32]"] == "unchanged"
        assert device["models"][0]["ok"] is True  # the model uses relu: it ran again, and matched numpy
        assert [p["key"] for p in device["startup"]["programs"]] == ["relu -DDATA_TYPE=float"]
        new = deployed.rd / "releases" / deployed.current()
        old = deployed.rd / "releases" / previous
        assert new != old
        # unchanged files are hard links of the previous release's; the changed one is new
        assert (new / "kernels/conv2d.cl").stat().st_ino == (old / "kernels/conv2d.cl").stat().st_ino
        assert (new / "models/tiny_cnn.npz").stat().st_ino == (old / "models/tiny_cnn.npz").stat().st_ino
        assert (new / "kernels/relu.cl").read_text() == relu.read_text()
        manifest = json.loads((new / "build/manifest.json").read_text())
        old_manifest = json.loads((old / "build/manifest.json").read_text())
        shas = {p["key"]: p["sha256"] for p in manifest["programs"]}
        old_shas = {p["key"]: p["sha256"] for p in old_manifest["programs"]}
        assert {k for k in shas if shas[k] != old_shas[k]} == {"relu -DDATA_TYPE=float"}
        local = (deployed.cache / "inc-01" / "mace_cl_compiled_program.bin").read_bytes()
        assert local == (new / "build/mace_cl_compiled_program.bin").read_bytes()
    finally:
        relu.write_text(original)
        code, device = _push(deployed)
        assert code == 0 and device["plan"]["rebuild"] == ["relu -DDATA_TYPE=float"]


def test_check_prints_the_plan_and_changes_nothing(deployed: Deployed, cli: Cli, tmp_path: Path) -> None:
    softmax = deployed.kernels / "softmax.cl"
    original = softmax.read_text()
    current, releases = deployed.current(), deployed.releases()
    rd_files = sorted(str(p) for p in deployed.rd.rglob("*"))
    try:
        softmax.write_text(original + "\n// changed\n")
        run = cli("push", "--check", "--fleet", deployed.fleet.inventory, "--kernels", deployed.kernels,
                  "--cache", deployed.cache, "--model", MODEL)
        assert run.code == 0, run.err
        assert "kernels/softmax.cl" in run.out and "softmax -DDATA_TYPE=float" in run.out
        assert "would rebuild 1 program(s), reuse 15" in run.out and "nothing was changed" in run.out
        assert deployed.current() == current and deployed.releases() == releases
        assert sorted(str(p) for p in deployed.rd.rglob("*")) == rd_files
    finally:
        softmax.write_text(original)


def test_check_on_a_device_never_pushed_creates_nothing_there(make_fleet: Any, cli: Cli, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("fresh-01")])
    home = Path(fleet.device("fresh-01").folder) / "home"
    before = sorted(str(p) for p in home.rglob("*"))
    leftovers = set(Path("/tmp").glob("deployer-check-*"))
    run = cli("push", "--check", "--json", "--fleet", fleet.inventory, "--kernels", KERNELS, "--cache",
              tmp_path / "cache")
    assert run.code == 0, run.err
    device = run.json()["devices"][0]
    assert run.json()["check"] is True and device["plan"]["current"] is None
    assert len(device["plan"]["upload"]) == 11 and len(device["plan"]["rebuild"]) == 16
    assert sorted(str(p) for p in home.rglob("*")) == before  # not even the agent or the remote dir
    assert set(Path("/tmp").glob("deployer-check-*")) == leftovers  # its temp copy removed itself
    assert not (tmp_path / "cache").exists()


def test_smoke_always_reruns_everything_and_never_runs_nothing(deployed: Deployed) -> None:
    code, device = _push(deployed, "--smoke", "always")
    assert code == 0 and device["changed"] is False
    smoked = [k for k in device["kernels"] if k["smoke"] == "passed"]
    assert len(smoked) == 24 and device["models"][0]["ok"] is True
    assert len(device["startup"]["programs"]) == 16
    code, device = _push(deployed, "--smoke", "never")
    assert code == 0 and not any(k["smoke"] == "passed" for k in device["kernels"])
    assert device["startup"] is None


def test_smoke_inputs_are_kept_on_the_device_by_hash(deployed: Deployed) -> None:
    blobs = {p.name for p in (deployed.rd / "blobs").iterdir()}
    assert blobs, "the cold push stored its smoke inputs"
    code, device = _push(deployed, "--smoke", "always")
    assert code == 0
    assert device["bytes_sent"] < 16 << 10, device["bytes_sent"]  # requests only: the inputs stayed there
    assert {p.name for p in (deployed.rd / "blobs").iterdir()} == blobs


def test_a_driver_change_fingerprints_again_but_rebuilds_only_if_the_fingerprint_changed(
        deployed: Deployed) -> None:
    import yaml

    document = yaml.safe_load(deployed.fleet.inventory.read_text())
    document["defaults"]["env"] = {"POCL_AFFINITY": "0"}  # a driver variable: the stamp changes
    inventory = deployed.fleet.folder / "stamped.yml"
    inventory.write_text(yaml.safe_dump(document))
    code, device = _run(deployed, inventory)
    assert code == 0 and "fingerprint" in device["stages"]  # asked the driver again
    assert device["plan"]["rebuild"] == [] and device["changed"] is False  # same fingerprint id: same binaries
    code, device = _run(deployed, inventory)
    assert "fingerprint" not in device["stages"]  # remembered under the new stamp


def _run(deployed: Deployed, inventory: Path) -> tuple[int, dict[str, Any]]:
    fleet = deployed.fleet
    saved = fleet.inventory.read_text()
    try:
        fleet.inventory.write_text(inventory.read_text())
        return _push(deployed)
    finally:
        fleet.inventory.write_text(saved)


def test_a_removed_model_drops_its_file_and_reuses_every_binary(deployed: Deployed) -> None:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["push", "--fleet", str(deployed.fleet.inventory), "--kernels", str(deployed.kernels),
                     "--cache", str(deployed.cache), "--json"])
    device = json.loads(out.getvalue())["devices"][0]
    try:
        assert code == 0, device
        assert device["plan"]["removed"] == ["models/tiny_cnn.json", "models/tiny_cnn.npz"]
        assert device["plan"]["rebuild"] == [] and device["changed"] is True and device["pulled"] is False
        release = deployed.rd / "releases" / deployed.current()
        assert not (release / "models").exists()
        assert (release / "build/mace_cl_compiled_program.bin").stat().st_nlink >= 2  # linked, not rebuilt
    finally:
        code, device = _push(deployed)
        assert code == 0 and device["plan"]["upload"] == ["models/tiny_cnn.json", "models/tiny_cnn.npz"]


def test_a_file_changed_during_the_push_fails_that_device_and_lands_nowhere(deployed: Deployed) -> None:
    relu = deployed.kernels / "relu.cl"
    original = relu.read_text()
    current, releases = deployed.current(), deployed.releases()
    library = load_library(deployed.kernels)
    try:
        relu.write_text(original + "\n// planned\n")
        files = local_files(release_paths(library, []), HashIndex(None))  # hashed: the plan's content
        relu.write_text(original + "\n// edited after planning\n")  # ... and edited before it is read
        job = PushJob(library=library, smoke=Smoke(library, plan_smoke(library, load_references(library))), files=files,
                      cache=deployed.cache, mace_version="")
        devices = load_inventory(deployed.fleet.inventory).devices
        outcome = run_fleet(devices, job, forks=1, progress=Progress()).outcomes[0]
        assert not outcome.ok and outcome.failed_stage == "upload"
        assert "relu.cl changed during the push" in (outcome.error or "")
        assert deployed.current() == current and deployed.releases() == releases
    finally:
        relu.write_text(original)


def test_the_hash_index_hashes_a_file_once_per_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "model.bin"
    big.write_bytes(os.urandom(1 << 20))
    os.utime(big, (1e9, 1e9))  # old enough to be trusted (git's racy-file rule)
    hashed: list[Path] = []
    real = plan_module._hash_file

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)
    monkeypatch.setattr(plan_module, "_hash_file", counting)
    index_file = tmp_path / "index.json"
    first = local_files([("models/model.bin", big)], HashIndex(index_file))
    again = local_files([("models/model.bin", big)], HashIndex(index_file))  # a new run reads the index
    assert first == again and hashed == [big]
    big.write_bytes(os.urandom(1 << 20))
    changed = local_files([("models/model.bin", big)], HashIndex(index_file))
    assert changed[0].sha256 != first[0].sha256 and hashed == [big, big]
    fresh = local_files([("models/model.bin", big)], HashIndex(index_file))  # too recent to be trusted
    assert fresh == changed and len(hashed) == 3


def test_a_damaged_manifest_on_the_device_means_rebuild_not_trust(deployed: Deployed) -> None:
    manifest = deployed.rd / "current" / "build" / "manifest.json"
    manifest.unlink()  # never written in place: earlier releases hard-link the same file
    manifest.write_text("{not json")
    code, device = _push(deployed)
    assert code == 0 and device["ok"], device
    assert len(device["plan"]["rebuild"]) == 16 and device["changed"] is True
    code, device = _push(deployed)
    assert code == 0 and device["plan"]["new_release"] is False  # and the next push is a no-op again


def test_references_checked_before_do_not_run_again(deployed: Deployed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's references ran (and passed) on an earlier push of these very files: a no-op neither runs
    them again nor makes the smoke plan (no numpy for a library without models: tasks/smoke.py)."""
    references = deployed.kernels / "reference.py"
    original = references.read_text()
    mark = deployed.fleet.folder / "references-ran"
    try:
        references.write_text("import os as _os\nif _os.environ.get('REF_MARK'):\n"
                              "    open(_os.environ['REF_MARK'], 'a').write('ran')\n" + original)
        assert _push(deployed)[0] == 0  # changed: they run before any device, and are remembered
        monkeypatch.setenv("REF_MARK", str(mark))
        code, device = _push(deployed)
        assert code == 0 and device["shell_noop"] is True and not mark.exists()
        job = prepare_push(deployed.kernels, [], deployed.cache)
        assert job.smoke.made is False  # and its outline names the cases the plan would make, in its order
        assert job.smoke.outline == [(c.id, c.program_key) for c in job.smoke.plan().cases]
        mark.unlink()  # plan() ran them
        (deployed.cache / ".smoke-checked.json").unlink()  # a cache that never saw them: they run again
        assert _push(deployed)[0] == 0 and mark.read_text() == "ran"
    finally:
        references.write_text(original)
    assert _push(deployed)[0] == 0


def test_a_changed_reference_runs_again_before_any_device_even_on_a_noop(deployed: Deployed) -> None:
    references = deployed.kernels / "reference.py"
    original = references.read_text()
    log_before = deployed.sshd_log()
    try:
        references.write_text(original.replace("def relu(x, n):\n", "def relu(x, n):\n    raise ValueError('no')\n"))
        code, _ = _push_expecting_input_error(deployed)
        assert code == 2
        assert _sessions(deployed.sshd_log()[len(log_before):]) == (0, 0)  # no device was touched
    finally:
        references.write_text(original)
    code, device = _push(deployed)  # the file as it was: checked before, so a no-op again
    assert code == 0 and device["shell_noop"] is True


def _push_expecting_input_error(deployed: Deployed) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["push", "--fleet", str(deployed.fleet.inventory), "--kernels", str(deployed.kernels),
                     "--cache", str(deployed.cache), "--model", str(MODEL), "--json"])
    assert "relu() raised ValueError: no" in err.getvalue(), err.getvalue()
    return code, err.getvalue()
