"""The inventory loader, `--limit` selection, `describe` and the ssh config reader: all pure, no device.

Error cases are a table (YAML in; file:line, device, field and problem out), like pyinfra's JSON cases.
Hypothesis checks that any text or bytes either load or raise `InventoryError` with a file:line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.config import sshconfig
from deployer.config.inventory import Device, Inventory, describe, load_inventory, parse_inventory
from deployer.config.selection import select
from deployer.errors import InputError, InventoryError, Where
from tests.conftest import private_home

REPO = Path(__file__).resolve().parents[1]
FILE = "lab.yml"
TWO = """\
devices:
  - name: a
    host: 10.0.0.1
  - name: b
    host: 10.0.0.2
"""


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A HOME of the tests' own: no developer's ~/.ssh/config leaks in, and `~` expands predictably."""
    folder = tmp_path_factory.mktemp("home")
    with private_home(folder):
        yield folder


def parse(text: str, path: str = FILE) -> Inventory:
    return parse_inventory(textwrap.dedent(text), path)


def device(text: str, name: str = "a", path: str = FILE) -> Device:
    return next(d for d in parse(text, path).devices if d.name == name)


def names(devices: tuple[Device, ...]) -> list[str]:
    return [d.name for d in devices]


# --- errors: (id, yaml, line, device, field, words in the problem) ---------------------------------------

ERRORS: list[tuple[str, str, int, str | None, str | None, str]] = [
    ("empty file", "", 1, None, None, "empty inventory"),
    (
        "top level is a list",
        "- a\n- b\n",
        1,
        None,
        None,
        "top level must be a mapping with 'devices' (got a list)",
    ),
    ("top level is text", "# hi\nhello\n", 2, None, None, "mapping with 'devices' (got 'hello')"),
    ("yaml syntax", "devices:\n  - name: a\n    host: [x\n  - name: b\n", 4, None, None, "invalid YAML"),
    ("yaml tab indent", "devices:\n\t- name: a\n", 2, None, None, "invalid YAML"),
    ("two documents", TWO + "---\nx: 1\n", 6, None, None, "expected a single document"),
    ("bad character", "devices:\n  - name: a\x07\n", 2, None, None, "not allowed in YAML"),
    ("unknown top key", "device: []\n", 1, None, "device", "unknown field; did you mean 'devices'?"),
    ("no devices key", "defaults: {}\n", 1, None, "devices", "missing"),
    ("no devices", "devices: []\n", 1, None, "devices", "no devices listed"),
    ("devices is text", "devices: pi\n", 1, None, "devices", "expected a mapping (got 'pi')"),
    ("unknown device field", TWO + "    prot: 22\n", 6, "b", "prot", "unknown field; did you mean 'port'?"),
    ("unknown field, no match", TWO + "    zzz: 1\n", 6, "b", "zzz", "unknown field (valid: name, host,"),
    (
        "unknown defaults field",
        "defaults:\n  pyton: py\n" + TWO,
        2,
        None,
        "defaults.pyton",
        "did you mean 'python'?",
    ),
    (
        "unknown nested field",
        TWO + "    timeouts: {conect: 5}\n",
        6,
        "b",
        "timeouts.conect",
        "did you mean 'connect'?",
    ),
    (
        "unknown group field",
        TWO + "groups:\n  g: {member: [a]}\n",
        7,
        None,
        "groups.g.member",
        "did you mean 'members'?",
    ),
    (
        "duplicate key",
        TWO + "    port: 22\n    port: 23\n",
        7,
        "b",
        "port",
        "duplicate key (first at line 6)",
    ),
    ("no host", "devices:\n  - name: a\n    host: x\n  - name: b\n    port: 22\n", 4, "b", "host", "missing"),
    ("no name", "devices:\n  - host: x\n", 2, None, "name", "missing"),
    ("entry not a mapping", "devices:\n  - pi-01\n", 2, None, "devices", "expected a mapping (got 'pi-01')"),
    (
        "duplicate name",
        TWO + "  - name: a\n    host: x\n",
        6,
        "a",
        "name",
        "duplicate device name (first at line 2)",
    ),
    (
        "name with space",
        "devices:\n  - {name: pi 01, host: x}\n",
        2,
        None,
        "name",
        "invalid device name 'pi 01'",
    ),
    ("name with slash", "devices:\n  - {name: a/b, host: x}\n", 2, None, "name", "invalid device name"),
    ("name dot-dot", "devices:\n  - {name: '..', host: x}\n", 2, None, "name", "invalid device name '..'"),
    ("name hidden", "devices:\n  - {name: .git, host: x}\n", 2, None, "name", "invalid device name"),
    ("name empty", "devices:\n  - {name: '', host: x}\n", 2, None, "name", "invalid device name ''"),
    ("name null", "devices:\n  - {name: null, host: x}\n", 2, None, "name", "expected a name"),
    ("name too long", f"devices:\n  - {{name: {'a' * 256}, host: x}}\n", 2, None, "name", "up to 255"),
    ("name all", "devices:\n  - {name: all, host: x}\n", 2, None, "name", "means every device"),
    ("mapping form bad name", "devices:\n  x y: {host: h}\n", 2, None, "name", "invalid device name 'x y'"),
    (
        "port text",
        TWO + "    port: twenty-two\n",
        6,
        "b",
        "port",
        "expected an integer 1-65535 (got 'twenty-two')",
    ),
    ("port quoted", TWO + "    port: '22'\n", 6, "b", "port", "(got '22')"),
    ("port zero", TWO + "    port: 0\n", 6, "b", "port", "1-65535 (got 0)"),
    ("port too big", TWO + "    port: 65536\n", 6, "b", "port", "(got 65536)"),
    ("port bool", TWO + "    port: true\n", 6, "b", "port", "(got true)"),
    ("port float", TWO + "    port: 22.0\n", 6, "b", "port", "(got 22.0)"),
    ("port bad !!int", TWO + "    port: !!int abc\n", 6, "b", "port", "is not a valid int"),
    ("port list", TWO + "    port: [22]\n", 6, "b", "port", "expected a single value (got a list)"),
    ("timeout zero", TWO + "    timeouts: {connect: 0}\n", 6, "b", "timeouts.connect", "seconds > 0 (got 0)"),
    ("timeout negative", TWO + "    timeouts: {command: -5}\n", 6, "b", "timeouts.command", "(got -5)"),
    ("timeout text", TWO + "    timeouts: {command: ten}\n", 6, "b", "timeouts.command", "(got 'ten')"),
    ("timeout inf", TWO + "    timeouts: {command: .inf}\n", 6, "b", "timeouts.command", "(got .inf)"),
    ("device timeout zero", TWO + "    timeouts: {device: 0}\n", 6, "b", "timeouts.device", "> 0 (got 0)"),
    ("retries negative", TWO + "    connect_retries: -1\n", 6, "b", "connect_retries", "0-10 (got -1)"),
    ("retries too many", TWO + "    connect_retries: 11\n", 6, "b", "connect_retries", "0-10 (got 11)"),
    ("retries text", TWO + "    connect_retries: '2'\n", 6, "b", "connect_retries", "(got '2')"),
    ("agent text", TWO + "    ssh: {agent: 'yes'}\n", 6, "b", "ssh.agent", "true or false (got 'yes')"),
    ("persist negative", TWO + "    ssh: {persist: -1}\n", 6, "b", "ssh.persist", "from 0 (off) to 604800 (got -1)"),
    ("persist text", TWO + "    ssh: {persist: 10m}\n", 6, "b", "ssh.persist", "(got '10m')"),
    ("persist bool", TWO + "    ssh: {persist: true}\n", 6, "b", "ssh.persist", "(got true)"),
    ("jump no host", TWO + "    proxy_jump: 'u@'\n", 6, "b", "proxy_jump", "expected [user@]host[:port]"),
    ("jump bad port", TWO + "    proxy_jump: 'j:0'\n", 6, "b", "proxy_jump", "expected 1-65535"),
    ("jump cycle", TWO + "    proxy_jump: a\n  - {name: c, host: z, proxy_jump: c}\n", 7, "c", "proxy_jump",
     "more than 8 jump hosts (a ProxyJump cycle?) (got 'c')"),
    ("jump to local", TWO + "    proxy_jump: c\n  - {name: c, host: local}\n", 4, "b", "proxy_jump",
     "jump host 'c' is the controller itself"),
    (
        "timeout bool",
        "defaults:\n  timeouts:\n    connect: yes\n" + TWO,
        3,
        None,
        "defaults.timeouts.connect",
        "(got yes)",
    ),
    (
        "device_type",
        TWO + "    opencl: {device_type: GPU}\n",
        6,
        "b",
        "opencl.device_type",
        "expected one of gpu, cpu, accelerator, any (got 'GPU'); did you mean 'gpu'?",
    ),
    ("platform negative", TWO + "    opencl: {platform: -1}\n", 6, "b", "opencl.platform", "index >= 0"),
    ("library relative", TWO + "    opencl: {library: lib/libOpenCL.so}\n", 6, "b", "opencl.library",
     "expected an absolute path on the device or a library file name such as libOpenCL.so.1 (got 'lib/"),
    ("library empty", TWO + "    opencl: {library: ''}\n", 6, "b", "opencl.library", "non-empty text"),
    ("platform bool", TWO + "    opencl: {device: false}\n", 6, "b", "opencl.device", "(got false)"),
    ("remote_dir space", TWO + "    remote_dir: ~/my deployer\n", 6, "b", "remote_dir", "no spaces, quotes"),
    ("remote_dir quote", TWO + "    remote_dir: \"~/it's\"\n", 6, "b", "remote_dir", "no spaces, quotes"),
    ("remote_dir dash", TWO + "    remote_dir: -rf\n", 6, "b", "remote_dir", "a leading '-'"),
    ("remote_dir other home", TWO + "    remote_dir: ~pi/x\n", 6, "b", "remote_dir", "starts with ~/, /"),
    ("remote_dir dollar", TWO + "    remote_dir: $HOME/x\n", 6, "b", "remote_dir", "(got '$HOME/x')"),
    ("env key digit", TWO + "    env: {1BAD: x}\n", 6, "b", "env", "'1BAD' is not a variable name"),
    ("env key dash", TWO + "    env:\n      A-B: x\n", 7, "b", "env", "'A-B' is not a variable name"),
    ("env value int", TWO + "    env:\n      N: 4\n", 7, "b", "env.N", "expected text (got a number): quote it"),
    ("env value secret", TWO + "    env:\n      TOKEN: 5332415841\n", 7, "b", "env.TOKEN",
     "expected text (got a number): quote it"),
    ("env value bool", TWO + "    env: {N: yes}\n", 6, "b", "env.N", "expected text (got a boolean): quote it"),
    ("env value null", TWO + "    env: {N: null}\n", 6, "b", "env.N", "expected text (got null)"),
    ("env value list", TWO + "    env: {N: [a]}\n", 6, "b", "env.N", "expected a single value (got a list)"),
    ("env is a list", TWO + "    env: [A]\n", 6, "b", "env", "expected a mapping (got a list)"),
    ("label value bool", TWO + "    labels: {country: NO}\n", 6, "b", "labels.country", "(got NO): quote it"),
    (
        "host_key_checking no",
        "defaults:\n  ssh: {host_key_checking: no}\n" + TWO,
        2,
        None,
        "defaults.ssh.host_key_checking",
        "expected one of strict, accept-new (got no)",
    ),
    (
        "host_key_checking typo",
        TWO + "    ssh: {host_key_checking: accept_new}\n",
        6,
        "b",
        "ssh.host_key_checking",
        "did you mean 'accept-new'?",
    ),
    ("host with space", TWO + "  - {name: c, host: 'a b'}\n", 6, "c", "host", "one word"),
    ("user empty", TWO + "  - {name: c, host: x, user: ''}\n", 6, "c", "user", "non-empty"),
    ("python newline", TWO + '  - {name: c, host: x, python: "py\\nthon"}\n', 6, "c", "python", "one line"),
    ("vars is a list", TWO + "    vars: [1]\n", 6, "b", "vars", "expected a mapping (got a list)"),
    ("vars binary", TWO + "    vars: {k: !!binary aGk=}\n", 6, "b", "vars.k", "unsupported YAML tag"),
    (
        "vars custom tag",
        TWO + "    vars: {k: !vault abc}\n",
        6,
        "b",
        "vars.k",
        "unsupported YAML tag '!vault'",
    ),
    ("vars set", TWO + "    vars: {k: !!set {a}}\n", 6, "b", "vars.k", "got a value tagged"),
    ("vars recursive alias", TWO + "    vars: {k: &r [1, *r]}\n", 6, "b", "vars.k", "recursive alias"),
    (
        "nesting too deep",
        TWO + "    vars: {k: " + "[" * 80 + "]" * 80 + "}\n",
        6,
        None,
        None,
        "nested over 64",
    ),
    (
        "aliases nesting too deep",
        TWO + "    vars:\n      l0: &l0 " + "[" * 40 + "]" * 40 + "\n      l1: " + "[" * 30 + "*l0" + "]" * 30 + "\n",
        8,
        "b",
        "vars.l1",
        "nested over 64 levels deep (through aliases)",
    ),
    ("complex key", TWO + "    vars: {[a]: 1}\n", 6, "b", "vars", "a key must be plain text"),
    ("merge of a list", TWO + "    <<: [[1]]\n", 6, "b", None, "expected a mapping (got a list)"),
    (
        "member not a device",
        TWO + "groups:\n  g:\n    members: [a, bb]\n",
        8,
        None,
        "groups.g.members",
        "'bb' is not a device; did you mean 'b'?",
    ),
    (
        "child not a group",
        TWO + "groups:\n  g: {children: [h]}\n",
        7,
        None,
        "groups.g.children",
        "'h' is not a group",
    ),
    (
        "child is a device",
        TWO + "groups:\n  g: {children: [a]}\n",
        7,
        None,
        "groups.g.children",
        "'a' is a device, not a group: put it in members",
    ),
    (
        "members not a list",
        TWO + "groups:\n  g: {members: a}\n",
        7,
        None,
        "groups.g.members",
        "expected a list of names (got 'a')",
    ),
    (
        "group cycle",
        TWO + "groups:\n  g1:\n    children: [g2]\n  g2:\n    children: [g1]\n",
        8,
        None,
        "groups.g1.children",
        "group cycle: g1 -> g2 -> g1",
    ),
    (
        "group self cycle",
        TWO + "groups:\n  g1: {children: [g1]}\n",
        7,
        None,
        "groups.g1.children",
        "group cycle: g1 -> g1",
    ),
    (
        "group named like a device",
        TWO + "groups:\n  a: {members: [b]}\n",
        7,
        None,
        "groups.a",
        "a device has this name too (line 2)",
    ),
    (
        "group bad name",
        TWO + "groups:\n  'g:1': {members: [b]}\n",
        7,
        None,
        "groups",
        "invalid group name 'g:1'",
    ),
    ("group named all", TWO + "groups:\n  all: {members: [b]}\n", 7, None, "groups", "means every device"),
    ("ssh_config not text", "ssh_config: [a]\n" + TWO, 1, None, "ssh_config", "expected a single value"),
]


@pytest.mark.parametrize(
    ("text", "line", "device_name", "field", "words"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_error(text: str, line: int, device_name: str | None, field: str | None, words: str) -> None:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text, FILE)
    error = caught.value
    assert (error.where, error.device, error.field) == (Where(FILE, line), device_name, field), str(error)
    assert words in error.problem
    assert str(error).startswith(f"{FILE}:{line}: ")
    if device_name:
        assert f"device {device_name!r}: " in str(error)
    if field:
        assert f"field {field!r}: " in str(error)
    if field and field.startswith("env."):  # env values may be tokens: the error names the type, never the value
        assert "5332415841" not in str(error) and " 4)" not in str(error), str(error)


def test_message_shape() -> None:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(TWO + "    port: twenty-two\n", "inventory/pis.yml")
    assert str(caught.value) == (
        "inventory/pis.yml:6: device 'b': field 'port': expected an integer 1-65535 (got 'twenty-two')"
    )


def test_invalid_utf8_names_its_line() -> None:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(TWO.encode() + b"    user: \xff\n", FILE)
    assert caught.value.where == Where(FILE, 6)
    assert "not UTF-8" in caught.value.problem


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    assert str(caught.value) == f"{path}: no such file"


def test_a_folder_is_an_ansible_inventory_and_an_empty_one_says_so(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"no hosts in this Ansible inventory") as caught:
        load_inventory(tmp_path)
    assert caught.value.where == Where(str(tmp_path))


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_only_regular_files_are_read(tmp_path: Path, special: str) -> None:
    """/dev/zero or a FIFO as the fleet, an identity_file, known_hosts or ssh_config: a clear input error
    naming the file (it was a MemoryError, exit 70, or a hang), never a read."""
    if special == "fifo":
        special = str(tmp_path / "fifo")
        os.mkfifo(special)
    with pytest.raises(InventoryError, match=r"not a regular file") as caught:
        load_inventory(special)
    assert caught.value.where == Where(special)
    cases = (("identity_file", f"identity_file: {special}"), ("ssh.known_hosts", f"ssh: {{known_hosts: {special}}}"),
             ("ssh_config", None))
    for field, text in cases:
        body = (f"ssh_config: {special}\n" + TWO) if text is None else TWO + f"    {text}\n"
        with pytest.raises(InventoryError, match=r"not a regular file") as caught:
            parse_inventory(body, FILE)
        assert caught.value.field == field and special in str(caught.value), str(caught.value)


def test_size_caps(tmp_path: Path) -> None:
    big = tmp_path / "big.yml"
    with open(big, "wb") as out:
        out.truncate((4 << 20) + 1)  # sparse: over the 4 MiB cap without writing it
    with pytest.raises(InventoryError, match=r"4194305 bytes, over the limit of 4194304"):
        load_inventory(big)


def test_an_alias_bomb_in_vars_is_refused() -> None:
    """Nine aliases of nine aliases ... check cheaply (nodes are shared) but `inventory list --json` would
    write 9**9 values: refused at check time, naming the line."""
    lines = ["    vars:", "      l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    with pytest.raises(InventoryError, match=r"expands to over 100000 values through YAML aliases") as caught:
        parse_inventory(TWO + "\n".join(lines) + "\n", FILE)
    assert caught.value.field == "vars.l5" and caught.value.where == Where(FILE, 12)  # 9**6 values: past the cap


# --- what loads ------------------------------------------------------------------------------------------


def test_example_inventory_loads() -> None:
    inventory = load_inventory(REPO / "inventory" / "pis.yml")
    assert len(inventory.devices) == 6
    assert set(inventory.groups) == {"lab", "pi4", "pi5"}
    assert inventory.groups["lab"].devices == tuple(d.name for d in inventory.devices)
    assert any("OCL_ICD_VENDORS" in d.env for d in inventory.devices)


def test_defaults_and_builtins(home: Path) -> None:
    a = device(TWO)
    assert (a.host, a.port, a.user) == ("10.0.0.1", 22, "tester")
    assert (a.python, a.remote_dir) == ("python3", "~/.deployer")
    assert a.opencl.device_type == "any" and a.opencl.platform is None
    assert (a.ssh.known_hosts, a.ssh.host_key_checking) == (str(home / ".ssh/known_hosts"), "strict")
    assert (a.timeouts.connect, a.timeouts.command) == (10.0, 600.0)
    assert (a.identity_file, a.proxy_jump, a.is_local, a.groups) == (None, None, False, ())
    assert (a.connect_retries, a.timeouts.device, a.ssh.agent, a.jumps) == (2, None, True, ())
    assert a.ssh.persist == 0  # no connection master unless asked for
    assert a.where == Where(FILE, 2)


def test_retries_deadline_agent_and_override() -> None:
    from deployer.config.inventory import override

    text = """\
        defaults: {connect_retries: 0, timeouts: {device: 90}, ssh: {agent: false, persist: 600}}
        devices:
          - {name: a, host: x, connect_retries: 5, timeouts: {device: 30}, ssh: {persist: 0}}
          - {name: b, host: y}
        """
    a, b = parse(text).devices
    assert (a.connect_retries, a.timeouts.device, a.timeouts.connect, a.ssh.agent) == (5, 30.0, 10.0, False)
    assert (b.connect_retries, b.timeouts.device) == (0, 90.0)
    assert (a.ssh.persist, b.ssh.persist) == (0.0, 600.0)
    assert override(a) == a
    changed = override(a, connect_retries=1, deadline=4.5)
    assert (changed.connect_retries, changed.timeouts.device, changed.timeouts.command) == (1, 4.5, 600.0)
    assert override(a, deadline=0).timeouts.device is None  # --deadline 0: no limit


def test_proxy_jump_hops_resolve_like_openssh(tmp_path: Path) -> None:
    """A hop named like a device is that device; an ssh config alias is resolved; `user@` and `:port` win."""
    config = tmp_path / "cfg"
    config.write_text("Host bastion\n  HostName 10.9.9.9\n  User jumper\n  Port 2022\n  IdentityFile /keys/b\n"
                      "Host inner\n  HostName 10.1.1.1\n  ProxyJump bastion\n")
    text = f"""\
        ssh_config: {config}
        defaults: {{user: pi, identity_file: /keys/fleet}}
        devices:
          - {{name: gw, host: 10.0.0.1, port: 2200}}
          - {{name: a, host: 10.0.0.2, proxy_jump: gw}}
          - {{name: b, host: 10.0.0.3, proxy_jump: 'root@gw:22'}}
          - {{name: c, host: 10.0.0.4, proxy_jump: bastion}}
          - {{name: d, host: 10.0.0.5, proxy_jump: 'inner,ops@[fd00::1]:2'}}
          - {{name: e, host: 10.0.0.6, proxy_jump: a}}
        """
    gw, a, b, c, d, e = parse(text).devices
    J = sshconfig.JumpHost
    assert gw.jumps == ()
    assert a.jumps == (J("gw", "10.0.0.1", 2200, "pi", "/keys/fleet"),)
    assert b.jumps == (J("root@gw:22", "10.0.0.1", 22, "root", "/keys/fleet"),)
    assert c.jumps == (J("bastion", "10.9.9.9", 2022, "jumper", "/keys/b"),)
    # inner's own ProxyJump comes first; a raw address without a key of its own uses the device's
    assert d.jumps == (J("bastion", "10.9.9.9", 2022, "jumper", "/keys/b"), J("inner", "10.1.1.1", 22, "tester",
                       "/keys/fleet"), J("ops@[fd00::1]:2", "fd00::1", 2, "ops", "/keys/fleet"))
    assert e.jumps == (J("gw", "10.0.0.1", 2200, "pi", "/keys/fleet"), J("a", "10.0.0.2", 22, "pi", "/keys/fleet"))
    assert cast(list[Any], describe(e)["jumps"])[1] == {"spec": "a", "host": "10.0.0.2", "port": 22, "user": "pi",
                                       "identity_file": "/keys/fleet"}


def test_device_beats_defaults_and_sections_merge_per_key() -> None:
    text = """\
        defaults:
          user: pi
          port: 2200
          timeouts: {connect: 5, command: 60}
          opencl: {platform: 0, device_type: gpu}
          env: {A: "1", B: "2"}
          labels: {site: b12}
        devices:
          - name: a
            host: x
            port: 2222
            timeouts: {command: 30}
            opencl: {platform: pocl}
            env: {B: "3"}
            labels: {board: rpi4}
          - name: b
            host: y
        """
    a, b = parse(text).devices
    assert (a.user, a.port, b.port) == ("pi", 2222, 2200)
    assert (a.timeouts.connect, a.timeouts.command) == (5.0, 30.0)
    assert a.opencl == dataclasses.replace(a.opencl, platform="pocl", device=None, device_type="gpu")
    assert dict(a.env) == {"A": "1", "B": "3"} and dict(b.env) == {"A": "1", "B": "2"}
    assert dict(a.labels) == {"site": "b12", "board": "rpi4"}


def test_list_and_mapping_forms_agree() -> None:
    listed = parse("devices:\n  - name: a\n    host: x\n    port: 2\n")
    mapped = parse("devices:\n  a:\n    host: x\n    port: 2\n")
    assert listed.devices == mapped.devices


def test_vars_precedence() -> None:
    text = """\
        defaults:
          vars: {v: defaults, d: 1}
        devices:
          - {name: a, host: x, vars: {v: device}}
          - {name: b, host: x}
          - {name: c, host: x}
        groups:
          zeta: {members: [b, c], vars: {v: zeta, z: 1}}
          alpha: {members: [b], vars: {v: alpha, a: 1}}
          parent: {children: [child], members: [a], vars: {v: parent, p: 1}}
          child: {members: [b], vars: {v: child}}
        """
    a, b, c = parse(text).devices
    assert dict(a.vars) == {"v": "device", "d": 1, "p": 1}
    # depth 0 in name order (alpha, parent, zeta), then depth 1 (child): the child beats its parent
    assert b.groups == ("alpha", "parent", "zeta", "child")
    assert dict(b.vars) == {"v": "child", "d": 1, "z": 1, "a": 1, "p": 1}
    assert c.groups == ("zeta",) and c.vars["v"] == "zeta"


def test_share_builds_is_off_unless_the_device_a_group_or_defaults_say_so() -> None:
    text = """\
        defaults: {share_builds: true}
        devices:
          - {name: a, host: x}
          - {name: b, host: x, share_builds: false}
          - {name: c, host: x}
          - {name: d, host: x}
        groups:
          lab: {members: [b, c], share_builds: false}
          bench: {children: [lab], members: [d]}
          quiet: {children: [bench], share_builds: true}
        """
    a, b, c, d = parse(text).devices
    # the device's own word, then the deepest group that says (lab under bench under quiet), then defaults
    assert (a.share_builds, b.share_builds, c.share_builds, d.share_builds) == (True, False, False, True)
    assert parse("devices:\n  - {name: a, host: x}\n").devices[0].share_builds is False
    with pytest.raises(InventoryError, match=r"field 'groups.lab.share_builds': expected true or false"):
        parse("devices:\n  - {name: a, host: x}\ngroups:\n  lab: {members: [a], share_builds: sometimes}\n")


def test_group_order_and_devices() -> None:
    text = TWO + "groups:\n  top: {children: [mid]}\n  mid: {children: [low]}\n  low: {members: [b, a, a]}\n"
    inventory = parse(text)
    assert list(inventory.groups) == ["top", "mid", "low"]  # by depth
    assert inventory.groups["top"].devices == ("a", "b")  # inventory order
    assert inventory.groups["low"].members == ("b", "a")
    assert inventory.groups["mid"].where == Where(FILE, 8)


def test_nested_vars_are_frozen_and_dates_stay_text() -> None:
    a = device(TWO + "    vars: {v: {list: [1, 2], when: 2024-01-02, f: 1.5, n: null, t: true}}\n", "b")
    value = a.vars["v"]
    assert value == {"list": (1, 2), "when": "2024-01-02", "f": 1.5, "n": None, "t": True}
    with pytest.raises(TypeError):
        cast(Any, value)["list"] = ()


def test_records_are_immutable() -> None:
    a = device(TWO + "    env: {A: x}\n", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.env["A"] = "y"  # type: ignore[index]
    with pytest.raises(TypeError):
        parse(TWO).groups["x"] = None  # type: ignore[index]


def test_yaml_anchors_and_merge_keys() -> None:
    text = """\
        devices:
          - &first {name: a, host: x, port: 2200, opencl: {platform: rusticl}}
          - <<: *first
            name: b
            port: 2201
        """
    _, b = parse(text).devices
    assert (b.host, b.port, b.opencl.platform) == ("x", 2201, "rusticl")


def test_local_device() -> None:
    a = device("devices:\n  - {name: a, host: local}\n")
    assert a.is_local and a.host == "local"


def test_paths(home: Path, tmp_path: Path) -> None:
    text = """\
        defaults:
          ssh: {known_hosts: known}
        devices:
          - {name: a, host: x, identity_file: ~/.ssh/pi, remote_dir: ~/deploy}
          - {name: b, host: x, identity_file: keys/b, ssh: {known_hosts: /etc/ssh/known}}
        """
    a, b = parse(text, str(tmp_path / "lab.yml")).devices
    assert a.identity_file == str(home / ".ssh/pi")
    assert a.remote_dir == "~/deploy"  # expanded on the device
    assert a.ssh.known_hosts == str(tmp_path / "known")
    assert b.identity_file == str(tmp_path / "keys/b")
    assert b.ssh.known_hosts == "/etc/ssh/known"


def test_describe_is_json_and_hides_env() -> None:
    a = device(TWO + "    env: {TOKEN: s3cret}\n    vars: {v: [1, {k: x}]}\n", "b")
    view = describe(a)
    text = json.dumps(view)
    assert "s3cret" not in text and "s3cret" not in repr(a)
    assert view["env"] == {"TOKEN": "***"}
    assert view["vars"] == {"v": [1, {"k": "x"}]}
    assert (
        view["where"] == f"{FILE}:4"
        and view["name"] == "b"
        and view["opencl"] == {"platform": None, "device": None, "device_type": "any", "library": None}
    )


# --- ssh config ------------------------------------------------------------------------------------------

SSH_CONFIG = """\
# comment
Include ~/.ssh/other.conf
Host lab-pi5-03 "quoted alias"
    HostName 10.8.0.23
    Port=2200
    User alice
    IdentityFile ~/.ssh/lab_%n
    IdentityFile ~/.ssh/second
    ProxyJump bastion.example
Host *.lab !secret.lab
    User labber
    StrictHostKeyChecking accept-new
    UserKnownHostsFile ~/.ssh/known_lab /etc/ssh/other
Host pi-??
    HostName %h.lan
Match originalhost m.lab user bob
    User matcher
Host *
    User everyone
    Port 2222
"""


@pytest.fixture
def ssh_config(tmp_path: Path) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(SSH_CONFIG)
    return path


RESOLVE = [
    ("lab-pi5-03", {"hostname": "10.8.0.23", "port": 2200, "user": "alice", "proxy_jump": "bastion.example"}),
    ("LAB-PI5-03", {"hostname": "10.8.0.23", "user": "alice"}),  # OpenSSH matches without case
    ("quoted alias", {"hostname": "10.8.0.23"}),
    ("a.lab", {"user": "labber", "strict_host_key_checking": "accept-new", "port": 2222}),
    ("secret.lab", {"user": "everyone", "strict_host_key_checking": None}),  # negated: block skipped
    ("pi-07", {"hostname": "pi-07.lan", "user": "everyone"}),
    ("pi-007", {"hostname": None}),
    ("elsewhere", {"hostname": None, "user": "everyone", "port": 2222, "identity_file": None}),
]


@pytest.mark.parametrize(("alias", "expected"), RESOLVE, ids=[alias for alias, _ in RESOLVE])
def test_ssh_config_resolve(ssh_config: Path, alias: str, expected: dict[str, Any]) -> None:
    seen = sshconfig.resolve(alias, ssh_config)
    assert {key: getattr(seen, key) for key in expected} == expected


def test_ssh_config_paths_and_tokens(ssh_config: Path, home: Path) -> None:
    assert sshconfig.resolve("lab-pi5-03", ssh_config).identity_file == str(home / ".ssh/lab_lab-pi5-03")
    assert sshconfig.resolve("x.lab", ssh_config).user_known_hosts_file == str(home / ".ssh/known_lab")


def test_ssh_config_missing_file_is_empty(tmp_path: Path) -> None:
    assert sshconfig.resolve("pi", tmp_path / "none") == sshconfig.SshHostConfig("pi")
    assert sshconfig.resolve("pi") == sshconfig.SshHostConfig("pi")  # HOME has no ~/.ssh/config


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('Host a\n  HostName "x\n', 2, 'unclosed " quote'),
        ("Host\n", 1, "missing value"),
        ("Host a\n  User\n", 2, "missing value"),
        ("= x\n", 1, "cannot read this line"),
        ("Host a\n  User b\nMatch nonsense\n", 3, "Missing parameter to Match 'nonsense' keyword"),
        ("Match host\n", 1, "Missing parameter to Match 'host' keyword"),
        ("Match all host x\n", 1, "Match does not allow 'all' mixed"),
    ],
)
def test_ssh_config_syntax_errors(text: str, line: int, words: str) -> None:
    with pytest.raises(InputError) as caught:
        sshconfig.parse_ssh_config(text, "cfg")
    assert caught.value.where == Where("cfg", line) and words in caught.value.problem


def test_inventory_fills_in_from_ssh_config(ssh_config: Path) -> None:
    text = f"""\
        ssh_config: {ssh_config}
        devices:
          - {{name: a, host: lab-pi5-03}}
          - {{name: b, host: lab-pi5-03, port: 22, user: pi, identity_file: /k, proxy_jump: null}}
          - {{name: c, host: x.lab}}
          - {{name: d, host: local}}
        """
    a, b, c, d = parse(text).devices
    assert (a.host, a.port, a.user, a.proxy_jump) == ("10.8.0.23", 2200, "alice", "bastion.example")
    assert a.identity_file is not None and a.identity_file.endswith("/.ssh/lab_lab-pi5-03")
    assert (b.host, b.port, b.user, b.identity_file, b.proxy_jump) == ("10.8.0.23", 22, "pi", "/k", None)
    assert c.ssh.host_key_checking == "accept-new" and c.ssh.known_hosts.endswith("/.ssh/known_lab")
    assert (d.host, d.port, d.user) == ("local", 22, "tester")  # no ssh config for the controller itself


def test_defaults_beat_ssh_config(ssh_config: Path) -> None:
    text = f"ssh_config: {ssh_config}\ndefaults: {{user: pi}}\ndevices:\n  - {{name: a, host: lab-pi5-03}}\n"
    assert device(text).user == "pi"


def test_ssh_config_never_weakens_host_keys(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.write_text("Host *\n  StrictHostKeyChecking no\n")
    assert device(f"ssh_config: {config}\n{TWO}").ssh.host_key_checking == "strict"


def test_ssh_config_relative_and_null(tmp_path: Path) -> None:
    (tmp_path / "cfg").write_text("Host a-alias\n  HostName 1.2.3.4\n")
    text = "ssh_config: cfg\ndevices:\n  - {name: a, host: a-alias}\n"
    assert device(text, path=str(tmp_path / "lab.yml")).host == "1.2.3.4"
    text = "ssh_config: null\ndevices:\n  - {name: a, host: a-alias}\n"
    assert device(text, path=str(tmp_path / "lab.yml")).host == "a-alias"


def test_ssh_config_errors_name_both_files(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.write_text("Host pi\n  Port twenty\n")
    with pytest.raises(InventoryError) as caught:
        parse_inventory(f"ssh_config: {config}\ndevices:\n  - {{name: a, host: pi}}\n", FILE)
    assert str(caught.value) == (
        f"{FILE}:3: device 'a': field 'host': in ssh config: {config}:2: field 'Port': expected 1-65535 (got 'twenty')"
    )
    config.write_text('Host "pi\n')
    with pytest.raises(InventoryError) as caught:
        parse_inventory(f"devices:\n  - {{name: a, host: pi}}\nssh_config: {config}\n", FILE)
    assert caught.value.where == Where(FILE, 3) and caught.value.field == "ssh_config"


# --- --limit ---------------------------------------------------------------------------------------------

LIMIT_INVENTORY = """\
devices:
  - {name: pi-01, host: x}
  - {name: pi-02, host: x}
  - {name: pi-11, host: x}
  - {name: jet-1, host: x}
  - {name: here, host: local}
groups:
  pi4: {members: [pi-01, pi-02]}
  pi5: {members: [pi-11]}
  pis: {children: [pi4, pi5]}
  boards: {children: [pis], members: [jet-1]}
"""

LIMITS = [
    (None, "pi-01 pi-02 pi-11 jet-1 here"),
    ("all", "pi-01 pi-02 pi-11 jet-1 here"),
    ("*", "pi-01 pi-02 pi-11 jet-1 here"),
    ("pi-02", "pi-02"),
    ("pi-02,pi-01", "pi-01 pi-02"),  # inventory order, not limit order
    ("pi5:jet-1", "pi-11 jet-1"),
    (" pi5 , jet-1 ", "pi-11 jet-1"),
    ("pis", "pi-01 pi-02 pi-11"),
    ("boards", "pi-01 pi-02 pi-11 jet-1"),
    ("pi-0*", "pi-01 pi-02"),
    ("pi-?1", "pi-01 pi-11"),
    ("pi-[01]1", "pi-01 pi-11"),
    ("pi?", "pi-01 pi-02 pi-11"),  # a glob on group names too: pi4, pi5
    ("boards,!pi4", "pi-11 jet-1"),
    ("!pi4", "pi-11 jet-1 here"),  # only exclusions: from all
    ("pis,&pi-0*", "pi-01 pi-02"),
    ("&pi-0*,pis,!pi-02", "pi-01"),  # order of kinds does not matter
    ("@failed", "pi-02 pi-11"),
    ("all,!@failed", "pi-01 jet-1 here"),
]


@pytest.mark.parametrize(("limit", "expected"), LIMITS, ids=[str(limit) for limit, _ in LIMITS])
def test_select(limit: str | None, expected: str) -> None:
    inventory = parse_inventory(LIMIT_INVENTORY, FILE)
    named = {"failed": ["pi-11", "pi-02", "gone-from-inventory"]}
    assert names(select(inventory, limit, named_sets=named)) == expected.split()


LIMIT_ERRORS = [
    ("xyz", "'xyz' matches no device or group (devices: pi-01, pi-02, pi-11, jet-1, here; groups: "),
    ("pi-1", "'pi-1' matches no device or group; did you mean 'pi-11'?"),
    ("pi-01,nope*", "'nope*' matches no device or group"),
    ("all,!pi-9", "'pi-9' matches no device or group"),  # a typo in an exclusion is no silent no-op
    ("pi4,!pi4", "'pi4,!pi4' leaves no device"),
    ("", "empty limit"),
    (" , ", "empty limit"),
    ("!", "'!' or '&' needs a pattern"),
    ("@nope", "unknown set '@nope' (known: @empty, @failed)"),
    ("@empty", "'@empty' holds no device of this inventory"),
]


@pytest.mark.parametrize(("limit", "words"), LIMIT_ERRORS, ids=[limit for limit, _ in LIMIT_ERRORS])
def test_select_errors(limit: str, words: str) -> None:
    inventory = parse_inventory(LIMIT_INVENTORY, FILE)
    with pytest.raises(InputError) as caught:
        select(inventory, limit, named_sets={"failed": ["pi-01"], "empty": ["gone"]})
    assert not isinstance(caught.value, InventoryError)
    assert (caught.value.where, caught.value.field) == (None, "limit")
    assert words in caught.value.problem
    assert str(caught.value).startswith("field 'limit': ")


def test_named_set_without_sets() -> None:
    with pytest.raises(InputError, match=r"'@failed' names devices of a cache's last run: this command reads no cache"):
        select(parse_inventory(LIMIT_INVENTORY, FILE), "@failed")


# --- any input: an Inventory or an InventoryError with file:line -----------------------------------------

WORDS = [
    "defaults",
    "devices",
    "groups",
    "ssh_config",
    "name",
    "host",
    "port",
    "user",
    "python",
    "remote_dir",
    "identity_file",
    "proxy_jump",
    "connect_retries",
    "agent",
    "opencl",
    "platform",
    "device",
    "device_type",
    "ssh",
    "known_hosts",
    "host_key_checking",
    "options",
    "timeouts",
    "connect",
    "command",
    "env",
    "labels",
    "vars",
    "members",
    "children",
    "local",
    "gpu",
    "strict",
    "accept-new",
    "pi-01",
    "pi-02",
    "g1",
    "g2",
    "<<",
    "A_B",
    "all",
]
scalars = (
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats() | st.sampled_from(WORDS) | st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=25,
)
documents = st.dictionaries(
    st.sampled_from(["defaults", "devices", "groups", "ssh_config", "junk"]), values, max_size=4
)
FRAGMENTS = [
    "devices:",
    "defaults:",
    "groups:",
    "  - name: pi-01",
    "  - {name: pi-02, host: local}",
    "    host: x",
    "    port: 22",
    "  g1: {members: [pi-01], children: [g2]}",
    "  g2: {children: [g1]}",
    "  pi-01:",
    "    <<: *a",
    "  - &a {name: a, host: b}",
    "    vars: {k: &r [*r]}",
    "    env: {A: '1'}",
    "  ? [x]",
    "  : y",
    "---",
    "[",
    "'",
    "\t",
    "    timeouts: {connect: .nan}",
    "  x: !!int ''",
    "  x: !!float ''",
    "  x: !!bool maybe",
    "  x: !foo",
    "  x: !!timestamp nope",
    "    opencl: {device_type: gpu, platform: -1}",
    "ssh_config: null",
]


def check_loads_or_says_where(source: str | bytes) -> None:
    try:
        inventory = parse_inventory(source, FILE)
    except InventoryError as error:
        assert error.where is not None and error.where.file == FILE and error.where.line >= 1
        assert re.match(rf"{re.escape(FILE)}:\d+: ", str(error)), str(error)
    else:
        assert inventory.devices
        json.dumps([describe(d) for d in inventory.devices])


@settings(max_examples=200, deadline=None)
@given(st.text() | st.binary())
def test_any_text_or_bytes(source: str | bytes) -> None:
    check_loads_or_says_where(source)


@settings(max_examples=200, deadline=None)
@given(documents)
def test_any_yaml_document(document: dict[str, Any]) -> None:
    check_loads_or_says_where(yaml.safe_dump(document))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12))
def test_any_yaml_fragments(lines: list[str]) -> None:
    check_loads_or_says_where("\n".join(lines) + "\n")
