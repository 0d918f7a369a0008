"""MACE's devices.yml, where each value came from (`inventory list --origins`, JSON `origins`), `inventory
graph`, and `inventory convert --to yaml`: per format, reading the converted file back gives the same devices.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deployer.config.inventory import Inventory, describe, load_inventory
from deployer.errors import InventoryError, Where
from tests.conftest import REPO, Cli, private_home
from tests.test_inventory_ansible import LAB_INI, LAB_YAML


@pytest.fixture(autouse=True)
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("home")
    (folder / ".ssh").mkdir()
    (folder / ".ssh" / "config").write_text(
        "Host lab-pi\n  HostName 10.8.0.23\n  Port 2200\nHost bastion\n  HostName 10.9.9.9\n  User ops\n"
    )
    with private_home(folder):
        yield folder


MACE = """\
devices:
  nanopi:
    target_abis: [arm64-v8a, armeabi-v7a]
    target_socs: RK3399
    models: Nanopi M4
    address: 10.0.0.2
    username: pi
    password: "123"
  raspberry:
    target_abis: [armv7l]
    target_socs: BCM2837
    models: Raspberry Pi 3 Model B Plus Rev 1.3
    address: lab-pi
"""


def test_mace_devices_yml(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "devices.yml"
    path.write_text(MACE)
    inventory = load_inventory(path)
    nanopi, pi = inventory.devices
    assert inventory.format == "mace" and (nanopi.host, nanopi.user, nanopi.port) == ("10.0.0.2", "pi", 22)
    assert dict(nanopi.labels) == {"target_socs": "RK3399", "target_abis": "arm64-v8a,armeabi-v7a",
                                   "models": "Nanopi M4"}
    assert (pi.host, pi.port, pi.user) == ("10.8.0.23", 2200, "tester")  # through ~/.ssh/config
    assert inventory.notes == (f"{path}:8: device 'nanopi': field 'password': not used: deployer logs in with keys "
                               "or the SSH agent (ssh-copy-id the board once)",)
    run = cli("inventory", "check", "--fleet", path)
    assert run.code == 0 and "ok (mace), 2 device(s)" in run.out
    assert f"deploy: note: {path}:8: device 'nanopi': field 'password': not used" in run.err
    assert "123" not in run.err + run.out


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("devices:\n  R58M123:\n    target_abis: [arm64-v8a]\n    target_socs: sdm845\n    models: MI 8\n", 2,
         "device 'R58M123': this is MACE's Android kind of devices.yml"),
        ("devices:\n  p:\n    address: 1.2.3.4\n    system: android\n", 2, "Android kind"),
        ("devices:\n  p:\n    address: 1.2.3.4\n    usernme: pi\n", 4, "field 'usernme': unknown field; did you "
         "mean 'username'?"),
        ("devices:\n  p:\n    address: 1.2.3.4\n    target_socs: {a: 1}\n", 4, "expected text or a list of text"),
        ("devices:\n  p:\n    address: [1, 2]\n    username: pi\n", 3,
         "field 'address': expected a single value (got a list)"),
    ],
)
def test_mace_bad_input(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = tmp_path / "devices.yml"
    path.write_text(text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path, "mace")
    assert caught.value.where == Where(str(path), line) and words in str(caught.value), str(caught.value)


def test_origins_of_our_yaml(tmp_path: Path, home: Path, cli: Cli) -> None:
    path = tmp_path / "lab.yml"
    path.write_text("defaults:\n  user: pi\n  remote_dir: /opt/d\ndevices:\n  - name: a\n    host: lab-pi\n"
                    "    python: python3.11\n")
    (a,) = load_inventory(path).devices
    config = str(home / ".ssh" / "config")
    assert a.origins["python"] == f"{path}:7"
    assert a.origins["user"] == f"{path}:2 (defaults)" and a.origins["remote_dir"] == f"{path}:3 (defaults)"
    assert a.origins["host"] == a.origins["port"] == f"{config} (Host lab-pi)"
    assert a.origins["timeouts"] == "default"
    run = cli("inventory", "list", "--fleet", path, "--json")
    assert run.code == 0 and run.json()["devices"][0]["origins"]["python"] == f"{path}:7"
    run = cli("inventory", "list", "--fleet", path, "--origins")
    assert f'  port: 2200  [{config} (Host lab-pi)]' in run.out and f'  python: "python3.11"  [{path}:7]' in run.out


def test_origins_of_ansible_vars(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("[g]\nh1 ansible_user=pi\n")
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "g.yml").write_text("# lab\nowner: ml\ndeploy_remote_dir: /srv\n")
    (h1,) = load_inventory(tmp_path / "hosts").devices
    assert h1.origins["user"] == f"{tmp_path / 'hosts'}:2"
    assert h1.origins["remote_dir"] == f"{tmp_path / 'group_vars' / 'g.yml'}:3"
    assert h1.origins["vars.owner"] == f"{tmp_path / 'group_vars' / 'g.yml'}:2"
    assert h1.origins["port"] == "default"


def test_graph(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "hosts").write_text(LAB_INI)
    run = cli("inventory", "graph", "--fleet", tmp_path / "hosts")
    assert run.code == 0
    assert run.out.splitlines()[:6] == ["@all:", "  |--@ungrouped:", "  |  |--ctl", "  |--@pis:", "  |  |--@pi4:",
                                        "  |  |  |--pi01.lab"]
    tree = cli("inventory", "graph", "--fleet", tmp_path / "hosts", "--json").json()
    assert tree["pis"] == {"children": ["pi4", "pi5"], "hosts": []} and tree["ungrouped"]["hosts"] == ["ctl"]
    run = cli("inventory", "graph", "--fleet", REPO / "inventory" / "pis.yml")
    assert run.code == 0 and run.out.startswith("@all:\n")


def same_devices(first: Inventory, second: Inventory) -> None:
    def view(inventory: Inventory) -> list[dict[str, object]]:
        out = []
        for d in inventory.devices:
            seen = describe(d)
            seen.pop("where"), seen.pop("origins")
            seen["env"] = dict(d.env)  # the values themselves, not ***
            out.append(seen)
        return out

    assert view(first) == view(second)
    assert list(first.groups) == [g for g in second.groups if g in first.groups]


FORMATS = {
    "deploy": ("lab.yml", (REPO / "inventory" / "pis.yml").read_text()),
    "ansible-ini": ("hosts", LAB_INI),
    "ansible-yaml": ("hosts.yml", LAB_YAML),
    "mace": ("devices.yml", MACE),
}


@pytest.mark.parametrize("form", [*FORMATS, "ansible folder", "ssh"])
def test_convert_round_trip(tmp_path: Path, cli: Cli, form: str) -> None:
    if form == "ssh":
        source = "ssh:lab-pi,bastion"
    elif form == "ansible folder":
        (tmp_path / "inv" / "group_vars").mkdir(parents=True)
        (tmp_path / "inv" / "1.ini").write_text(LAB_INI)
        (tmp_path / "inv" / "2.yml").write_text("all:\n  children:\n    extra:\n      hosts:\n        lab-pi:\n")
        (tmp_path / "inv" / "group_vars" / "pi5.yml").write_text("deploy_timeouts: {connect: 3}\nowner: five\n")
        source = str(tmp_path / "inv")
    else:
        name, text = FORMATS[form]
        (tmp_path / name).write_text(text)
        source = str(tmp_path / name)
    converted = tmp_path / "converted.yml"
    run = cli("inventory", "convert", "--fleet", source, "--to", "yaml", "--output", converted)
    assert run.code == 0, run.err
    again = load_inventory(converted)
    assert again.format == "deploy"
    same_devices(load_inventory(source), again)
    run = cli("inventory", "convert", "--fleet", source, "--to", "yaml", "--output", converted)
    assert run.code == 2 and "exists" in run.err
    run = cli("inventory", "convert", "--fleet", source, "--to", "ini")
    assert run.code == 2 and "field '--to': can write 'yaml' only" in run.err


def test_convert_to_stdout_keeps_env_values(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "hosts").write_text("h1 deploy_env=\"{'TOKEN': 's3cret'}\"\n")
    run = cli("inventory", "convert", "--fleet", tmp_path / "hosts", "--to", "yaml")
    assert run.code == 0 and "TOKEN: s3cret" in run.out
    assert "s3cret" not in cli("inventory", "list", "--fleet", tmp_path / "hosts", "--json").out
