"""A planted secret: a marker in `env`, `vars` and a playbook's `shell` step is searched for in everything a
run writes and shows. It may only be where the user put it: the inventory and the playbook, and `vars` (the
inventory's settings, not secrets: docs/inventory.md) in `inventory list`, which shows the inventory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from deployer.sim.fleet import DeviceSpec
from tests.conftest import Cli
from tests.test_faults import MakeFleet, device_entry, edit_inventory
from tests.test_run import small_kernels, write_playbook

MARKER = "s3cr3t-7f3a9c"
VARS_MARKER = "v4rs-51e2b8"

PLAYBOOK = f"""\
name: night
steps:
  - health:
      min_free_mb: 1
  - push:
      kernels: kernels
  - name: token
    shell:
      command: 'test "$API_TOKEN" = "{MARKER}" && echo token-seen  # {MARKER}'
      metrics:
        regex: '(?P<seen>token-seen)'
"""


def _files(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_a_planted_secret_is_nowhere_a_run_writes_or_shows(make_fleet: MakeFleet, cli: Cli, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    fleet = make_fleet([DeviceSpec("sim-01")])
    inventory = edit_inventory(fleet, lambda doc: device_entry(doc, "sim-01").update(
        env={"API_TOKEN": MARKER}, vars={"api_token": VARS_MARKER}))
    play = tmp_path / "play"
    small_kernels(play / "kernels")
    playbook = write_playbook(play, PLAYBOOK)
    crashes_before = set(Path(tempfile.gettempdir()).glob("deploy-crash-*"))
    cache, history, reports = tmp_path / "cache", tmp_path / "history.db", tmp_path / "reports"
    runs = [
        cli("run", playbook, "--fleet", inventory, "--history", history, "--cache", cache, "--report", reports,
            "--json"),
        cli("run", playbook, "--fleet", inventory, "--history", history, "--cache", cache),
        cli("push", "--fleet", inventory, "--kernels", play / "kernels", "--cache", cache, "--json"),
        cli("collect", "--fleet", inventory, "--cache", cache, "--json"),
        cli("inventory", "list", "--fleet", inventory, "--json"),
        cli("inventory", "check", "--fleet", inventory),
    ]
    assert [r.code for r in runs] == [0] * len(runs), [(r.code, r.err[-500:]) for r in runs]
    assert "token-seen" in runs[0].out  # the shell step saw the secret: it reached the board
    for run in runs:
        assert MARKER not in run.out and MARKER not in run.err
    for run in runs[:4]:  # every command but `inventory list`, which shows the inventory's vars
        assert VARS_MARKER not in run.out and VARS_MARKER not in run.err
    board = Path(fleet.device("sim-01").folder)
    written = _files(cache, reports, tmp_path / "state", board / "home" / ".deployer") + [history]
    written += [Path(fleet.device("sim-01").log)]
    written += sorted(set(Path(tempfile.gettempdir()).glob("deploy-crash-*")) - crashes_before)
    assert history.exists() and (reports / "report.html").exists() and (cache / "last-run.json").exists()
    found = [str(p) for p in written for marker in (MARKER, VARS_MARKER) if marker.encode() in p.read_bytes()]
    assert found == [], found
    assert os.environ.get("API_TOKEN") is None  # nor did it leak into the controller's own environment
