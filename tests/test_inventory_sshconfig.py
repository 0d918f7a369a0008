"""The ssh config through Paramiko's SSHConfig (Match blocks, Include, refusing Match exec) and `--fleet
ssh:alias,...`. The older behaviours (Host patterns, first value wins, tokens, syntax errors) stay covered by
tests/test_inventory.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.config import sshconfig
from deployer.config.inventory import load_inventory
from deployer.errors import InputError, InventoryError, Where
from tests.conftest import Cli, private_home


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "home"
    (folder / ".ssh").mkdir(parents=True)
    with private_home(folder):
        yield folder


def test_match_blocks_apply(home: Path) -> None:
    """The hand-written reader skipped Match blocks, so these hosts got the wrong user and port."""
    config = home / ".ssh" / "config"
    config.write_text(
        "Match originalhost *.lab\n  User labber\nMatch host 10.1.*\n  Port 2201\n"
        "Host pi\n  HostName 10.1.0.5\nMatch localuser tester\n  IdentityFile ~/.ssh/mine\n"
        "Match all\n  User everyone\n"
    )
    seen = sshconfig.resolve("a.lab")
    assert (seen.user, seen.port, seen.identity_file) == ("labber", None, str(home / ".ssh/mine"))
    pi = sshconfig.resolve("pi")
    assert (pi.hostname, pi.port, pi.user) == ("10.1.0.5", 2201, "everyone")  # Match host sees the HostName


def test_match_exec_is_refused_with_its_line(home: Path) -> None:
    config = home / ".ssh" / "config"
    config.write_text("Host pi\n  User pi\n\nMatch host pi exec \"test -f /tmp/x\"\n  User other\n")
    with pytest.raises(InputError) as caught:
        sshconfig.load_ssh_config()
    assert caught.value.where == Where(str(config), 4) and caught.value.field == "Match"
    assert "would run a command" in caught.value.problem


def test_include_is_followed(home: Path) -> None:
    ssh = home / ".ssh"
    (ssh / "config.d").mkdir()
    (ssh / "config.d" / "10-lab").write_text("Host lab-*\n  User labber\n  Port 2022\n")
    (ssh / "config.d" / "20-more").write_text("Host lab-9\n  HostName 10.9.9.9\n")
    (ssh / "config").write_text(
        "Include config.d/*\nHost pi\n  Include ~/.ssh/pi-extra\n  Port 2200\nHost *\n  User everyone\n"
    )
    (ssh / "pi-extra").write_text("HostName 10.0.0.7\n")
    lab = sshconfig.resolve("lab-9")
    assert (lab.hostname, lab.user, lab.port) == ("10.9.9.9", "labber", 2022)
    pi = sshconfig.resolve("pi")
    assert (pi.hostname, pi.port, pi.user) == ("10.0.0.7", 2200, "everyone")  # the Host pi block goes on


def test_include_errors_name_the_include_line(home: Path) -> None:
    ssh = home / ".ssh"
    (ssh / "config").write_text("Host a\n  User b\nInclude loop\n")
    (ssh / "loop").write_text("Include loop\n")
    with pytest.raises(InputError, match=r"includes nested over 16 deep") as caught:
        sshconfig.load_ssh_config()
    assert caught.value.field == "Include"
    os.mkfifo(ssh / "fifo")
    (ssh / "config").write_text("Host a\n  Include fifo\n")
    with pytest.raises(InputError, match=r"not a regular file") as caught:
        sshconfig.load_ssh_config()
    assert caught.value.where == Where(str(ssh / "config"), 2)
    (ssh / "config").write_text("Include\n")
    with pytest.raises(InputError, match=r"missing value"):
        sshconfig.load_ssh_config()


def test_a_missing_include_is_nothing(home: Path) -> None:
    (home / ".ssh" / "config").write_text("Include nothing-here/*\nHost pi\n  User pi\n")
    assert sshconfig.resolve("pi").user == "pi"


# --- --fleet ssh:alias,... -----------------------------------------------------------------------------------

CONFIG = """\
Host pi-01
  HostName 10.0.0.1
  User pi
Host pi-02 pi-03
  HostName %h.lab
  Port 2200
  ProxyJump pi-01
Host *.lab
  User labber
"""


def test_ssh_aliases_as_a_fleet(home: Path, cli: Cli) -> None:
    (home / ".ssh" / "config").write_text(CONFIG)
    inventory = load_inventory("ssh:pi-01, pi-03,pi-01")
    assert [d.name for d in inventory.devices] == ["pi-01", "pi-03"] and inventory.format == "ssh"
    one, three = inventory.devices
    assert (one.host, one.port, one.user) == ("10.0.0.1", 22, "pi")
    assert (three.host, three.port, three.user, three.proxy_jump) == ("pi-03.lab", 2200, "tester", "pi-01")
    assert [(j.host, j.user) for j in three.jumps] == [("10.0.0.1", "pi")]
    run = cli("inventory", "check", "--fleet", "ssh:pi-01,pi-02", "--limit", "pi-02")
    assert run.code == 0 and "1 device(s) selected" in run.out


@pytest.mark.parametrize(
    ("fleet", "words"),
    [
        ("ssh:pi-1", "'pi-1' is no Host alias of {config}; did you mean 'pi-01'? (aliases: pi-01, pi-02, pi-03)"),
        ("ssh:x.lab", "'x.lab' is no Host alias"),  # a pattern is no alias
        ("ssh:", "no aliases: write ssh:alias1,alias2"),
        ("ssh:pi_01/x", "'pi_01/x' is no Host alias"),
    ],
)
def test_ssh_alias_errors(home: Path, fleet: str, words: str) -> None:
    (home / ".ssh" / "config").write_text(CONFIG)
    with pytest.raises(InventoryError) as caught:
        load_inventory(fleet)
    assert words.format(config=home / ".ssh" / "config") in str(caught.value)
    assert caught.value.where == Where(fleet)


def test_ssh_alias_with_a_broken_config(home: Path, cli: Cli) -> None:
    (home / ".ssh" / "config").write_text("Host pi-01\n  Match exec true\n")
    run = cli("inventory", "list", "--fleet", "ssh:pi-01")
    assert run.code == 2 and f"{home}/.ssh/config:2: field 'Match'" in run.err and "Traceback" not in run.err


SSH_LINES = [
    "Host a", "Host *", "Host !a b", "Match all", "Match host a", "Match originalhost a user b", "Match canonical",
    "Match final", "Match nonsense", "Match exec x", "Match localuser tester", "  HostName %h.lab", "  HostName %",
    "  User %r", "  Port 22", "  Port x", "  IdentityFile ~/%n %d", "  ProxyJump a,b", "  Include none/*",
    "  UserKnownHostsFile %d/k", "  StrictHostKeyChecking no", "Host \"a", "= x", "  User", "  Foo bar", "",
]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(SSH_LINES), max_size=8), st.sampled_from(["a", "b", "x.lab", "A"]))
def test_any_ssh_config_reads_or_names_its_line(lines: list[str], alias: str) -> None:
    try:
        seen = sshconfig.parse_ssh_config("\n".join(lines) + "\n", "cfg").resolve(alias)
    except InputError as error:
        assert error.where is not None and error.where.file == "cfg" and error.where.line >= 1, str(error)
    else:
        assert seen.alias == alias
