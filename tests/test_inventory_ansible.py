"""Ansible inventories as `--fleet`: INI and YAML, folders, group_vars/host_vars, ansible_* and deploy_* vars,
format detection, and every bad input with its file:line. Pure: no device, no ansible-core (that is
tests/test_inventory_differential.py).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.config.formats.detect import detect
from deployer.config.inventory import Device, Inventory, describe, load_inventory
from deployer.config.selection import select
from deployer.errors import InputError, InventoryError, Where
from tests.conftest import Cli, private_home


@pytest.fixture(autouse=True)
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A HOME of the tests' own: no developer's ~/.ssh/config leaks in."""
    folder = tmp_path_factory.mktemp("home")
    with private_home(folder):
        yield folder


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def by_name(inventory: Inventory) -> dict[str, Device]:
    return {d.name: d for d in inventory.devices}


LAB_INI = """\
# the lab, as Ansible knows it
ctl ansible_connection=local
[pi4]
pi[01:03].lab ansible_user=pi
jet-1:2222 ansible_host=10.0.0.9 deploy_env="{'OCL_ICD_VENDORS': '/opt/pocl'}"

[pi5]
pi5-[a:c] ansible_ssh_common_args='-o ProxyJump=ops@bastion:2200 -o ControlMaster=auto'

[pis:children]
pi4
pi5

[pis:vars]
mace_version=v1.1.1
ansible_python_interpreter=/usr/bin/python3
deploy_opencl={'device_type': 'gpu'}
"""

LAB_YAML = """\
all:
  hosts:
    ctl: {ansible_connection: local}
  children:
    pis:
      vars:
        mace_version: v1.1.1
        ansible_python_interpreter: /usr/bin/python3
        deploy_opencl: {device_type: gpu}
      children:
        pi4:
          hosts:
            pi[01:03].lab: {ansible_user: pi}
            jet-1:2222:
              ansible_host: 10.0.0.9
              deploy_env: {OCL_ICD_VENDORS: /opt/pocl}
        pi5:
          hosts:
            pi5-[a:c]:
              ansible_ssh_common_args: -o ProxyJump=ops@bastion:2200 -o ControlMaster=auto
"""


@pytest.mark.parametrize("form", ["ini", "yaml"])
def test_lab_in_either_form(tmp_path: Path, form: str) -> None:
    path = tmp_path / f"hosts.{form}"
    path.write_text(LAB_INI if form == "ini" else LAB_YAML)
    inventory = load_inventory(path)
    devices = by_name(inventory)
    assert list(devices) == ["ctl", "pi01.lab", "pi02.lab", "pi03.lab", "jet-1", "pi5-a", "pi5-b", "pi5-c"]
    ctl, pi02, jet, pi5b = devices["ctl"], devices["pi02.lab"], devices["jet-1"], devices["pi5-b"]
    assert ctl.is_local and ctl.host == "local" and ctl.groups == ("ungrouped",)
    assert (pi02.host, pi02.port, pi02.user, pi02.python) == ("pi02.lab", 22, "pi", "/usr/bin/python3")
    assert pi02.opencl.device_type == "gpu" and dict(pi02.vars) == {"mace_version": "v1.1.1"}
    assert pi02.groups == ("pis", "pi4")  # vars order: depth, then name
    assert (jet.host, jet.port, jet.user) == ("10.0.0.9", 2222, "tester")
    assert dict(jet.env) == {"OCL_ICD_VENDORS": "/opt/pocl"}
    assert pi5b.proxy_jump == "ops@bastion:2200"
    assert [(j.host, j.port, j.user) for j in pi5b.jumps] == [("bastion", 2200, "ops")]
    assert inventory.format == "ansible"
    assert pi02.where == Where(str(path), 4 if form == "ini" else 13)


def test_ini_and_yaml_give_the_same_devices(tmp_path: Path) -> None:
    (tmp_path / "a.ini").write_text(LAB_INI)
    (tmp_path / "b.yml").write_text(LAB_YAML)

    def view(path: Path) -> list[dict[str, object]]:
        return [{k: v for k, v in describe(d).items() if k not in ("where", "origins")}
                for d in load_inventory(path).devices]

    assert view(tmp_path / "a.ini") == view(tmp_path / "b.yml")


def test_group_vars_and_host_vars_files_and_folders(tmp_path: Path) -> None:
    write(tmp_path, {
        "hosts": """\
            [pi4]
            pi-01 owner=inventory-host
            pi-02
            [pi4:vars]
            owner=inventory-group
            level=inventory-group
            [all:vars]
            level=inventory-all
            base=inventory-all
            """,
        "group_vars/all.yml": "base: group_vars-all\nlevel: group_vars-all\n",
        "group_vars/pi4/10-first.yml": "level: group_vars-pi4-first\nfolder: first\n",
        "group_vars/pi4/20-second.yaml": "folder: second\n",
        "group_vars/pi4/.hidden.yml": "folder: hidden\n",
        "host_vars/pi-02.json": '{"owner": "host_vars", "deploy_remote_dir": "/srv/dep"}',
    })
    devices = by_name(load_inventory(tmp_path / "hosts"))
    assert dict(devices["pi-01"].vars) == {
        "base": "group_vars-all",  # group_vars/all beats [all:vars]
        "level": "group_vars-pi4-first",  # group_vars/<group> beats both
        "owner": "inventory-host",  # the host line beats every group
        "folder": "second",  # a folder's files in name order, later wins, hidden skipped
    }
    assert devices["pi-02"].vars["owner"] == "host_vars" and devices["pi-02"].remote_dir == "/srv/dep"


def test_group_depth_then_priority_then_name(tmp_path: Path) -> None:
    write(tmp_path, {"hosts": """\
        [a]
        h1
        [b]
        h1
        [parent:children]
        child
        [child]
        h1
        [a:vars]
        v=a
        w=a
        [b:vars]
        v=b
        [child:vars]
        w=child
        """})
    assert dict(load_inventory(tmp_path / "hosts").devices[0].vars) == {"v": "b", "w": "child"}
    with open(tmp_path / "hosts", "a") as out:
        out.write("ansible_group_priority=10\n")  # under [child:vars]
        out.write("[a:vars]\nansible_group_priority=5\n")
    h1 = load_inventory(tmp_path / "hosts").devices[0]
    assert dict(h1.vars) == {"v": "a", "w": "child"}  # a (priority 5) now applies after b (1); child is deeper


def test_a_folder_of_inventory_files(tmp_path: Path) -> None:
    write(tmp_path, {
        "01-boards.ini": "[pi4]\npi-01\n",
        "02-more.yml": "all:\n  children:\n    pi4:\n      hosts:\n        pi-02:\n",
        "notes.md": "not read",
        "old.retry": "pi-09\n",
        "group_vars/pi4.yml": "mace_version: v1\n",
        "sub/03-jets": "[jets]\njet-1\n",
    })
    inventory = load_inventory(tmp_path)
    assert [d.name for d in inventory.devices] == ["pi-01", "pi-02", "jet-1"]
    assert all(d.vars.get("mace_version") == "v1" for d in inventory.devices[:2])
    assert inventory.groups["pi4"].devices == ("pi-01", "pi-02")


@pytest.mark.parametrize(
    ("line", "hosts"),
    [
        ("pi[01:03]", "pi01 pi02 pi03"),
        ("pi[1:10:4]", "pi1 pi5 pi9"),
        ("node-[a:f:2]", "node-a node-c node-e"),
        ("r[1:2]c[a:b]", "r1ca r1cb r2ca r2cb"),
        ("[0:1].lab", "0.lab 1.lab"),
        ("10.0.0.[7:8]", "10.0.0.7 10.0.0.8"),
    ],
)
def test_host_ranges(tmp_path: Path, line: str, hosts: str) -> None:
    (tmp_path / "hosts").write_text(f"[g]\n{line}\n")
    assert [d.name for d in load_inventory(tmp_path / "hosts").devices] == hosts.split()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("-J ops@jump", {"proxy_jump": "ops@jump"}),
        ("-o 'ProxyCommand=ssh -W %h:%p -p 2022 gate'", {"proxy_jump": "gate:2022"}),
        ("-o StrictHostKeyChecking=accept-new -p 2200 -l me", {"host_key_checking": "accept-new", "port": 2200,
                                                               "user": "me"}),
        ("-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null", {"host_key_checking": "strict"}),
        ("-o ConnectTimeout=7 -o ServerAliveInterval=30 -C", {"connect": 7.0}),
    ],
)
def test_ssh_args_that_map(tmp_path: Path, args: str, expected: dict[str, object]) -> None:
    (tmp_path / "hosts").write_text(f'[g]\nh ansible_ssh_extra_args="{args}"\n')
    d = load_inventory(tmp_path / "hosts").devices[0]
    seen = {"proxy_jump": d.proxy_jump, "host_key_checking": d.ssh.host_key_checking, "port": d.port,
            "user": d.user, "connect": d.timeouts.connect}
    assert {k: seen[k] for k in expected} == expected


def test_explicit_ansible_vars_beat_ssh_args_and_auto_python_is_ours(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("h ansible_ssh_common_args='-p 2200' ansible_port=2300 "
                                    "ansible_python_interpreter=auto_silent\n")
    d = load_inventory(tmp_path / "hosts").devices[0]
    assert (d.port, d.python) == (2300, "python3")


# --- detection ----------------------------------------------------------------------------------------------

DETECT = [
    ("ours", "devices:\n  - {name: a, host: x}\n", "deploy"),
    ("ours, mapping form", "devices:\n  a: {host: x}\n", "deploy"),
    ("ours, broken", "defaults: {}\n", "deploy"),
    ("mace", "devices:\n  nanopi:\n    address: 10.0.0.2\n    username: pi\n", "mace"),
    ("ansible yaml", "all:\n  hosts:\n    a:\n", "ansible-yaml"),
    ("ansible yaml, groups only", "web:\n  hosts: {a: null}\ndb:\n", "ansible-yaml"),
    ("ansible ini", "[web]\na\n", "ansible-ini"),
    ("ini, no section", "a ansible_host=1.2.3.4\nb\n", "ansible-ini"),
    ("ini that is not yaml", "a:2222\nb x=1\n[g:vars]\nk: v\n", "ansible-ini"),
]


@pytest.mark.parametrize(("text", "form"), [(t, f) for _, t, f in DETECT], ids=[i for i, _, _ in DETECT])
def test_detect(tmp_path: Path, text: str, form: str) -> None:
    (tmp_path / "inv").write_text(text)
    assert detect(str(tmp_path / "inv")) == form


def test_detect_folder_and_ssh(tmp_path: Path) -> None:
    assert detect(str(tmp_path)) == "ansible" and detect("ssh:pi-01,pi-02") == "ssh"


def test_fleet_format_overrides_detection(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "hosts"
    path.write_text("[g]\nh1\n")
    assert cli("inventory", "check", "--fleet", path, "--fleet-format", "ansible-ini").code == 0
    run = cli("inventory", "check", "--fleet", path, "--fleet-format", "ansible-yaml")
    assert run.code == 2 and run.err.startswith(f"deploy: {path}:2: invalid YAML"), run.err
    run = cli("inventory", "check", "--fleet", path, "--fleet-format", "deploy")
    assert run.code == 2 and f"{path}:2:" in run.err


# --- bad input: (id, file name, text, line, words) -----------------------------------------------------------

BAD: list[tuple[str, str, str, int, str]] = [
    ("section never closes", "hosts", "[web\nh1\n", 1, "section header '[web' never closes"),
    ("section with spaces", "hosts", "[web servers]\n", 1, "invalid section header"),
    ("section of unknown kind", "hosts", "[web:hosts2]\n", 1, "unknown kind 'hosts2'"),
    ("reversed range", "hosts", "[g]\npi[3:1]\n", 2, "host range 'pi[3:1]': the range [3:1] ends before it begins"),
    ("range without end", "hosts", "[g]\npi[3:]\n", 2, "has no end"),
    ("range of mixed width", "hosts", "[g]\npi[01:100]\n", 2, "equal width"),
    ("huge range", "hosts", "[g]\nh[0:99999999]\n", 2, "expands to over 10000 hosts"),
    ("range of words", "hosts", "[g]\npi[ab:cd]\n", 2, "numbers or of single letters"),
    ("host var without =", "hosts", "[g]\nh1 ansible_user\n", 2, "host var 'ansible_user' needs key=value"),
    ("group var without =", "hosts", "[g]\nh1\n[g:vars]\nowner\n", 4, "[g:vars]: expected key=value"),
    ("vars of no group", "hosts", "[g]\nh1\n[nope:vars]\nk=v\n", 3, "[nope:vars] is for a group that is never"),
    ("child never declared", "hosts", "[g]\nh1\n[p:children]\nnope\n", 4, "names 'nope', a group that is never"),
    ("unclosed quote", "hosts", "[g]\nh1 k='x\n", 2, "cannot read this host line"),
    ("port without number", "hosts", "[g]\nh1:\n", 2, "a ':' must be followed by a port"),
    ("yaml group is a list", "inv.yml", "all:\n  children:\n    web:\n      - h1\n", 4,
     "group 'web' must be a mapping of hosts, children and vars (got a list)"),
    ("yaml unknown key", "inv.yml", "all:\n  host:\n    h1:\n", 2, "unknown key in a group"),
    ("yaml hosts a list", "inv.yml", "all:\n  hosts:\n    - h1\n", 3, "expected a mapping (got a list)"),
    ("yaml host vars a list", "inv.yml", "all:\n  hosts:\n    h1: [a]\n", 3, "expected a mapping (got a list)"),
    ("yaml host a number", "inv.yml", "all:\n  hosts:\n    12:\n", 3, "must be text: quote it"),
    ("inventory plugin", "aws_ec2.yml", "plugin: amazon.aws.aws_ec2\nregions: [eu-west-1]\n", 1,
     "inventory plugins are not supported"),
    ("dynamic script", "inv.py", "#!/usr/bin/env python3\nprint('{}')\n", 1, "a dynamic inventory script"),
    ("vaulted file", "hosts", "$ANSIBLE_VAULT;1.1;AES256\n6162\n", 1, "a vaulted file"),
    ("password", "hosts", "[g]\nh1\nh2 ansible_password=hunter2\n", 3,
     "field 'ansible_password': host 'h2': passwords are never used"),
    ("ssh pass from group", "hosts", "[g]\nh1\n[g:vars]\nansible_ssh_pass=x\n", 4, "host 'h1': passwords"),
    ("become", "hosts", "h1 ansible_become=true\n", 1, "field 'ansible_become': host 'h1': privilege escalation"),
    ("become user", "inv.yml", "all:\n  vars:\n    ansible_become_user: root\n  hosts: {h1: }\n", 3,
     "privilege escalation"),
    ("vaulted value", "inv.yml",
     "all:\n  hosts:\n    h1:\n      token: !vault |\n        $ANSIBLE_VAULT;1.1;AES256\n        6162\n", 4,
     "field 'token': host 'h1': a vaulted value: vault is not supported"),
    ("template", "hosts", "h1 ansible_host='{{ inventory_hostname }}.lab'\n", 1, "a Jinja template"),
    ("winrm", "hosts", "h1 ansible_connection=winrm\n", 1, "connection 'winrm' is not supported"),
    ("unknown deploy var", "hosts", "h1 deploy_remote_directory=/x\n", 1,
     "unknown deploy_ variable; did you mean 'remote_dir'?"),
    ("bad deploy value", "hosts", "h1 deploy_remote_dir='a b'\n", 1, "field 'deploy_remote_dir': expected a path"),
    ("bad deploy mapping", "hosts", "h1 deploy_opencl=\"{'device_type': 'gpx'}\"\n", 1,
     "field 'deploy_opencl.device_type': expected one of gpu"),
    ("bad port", "hosts", "h1 ansible_port=99999\n", 1, "field 'ansible_port': expected a port 1-65535"),
    ("ssh arg unsupported", "hosts", "h1 ansible_ssh_extra_args='-R 8080:localhost:80'\n", 1,
     "ssh argument '-R' is not supported"),
    ("ssh option unsupported", "hosts", "h1 ansible_ssh_common_args='-o Ciphers=aes128-ctr'\n", 1,
     "ssh option 'ciphers' is not supported"),
    ("proxy command other", "hosts", "h1 ansible_ssh_common_args='-o ProxyCommand=\"nc -x p %h %p\"'\n", 1,
     "only 'ssh -W %h:%p host'"),
    ("host named like a group", "hosts", "[web]\nweb\n", 2, "host 'web' is also the name of a group"),
    ("host name not a folder name", "hosts", "[g]\n[fe80::1]:22\n", 2, "cannot be a device name here"),
    ("host name is a path", "hosts", "[g]\n/etc/hostname\n", 2,  # never read as host_vars//etc/hostname
     "host name '/etc/hostname' cannot be a device name here"),
    ("group name is a path", "hosts", "[../up]\nh1\n", 1, "group name '../up' cannot be a device name here"),
    ("group priority not a number", "hosts", "[g]\nh1\n[g:vars]\nansible_group_priority=high\n", 4,
     "group 'g': expected an integer"),
    ("no hosts", "hosts", "[g]\n[g:vars]\nk=v\n", 0, "no hosts in this Ansible inventory"),
]


@pytest.mark.parametrize(("name", "text", "line", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(tmp_path: Path, name: str, text: str, line: int, words: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    assert caught.value.where == Where(str(path), line), str(caught.value)
    assert words in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_bad_vars_file_names_its_line(tmp_path: Path) -> None:
    write(tmp_path, {"hosts": "[g]\nh1\n", "group_vars/g/main.yml": "owner: a\ndeploy_connect_retries: 99\n"})
    with pytest.raises(InventoryError) as caught:
        load_inventory(tmp_path / "hosts")
    assert caught.value.where == Where(str(tmp_path / "group_vars/g/main.yml"), 2)
    assert "field 'deploy_connect_retries': expected an integer 0-10" in str(caught.value)


def test_inventory_size_cap_applies_to_vars_files(tmp_path: Path) -> None:
    write(tmp_path, {"hosts": "h1\n"})
    (tmp_path / "host_vars").mkdir()
    with open(tmp_path / "host_vars" / "h1.yml", "wb") as out:
        out.truncate((4 << 20) + 1)
    with pytest.raises(InventoryError, match=r"over the limit of 4194304") as caught:
        load_inventory(tmp_path / "hosts")
    assert caught.value.where == Where(str(tmp_path / "host_vars" / "h1.yml"))


def test_cli_names_file_and_line(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "hosts"
    path.write_text("[g]\nh1 ansible_become_method=sudo\n")
    run = cli("inventory", "list", "--fleet", path)
    assert run.code == 2 and run.out == ""
    assert run.err.strip() == (f"deploy: {path}:2: device 'h1': field 'ansible_become_method': host 'h1': privilege "
                               "escalation (become) is not supported: deployer runs as the login user")


# --- --limit on an Ansible inventory ---------------------------------------------------------------------------

LIMITS = [
    ("pis", "pi01.lab pi02.lab pi03.lab jet-1 pi5-a pi5-b pi5-c"),
    ("pis:&pi5", "pi5-a pi5-b pi5-c"),
    ("pis:!pi4", "pi5-a pi5-b pi5-c"),
    ("pi4[0]", "pi01.lab"),
    ("pi4[-1]", "jet-1"),
    ("pis[1:2]", "pi02.lab pi03.lab"),
    ("pi5[1:]", "pi5-b pi5-c"),
    ("~pi0[13]", "pi01.lab pi03.lab"),
    ("*.lab", "pi01.lab pi02.lab pi03.lab"),
    ("ungrouped", "ctl"),
    ("pi5-c,ctl", "ctl pi5-c"),
]


@pytest.mark.parametrize(("limit", "expected"), LIMITS, ids=[limit for limit, _ in LIMITS])
def test_limit(tmp_path: Path, limit: str, expected: str) -> None:
    (tmp_path / "hosts").write_text(LAB_INI)
    inventory = load_inventory(tmp_path / "hosts")
    assert [d.name for d in select(inventory, limit)] == expected.split()


def test_limit_from_file_and_named_sets_win(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text(LAB_INI)
    (tmp_path / "picked").write_text("pi5-a\n\n!pi01.lab\npi4\n")
    (tmp_path / "failed").write_text("ctl\n")
    inventory = load_inventory(tmp_path / "hosts")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert [d.name for d in select(inventory, "@picked")] == "pi02.lab pi03.lab jet-1 pi5-a".split()
        assert [d.name for d in select(inventory, "@failed", named_sets={"failed": ["jet-1"]})] == ["jet-1"]
        assert [d.name for d in select(inventory, "@./failed", named_sets={"failed": ["jet-1"]})] == ["ctl"]
        with pytest.raises(InputError, match=r"unknown set '@nope' \(known: none here\), and no file 'nope'"):
            select(inventory, "@nope")
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    ("limit", "words"),
    [
        ("pi-01", "'pi-01' matches no device or group; did you mean 'pi01.lab'?"),
        ("pis:!pi6", "'pi6' matches no device or group; did you mean 'pis'?"),
        ("pi4[9]", "'pi4[9]': 'pi4' picks 4 device(s), so there is no [9]"),
        ("~pi(", "'~pi(': not a regular expression"),
        ("empty:&pi4", "'empty' matches only groups that hold no device (empty)"),
        ("pi4:!pis", "'pi4:!pis' leaves no device"),
    ],
)
def test_limit_errors(tmp_path: Path, limit: str, words: str) -> None:
    (tmp_path / "hosts").write_text(LAB_INI + "[empty]\n")
    with pytest.raises(InputError) as caught:
        select(load_inventory(tmp_path / "hosts"), limit)
    assert words in caught.value.problem and caught.value.field == "limit"


# --- any input: an Inventory or an InventoryError with file:line ------------------------------------------------

INI_LINES = [
    "[g]", "[g:vars]", "[g:children]", "[p:children]", "[p]", "[all:vars]", "[g", "[g x]", "[g:foo]", "h1",
    "h1 a=1", "h[1:3] ansible_port=2200", "h[3:1]", "h[a:c:0]", "h[0:99999999]", "h[0:9][0:9][0:9][0:9][0:9]",
    "h1 ansible_password=x", "h1 ansible_connection=local", "h1 ansible_connection=docker", "g", "p", "k=v",
    "ansible_group_priority=x", "ansible_group_priority=2", "h1:", "h1:99999", "[::1]:22", "h1 x", "h1 'unclosed",
    "deploy_env={'A': 1}", "deploy_remote_dir=/x", "h1 ansible_ssh_common_args='-J a@b:22 -o Foo=1'", "# c", "; c",
    "h1 v=[[[[[[[[[[1]]]]]]]]]]", "h1 v=1e400", "h1 v=b'x'", "h1 v=...", "h1 v=1j", "---", "all:", "  hosts:",
    "    h2:", "      ansible_port: x", "  children:", "    g: [a]", "plugin: x", "#!/bin/sh", "$ANSIBLE_VAULT;1.1",
    "devices:", "  nanopi:", "  nano/pi:", "    address: 10.0.0.2", "    address: [a]", "    username: pi",
    "    password: x", "    target_socs: [a, {b: 1}]", "    models: M 4", "    system: android", "    host: x",
]


def check_any(tmp_path: Path, name: str, source: str | bytes) -> None:
    path = tmp_path / name
    path.write_bytes(source if isinstance(source, bytes) else source.encode("utf-8", "surrogatepass"))
    try:
        inventory = load_inventory(path)
    except InventoryError as error:
        assert error.where is not None and error.where.file.startswith(str(tmp_path)), str(error)
        assert error.where.line >= 1 or error.problem.startswith(("no hosts", "the inventory", "not UTF-8")) \
            or "no such file" in error.problem, str(error)
    else:
        assert inventory.devices
        for device in inventory.devices:
            describe(device)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(INI_LINES), max_size=10))
def test_any_ini_or_yaml_lines(tmp_path: Path, lines: list[str]) -> None:
    check_any(tmp_path, "hosts", "\n".join(lines) + "\n")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_any_text_as_hosts(tmp_path: Path, source: str | bytes) -> None:
    check_any(tmp_path, "hosts", source)
