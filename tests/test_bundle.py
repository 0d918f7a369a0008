"""The agent as a bundle on the board (docs/design.md, sections 1 and 11).

- Build keys follow the binaries: a change to a board module that does not make binaries (collect's) uploads a
  new bundle and rebuilds nothing; a change to one that does (build) rebuilds every program.
- A board pushed by the last version with the one-file agent takes the bundle layout: the new bundle is
  uploaded and runs, `current` switches to a release built by it, and the next push is a no-op.
Each runs real `deploy` processes, the changed code from a copy of the package on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployer.protocol.bundle import agent_bundle, build_bundle
from deployer.sim.fleet import DeviceSpec, Fleet
from tests.conftest import REPO
from tests.test_faults import _saxpy_only

MakeFleet = Callable[..., Fleet]
# The last landed commit whose agent was one file (deployer/agent_main.py, RD/agent/agent_<sha12>.py).
ONE_FILE_AGENT = "01cd476c82e8f4e87f23dce595b37ee80bb9b4ad"
SAXPY = "saxpy -DDATA_TYPE=float"


def deploy(code: Path, *args: str | Path) -> dict[str, Any]:
    """`deploy push ... --json` run by the package under `code`; the one device's JSON record."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    run = subprocess.run([sys.executable, "-m", "deployer", "push", *map(str, args), "--json"], cwd=code,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    devices = json.loads(run.stdout)["devices"]
    assert len(devices) == 1 and devices[0]["ok"], devices
    return dict(devices[0])


def changed_copy(tmp_path: Path, name: str, module: str) -> Path:
    """A copy of this checkout's package with one board module changed (a comment appended)."""
    root = tmp_path / name
    shutil.copytree(REPO / "deployer", root / "deployer", ignore=shutil.ignore_patterns("__pycache__"))
    with open(root / "deployer" / "remote" / module, "a") as handle:
        handle.write(f"\n# changed by {name}\n")
    return root


def remote_dir(fleet: Fleet) -> Path:
    return Path(fleet.device("sim-01").folder) / "home" / ".deployer"


def test_the_identity_is_the_content_not_the_copy(tmp_path: Path) -> None:
    """Two controllers with the same code agree on the bundle's identity, wherever and however their copy was
    made; any byte, and the build identity only for the modules that make binaries, changes it."""
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "deployer" / "remote", copy, ignore=shutil.ignore_patterns("__pycache__"))
    for module in copy.iterdir():
        os.utime(module, (1e9, 1e9))
    (copy / "notes.txt").write_text("not a module: never shipped")
    ours, theirs = agent_bundle(), build_bundle(copy)
    assert (theirs.id, theirs.build_id, theirs.files) == (ours.id, ours.build_id, ours.files)
    assert [path for path, _ in ours.files] == sorted(path for path, _ in ours.files)
    (copy / "smoke.py").write_bytes((copy / "smoke.py").read_bytes() + b" ")
    assert build_bundle(copy).id != ours.id and build_bundle(copy).build_id == ours.build_id
    (copy / "mace.py").write_bytes((copy / "mace.py").read_bytes() + b" ")
    assert build_bundle(copy).build_id != ours.build_id


def test_build_keys_follow_the_modules_that_make_binaries(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01")])
    library = _saxpy_only(tmp_path, "keys")
    push = ("--fleet", fleet.inventory, "--kernels", library, "--cache", tmp_path / "cache")
    first = deploy(REPO, *push)
    assert first["plan"]["rebuild"] == [SAXPY]

    collect_changed = changed_copy(tmp_path, "collect-changed", "collect.py")
    other = build_bundle(collect_changed / "deployer" / "remote")
    assert other.id != agent_bundle().id and other.build_id == agent_bundle().build_id
    second = deploy(collect_changed, *push)
    assert second["plan"]["rebuild"] == [] and second["plan"]["new_release"] is False, second["plan"]
    assert second["bytes_sent"] > sum(len(data) for _, data in other.files)  # the new bundle travelled and ran
    assert (remote_dir(fleet) / "agent" / other.id12 / "deployer_remote" / "collect.py").exists()

    build_changed = changed_copy(tmp_path, "build-changed", "build.py")
    third = deploy(build_changed, *push)
    assert third["plan"]["rebuild"] == [SAXPY] and third["plan"]["reuse"] == 0, third["plan"]


def _one_file_agent_checkout(tmp_path: Path) -> Path:
    root = tmp_path / "previous"
    root.mkdir()
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ONE_FILE_AGENT, "deployer"],
                                 capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"this test needs the git history of the repository (commit {ONE_FILE_AGENT[:7]}): {exc}")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True, timeout=60)
    assert (root / "deployer" / "agent_main.py").exists()
    return root


def test_a_board_of_the_one_file_agent_upgrades_cleanly(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = make_fleet([DeviceSpec("sim-01")])
    library = _saxpy_only(tmp_path, "upgrade")
    manifest = library / "kernels.yml"  # the old controller predates bench_sizes: a library it can read
    manifest.write_text("".join(line for line in manifest.read_text().splitlines(keepends=True)
                                if "bench_sizes:" not in line))
    push = ("--fleet", fleet.inventory, "--kernels", library, "--cache", tmp_path / "cache")
    rd = remote_dir(fleet)

    before = deploy(_one_file_agent_checkout(tmp_path), *push)
    old_agents = [p.name for p in (rd / "agent").glob("agent_*.py")]
    assert len(old_agents) == 1 and before["plan"]["rebuild"] == [SAXPY]
    old_current = os.readlink(rd / "current")

    after = deploy(REPO, *push)  # same library, same local cache: only the agent differs
    bundle = agent_bundle()
    assert (rd / "agent" / bundle.id12 / "deployer_remote" / "main.py").exists()
    assert after["plan"]["current"] == old_current.split("/")[-1]
    assert after["plan"]["rebuild"] == [SAXPY]  # the one full rebuild when a board first meets the bundle
    assert os.readlink(rd / "current") != old_current
    manifest = json.loads((rd / "current" / "build" / "manifest.json").read_text())
    assert manifest["cache_sha256"] == json.loads((tmp_path / "cache" / "sim-01" / "manifest.json").read_text())[
        "cache_sha256"]

    again = deploy(REPO, *push)
    assert again["plan"]["new_release"] is False and again["plan"]["rebuild"] == [], again["plan"]
    assert again["bytes_sent"] < 4096  # the bundle is stored: the run command found it
