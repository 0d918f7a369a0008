"""deploy against ansible-core itself: over generated Ansible inventories (INI and YAML, groups, children,
ranges, priorities, group_vars/ and host_vars/) and generated `--limit` patterns, deploy picks exactly the
hosts Ansible's InventoryManager picks, and resolves the same variables as Ansible's VariableManager (what
`ansible-inventory --list` prints, checked once through that command too).

Where deploy is stricter on purpose, the test checks that the strictness is the reason: a pattern deploy
refuses as matching nothing matches nothing in Ansible too, and a limit deploy finds empty is empty there.
Hypothesis budget: about a minute on a shared 2-core machine (250 inventories, 6 patterns each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.config.formats.ansible import resolved_vars
from deployer.config.inventory import Inventory, load_inventory
from deployer.config.selection import select, split_patterns
from deployer.errors import InputError
from tests.conftest import private_home

ansible_manager = pytest.importorskip("ansible.inventory.manager", reason="ansible-core is a test dependency")
from ansible.errors import AnsibleError  # noqa: E402
from ansible.parsing.dataloader import DataLoader  # noqa: E402
from ansible.vars.manager import VariableManager  # noqa: E402

HOSTS = ["pi01", "pi02", "web1", "db.lab", "jet-a", "n1", "x"]
RANGES = ["n[1:3]", "r[a:c]", "s[01:10:4]", "pi0[1:2]"]
GROUPS = ["pis", "web", "g1", "g2", "lab", "db"]
KEYS = ["ansible_host", "ansible_port", "ansible_user", "deploy_remote_dir", "mace_version", "owner"]
VALUES: dict[str, list[Any]] = {
    "ansible_host": ["10.0.0.1", "h.lab"],
    "ansible_port": [22, 2200, 2222],
    "ansible_user": ["pi", "ops"],
    "deploy_remote_dir": ["/opt/a", "~/b"],
    "mace_version": ["v1", "v2"],
    "owner": ["x", "y", "z"],
}


@dataclass
class GenGroup:
    name: str
    hosts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenInventory:
    groups: list[GenGroup]
    loose: list[tuple[str, dict[str, Any]]]  # hosts before any section (INI) / under all (YAML)
    all_vars: dict[str, Any]
    form: str
    group_vars: dict[str, tuple[str, dict[str, Any]]]  # group -> (layout, vars)
    host_vars: dict[str, dict[str, Any]]
    nest: bool = False  # YAML: child groups defined inside their parent


def var_maps() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(KEYS), st.none(), max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.sampled_from(VALUES[k]) for k in keys})
    )


host_entries = st.lists(st.tuples(st.sampled_from(HOSTS + RANGES), var_maps()), max_size=3)
group_hosts = st.integers(0, 3).flatmap(  # one group in four holds no host of its own
    lambda k: st.just([]) if k == 0 else st.lists(st.tuples(st.sampled_from(HOSTS + RANGES), var_maps()),
                                                  min_size=1, max_size=3))


@st.composite
def inventories(draw: st.DrawFn) -> GenInventory:
    names = draw(st.lists(st.sampled_from(GROUPS), min_size=1, max_size=5, unique=True))
    groups = []
    for index, name in enumerate(names):
        later = names[index + 1 :]  # children only among later groups: no cycles
        children = draw(st.lists(st.sampled_from(later), unique=True, max_size=2)) if later else []
        group_vars = draw(var_maps())
        if draw(st.booleans()):
            group_vars["ansible_group_priority"] = draw(st.integers(0, 3))
        groups.append(GenGroup(name, draw(group_hosts), children, group_vars))
    loose = draw(host_entries)
    if not loose and not any(g.hosts for g in groups):
        loose = [("x", {})]
    gv_names = draw(st.lists(st.sampled_from(["all", *names]), unique=True, max_size=3))
    group_files = {g: (draw(st.sampled_from(["file", "yml", "folder"])), draw(var_maps())) for g in gv_names}
    host_files = draw(st.dictionaries(st.sampled_from(HOSTS), var_maps(), max_size=2))
    return GenInventory(groups, loose, draw(var_maps()), draw(st.sampled_from(["ini", "yaml"])), group_files,
                        host_files, draw(st.booleans()))


def ini_value(value: Any) -> str:
    return str(value)


def render(inventory: GenInventory, folder: Path) -> Path:
    if inventory.form == "ini":
        lines = [" ".join([h, *(f"{k}={ini_value(v)}" for k, v in hv.items())]) for h, hv in inventory.loose]
        for group in inventory.groups:
            lines.append(f"[{group.name}]")
            lines += [" ".join([h, *(f"{k}={ini_value(v)}" for k, v in hv.items())]) for h, hv in group.hosts]
            if group.vars:
                lines.append(f"[{group.name}:vars]")
                lines += [f"{k}={ini_value(v)}" for k, v in group.vars.items()]
            if group.children:
                lines.append(f"[{group.name}:children]")
                lines += group.children
        if inventory.all_vars:
            lines.append("[all:vars]")
            lines += [f"{k}={ini_value(v)}" for k, v in inventory.all_vars.items()]
        path = folder / "hosts"
        path.write_text("\n".join(lines) + "\n")
    else:
        def hosts(entries: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, values in entries:
                out[name] = {**(out.get(name) or {}), **values} or None
            return out

        bodies: dict[str, dict[str, Any]] = {}
        for group in inventory.groups:
            body: dict[str, Any] = {}
            if group.hosts:
                body["hosts"] = hosts(group.hosts)
            if group.vars:
                body["vars"] = group.vars
            if group.children:
                body["children"] = {child: None for child in group.children}
            bodies[group.name] = body
        nested: set[str] = set()
        if inventory.nest:  # a child's definition inside its first parent's `children`, as labs often write it
            for group in inventory.groups:
                for child in group.children:
                    if child not in nested:
                        bodies[group.name]["children"][child] = bodies[child] or None
                        nested.add(child)
        tree = {name: body or None for name, body in bodies.items() if name not in nested}
        top: dict[str, Any] = {"hosts": hosts(inventory.loose)} if inventory.loose else {}
        if inventory.all_vars:
            top["vars"] = inventory.all_vars
        document = {"all": top or None, **tree}
        path = folder / "hosts.yml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    for group_name, (layout, values) in inventory.group_vars.items():
        target = {"file": f"group_vars/{group_name}", "yml": f"group_vars/{group_name}.yml",
                  "folder": f"group_vars/{group_name}/main.yml"}[layout]
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        (folder / target).write_text(yaml.safe_dump(values))
    for host, values in inventory.host_vars.items():
        (folder / "host_vars").mkdir(exist_ok=True)
        (folder / "host_vars" / f"{host}.yaml").write_text(yaml.safe_dump(values))
    return path


ATOMS = [*HOSTS, "n2", "rb", "s05", *GROUPS, "ungrouped", "all", "*", "pi*", "*.lab", "g?", "[gw]*", "n[12]",
         "~pi0[12]", "~g", "~.*b", "nope", "pis[0]", "pis[1:2]", "g1[-1]", "lab[0:]", "web[1:0]", "g2[5]", "*[0]"]
EXPANDED = {"n[1:3]": ["n1", "n2", "n3"], "r[a:c]": ["ra", "rb", "rc"], "s[01:10:4]": ["s01", "s05", "s09"],
            "pi0[1:2]": ["pi01", "pi02"]}


@st.composite
def limits(draw: st.DrawFn, generated: GenInventory) -> str:
    """A limit of 1-3 patterns, mostly over names this inventory has (so most limits pick something)."""
    groups = [g.name for g in generated.groups]
    hosts = [n for g in generated.groups for h, _ in g.hosts for n in EXPANDED.get(h, [h])]
    hosts += [n for h, _ in generated.loose for n in EXPANDED.get(h, [h])]
    subscripts = [f"{g}[{i}]" for g in groups for i in (0, 1, -1)] + [f"{g}[{i}:{j}]" for g in groups
                                                                       for i, j in ((0, 1), (1, 3), (2, 0))]
    atom = st.sampled_from(groups + hosts) | st.sampled_from(subscripts) | st.sampled_from(ATOMS)
    parts = draw(st.lists(st.tuples(st.sampled_from(["", "", "", "!", "&"]), atom), min_size=1, max_size=3))
    return draw(st.sampled_from([",", ":"])).join(prefix + name for prefix, name in parts)


@pytest.fixture(scope="module", autouse=True)
def quiet_ansible(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Ansible writes under HOME (~/.ansible/tmp) and warns about unmatched patterns: keep both here."""
    with private_home(tmp_path_factory.mktemp("ansible-home"), ANSIBLE_HOST_PATTERN_MISMATCH="ignore",
                      ANSIBLE_LOCALHOST_WARNING="false"):
        yield


def fixed_order(manager: Any, name: str) -> bool:
    """Whether Ansible's order of a group's hosts is fixed: below the first level it walks a set of groups,
    so with two groups of one level holding children the order (and a subscript's pick) is the hash's."""
    group = manager._inventory.groups[name]
    level, seen = list(group.child_groups), {group.name}
    while level:
        if sum(1 for g in level if g.child_groups) > 1:
            return False
        seen.update(g.name for g in level)
        level = [c for g in level for c in g.child_groups if c.name not in seen]
    return True


def subscripts_are_fixed(manager: Any, limit: str) -> bool:
    for pattern in split_patterns(limit):
        expr = pattern.lstrip("!&")
        if expr.endswith("]") and "[" in expr and not expr.startswith("~"):
            base = expr[: expr.rindex("[")]
            matched = manager._match_list(manager._inventory.groups, base)
            if not all(fixed_order(manager, g) for g in matched):
                return False
    return True


def check_limit(inventory: Inventory, manager: Any, limit: str) -> None:
    try:
        manager.subset(limit)
        theirs: list[str] | None = [h.name for h in manager.get_hosts("all")]
    except AnsibleError:
        theirs = None  # a subscript past the end: an error in both
    finally:
        manager.subset(None)
    try:
        ours = [d.name for d in select(inventory, limit)]
    except InputError as error:
        if theirs is None or not theirs:
            return
        refused = [p for p in split_patterns(limit) if p.lstrip("!&") and p not in manager._inventory.hosts
                   and not manager._match_one_pattern(p)]
        said = ("matches no device or group", "matches only groups that hold no device")
        assert refused and any(words in error.problem for words in said), (limit, error.problem, theirs)
        return
    assert theirs is not None, (limit, ours)
    assert set(ours) == set(theirs), (limit, ours, theirs)
    order = [d.name for d in inventory.devices]
    assert ours == [name for name in order if name in set(ours)]


def check_vars(path: Path, inventory: Inventory, manager: Any) -> None:
    variables = VariableManager(loader=DataLoader(), inventory=manager)
    ours = resolved_vars(str(path))
    by_name = {d.name: d for d in inventory.devices}
    assert list(ours) == [d.name for d in inventory.devices]
    for host in manager.get_hosts("all"):
        theirs = variables.get_vars(host=host, include_hostvars=False, stage="all")
        mine = ours[host.name]
        assert {k: theirs[k] for k in KEYS if k in theirs} == {k: mine[k] for k in KEYS if k in mine}, host.name
        device = by_name[host.name]
        assert device.host == theirs.get("ansible_host", host.name)
        assert device.port == theirs.get("ansible_port", 22)
        assert device.user == theirs.get("ansible_user", "tester")
        assert device.remote_dir == theirs.get("deploy_remote_dir", "~/.deployer")
        assert device.vars.get("owner") == theirs.get("owner")
        group_names = sorted(g.name for g in host.get_groups() if g.name != "all")
        assert sorted(device.groups) == group_names


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inventories().flatmap(lambda g: st.tuples(st.just(g), st.lists(limits(g), min_size=6, max_size=6))))
def test_same_hosts_and_vars_as_ansible(case: tuple[GenInventory, list[str]]) -> None:
    generated, patterns = case
    with tempfile.TemporaryDirectory() as folder:
        path = render(generated, Path(folder))
        inventory = load_inventory(path)
        manager = ansible_manager.InventoryManager(loader=DataLoader(), sources=[str(path)])
        assert {d.name for d in inventory.devices} == set(manager.hosts)
        check_vars(path, inventory, manager)
        for limit in patterns:
            if subscripts_are_fixed(manager, limit):
                check_limit(inventory, manager, limit)


def test_same_vars_as_ansible_inventory_list(tmp_path: Path) -> None:
    """Once through the command itself: `ansible-inventory --list` and deploy agree on every host's vars."""
    (tmp_path / "hosts").write_text(
        "ctl ansible_connection=local\n[pi4]\npi[01:02] ansible_user=pi\n[pi5]\npi5-[a:b]:2200 owner=p5\n"
        "[pis:children]\npi4\npi5\n[pis:vars]\nmace_version=v1\nowner=pis\n"
    )
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "pi4.yml").write_text("owner: pi4-file\ndeploy_remote_dir: /srv/d\n")
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "host_vars" / "pi02").write_text("ansible_port: 2022\n")
    command = Path(sys.executable).with_name("ansible-inventory")
    done = subprocess.run([str(command), "-i", str(tmp_path / "hosts"), "--list"], capture_output=True, text=True,
                          check=True, env={**os.environ, "ANSIBLE_NOCOLOR": "1"}, timeout=120)
    hostvars = json.loads(done.stdout)["_meta"]["hostvars"]
    ours = resolved_vars(str(tmp_path / "hosts"))
    assert set(hostvars) == set(ours) == {"ctl", "pi01", "pi02", "pi5-a", "pi5-b"}
    for host, values in hostvars.items():
        assert ours[host] == values, host
    assert hostvars["pi02"]["ansible_port"] == 2022 and hostvars["pi01"]["owner"] == "pi4-file"
