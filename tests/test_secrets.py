"""A planted secret: a marker in `env`, `vars`, a playbook's `shell` step and the passphrase of the device's
key is searched for in everything a run writes and shows. It may only be where the user put it: the
inventory and the playbook, and `vars` (the inventory's settings, not secrets: docs/inventory.md) in
`inventory list`, which shows the inventory. The key is encrypted and logs in through a real ssh-agent's
copy (`ssh-add`, its passphrase from SSH_ASKPASS); a second encrypted key, not in the agent, fails its run
with "key K is encrypted", and that run is searched too."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deployer.sim.fleet import DeviceSpec
from tests.conftest import Cli, start_ssh_agent
from tests.test_faults import MakeFleet, device_entry, edit_inventory
from tests.test_run import small_kernels, write_playbook

MARKER = "s3cr3t-7f3a9c"
VARS_MARKER = "v4rs-51e2b8"
KEY_MARKER = "p4ssphr4se-c0d9e1"

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


@contextmanager
def ssh_agent_holding(key: Path, folder: Path) -> Iterator[Path]:
    """A real ssh-agent on a socket in `folder` holding `key` (its passphrase, KEY_MARKER, given to `ssh-add`
    through SSH_ASKPASS: no terminal here); stopped by PID."""
    sock, askpass = folder / "agent.sock", folder / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\necho '{KEY_MARKER}'\n")
    askpass.chmod(0o700)
    agent = start_ssh_agent(sock)
    try:
        subprocess.run(["ssh-add", "-q", str(key)], check=True, stdin=subprocess.DEVNULL, timeout=20, env={
            **os.environ, "SSH_AUTH_SOCK": str(sock), "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
            "DISPLAY": ":0"})
        yield sock
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def sealed_key(path: Path, authorized_keys: Path | None) -> Path:
    """An ed25519 key encrypted with KEY_MARKER, authorised on the device when `authorized_keys` is given."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", KEY_MARKER, "-f", str(path)], check=True, timeout=30)
    if authorized_keys is not None:
        with open(authorized_keys, "ab") as keys:
            keys.write(Path(f"{path}.pub").read_bytes())
    return path


def _files(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_a_planted_secret_is_nowhere_a_run_writes_or_shows(make_fleet: MakeFleet, cli: Cli, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    fleet = make_fleet([DeviceSpec("sim-01")])
    keys = tmp_path / "keys"  # the user's: not searched (the askpass script holds the passphrase)
    keys.mkdir()
    key = sealed_key(keys / "sealed", Path(fleet.device("sim-01").folder) / "home" / ".ssh" / "authorized_keys")
    other = sealed_key(keys / "not-in-agent", None)
    inventory = edit_inventory(fleet, lambda doc: device_entry(doc, "sim-01").update(
        env={"API_TOKEN": MARKER}, vars={"api_token": VARS_MARKER}, identity_file=str(key)))
    play = tmp_path / "play"
    small_kernels(play / "kernels")
    playbook = write_playbook(play, PLAYBOOK)
    crashes_before = set(Path(tempfile.gettempdir()).glob("deploy-crash-*"))
    cache, history, reports = tmp_path / "cache", tmp_path / "history.db", tmp_path / "reports"
    with ssh_agent_holding(key, keys) as sock:  # the key logs in through the agent's copy
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        runs = [
            cli("run", playbook, "--fleet", inventory, "--history", history, "--cache", cache, "--report", reports,
                "--json"),
            cli("run", playbook, "--fleet", inventory, "--history", history, "--cache", cache),
            cli("push", "--fleet", inventory, "--kernels", play / "kernels", "--cache", cache, "--json"),
            cli("collect", "--fleet", inventory, "--cache", cache, "--json"),
            cli("inventory", "list", "--fleet", inventory, "--json"),
            cli("inventory", "check", "--fleet", inventory),
        ]
    monkeypatch.delenv("SSH_AUTH_SOCK")  # no agent: the other sealed key is that device's clear error
    locked_out = edit_inventory(fleet, lambda doc: device_entry(doc, "sim-01").update(identity_file=str(other)))
    sealed = cli("push", "--fleet", locked_out, "--kernels", play / "kernels", "--cache", tmp_path / "c2", "--json")
    assert [r.code for r in runs] == [0] * len(runs), [(r.code, r.err[-500:]) for r in runs]
    assert sealed.code == 1 and f"key {other} is encrypted" in sealed.json()["devices"][0]["error"], sealed.out
    runs.append(sealed)
    assert "token-seen" in runs[0].out  # the shell step saw the secret: it reached the board
    for run in runs:
        for marker in (MARKER, KEY_MARKER):
            assert marker not in run.out and marker not in run.err
    for run in runs[:4]:  # every command but `inventory list`, which shows the inventory's vars
        assert VARS_MARKER not in run.out and VARS_MARKER not in run.err
    board = Path(fleet.device("sim-01").folder)
    written = _files(cache, tmp_path / "c2", reports, tmp_path / "state", board / "home" / ".deployer") + [history]
    written += [Path(fleet.device("sim-01").log)]
    written += sorted(set(Path(tempfile.gettempdir()).glob("deploy-crash-*")) - crashes_before)
    assert history.exists() and (reports / "report.html").exists() and (cache / "last-run.json").exists()
    markers = (MARKER, VARS_MARKER, KEY_MARKER)
    found = [str(p) for p in written for marker in markers if marker.encode() in p.read_bytes()]
    assert found == [], found
    assert os.environ.get("API_TOKEN") is None  # nor did it leak into the controller's own environment
