"""`deploy inventory check|list|graph|convert`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from deployer.cli.app import (
    FleetFormat,
    FleetFormatOption,
    FleetOption,
    InventoryLimitOption,
    JsonOption,
    inventory_app,
    select_devices,
    stderr,
    stdout,
)
from deployer.cli.render import emit_json, shown
from deployer.errors import InputError

if TYPE_CHECKING:
    from deployer.config.inventory import Group, Inventory


@inventory_app.command("check")
def inventory_check(fleet: FleetOption, limit: InventoryLimitOption = None, fleet_format: FleetFormatOption = None,
                    as_json: JsonOption = False) -> None:
    """Validate an inventory (and a --limit) without touching any device."""
    inventory = _load(fleet, fleet_format)
    devices = select_devices(fleet, limit, form=fleet_format)
    if as_json:
        emit_json({"ok": True, "format": inventory.format, "devices": [d.name for d in devices],
                                      "notes": list(inventory.notes)})
    else:
        stdout.print(f"{shown(str(fleet))}: ok ({inventory.format}), {len(devices)} device(s) selected")


@inventory_app.command("list")
def inventory_list(
    fleet: FleetOption,
    limit: InventoryLimitOption = None,
    fleet_format: FleetFormatOption = None,
    origins: Annotated[bool, typer.Option("--origins", help="Each device's values with where each came from "
                                          "(file:line, the ssh config's Host block, or default).")] = False,
    as_json: JsonOption = False,
) -> None:
    """List the selected devices with their resolved settings (secrets hidden)."""
    from deployer.config.inventory import describe

    devices = select_devices(fleet, limit, form=fleet_format)
    if as_json:
        emit_json({"devices": [describe(d) for d in devices]})
        return
    if origins:
        for d in devices:
            view = describe(d)
            stdout.print(f"{shown(d.name)}  ({d.where})")
            for key, where in d.origins.items():
                value = json.dumps(view[key] if key in view else d.vars.get(key.removeprefix("vars.")))
                stdout.print(shown(f"  {key}: {value}  [{where}]"))
        return
    table = Table("device", "address", "user", "groups", "remote dir", "python", "from")
    for d in devices:
        address = "local" if d.is_local else f"{d.host}:{d.port}"
        table.add_row(d.name, address, d.user, ",".join(d.groups), d.remote_dir, d.python, str(d.where))
    stdout.print(table)


@inventory_app.command("graph")
def inventory_graph(fleet: FleetOption, fleet_format: FleetFormatOption = None, as_json: JsonOption = False) -> None:
    """The groups and their devices as a tree, as `ansible-inventory --graph` draws it."""
    from deployer.config.selection import group_tree

    tree = {g.name: g for g in group_tree(_load(fleet, fleet_format))}
    if as_json:
        emit_json({name: {"children": list(g.children), "hosts": list(g.members)}
                                      for name, g in tree.items()})
        return
    lines: list[str] = []
    _draw(tree, "all", 0, lines, set())
    stdout.print("\n".join(shown(line) for line in lines))


def _draw(tree: dict[str, Group], name: str, depth: int, lines: list[str], path: set[str]) -> None:
    indent = "  |" * depth
    lines.append(f"{indent}--@{name}:" if depth else f"@{name}:")
    for child in tree[name].children:
        if child not in path:
            _draw(tree, child, depth + 1, lines, path | {name})
    lines += [f"{indent}  |--{host}" for host in tree[name].members]


@inventory_app.command("convert")
def inventory_convert(
    fleet: FleetOption,
    to: Annotated[str, typer.Option("--to", help="The format to write: yaml (ours, docs/inventory.md).")],
    fleet_format: FleetFormatOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here (a new file) instead of "
                                                "stdout.")] = None,
) -> None:
    """Write any inventory (Ansible, devices.yml, ssh:...) as our YAML; reading it back gives the same devices."""
    from deployer.config.convert import to_yaml

    if to != "yaml":
        raise InputError(None, "--to", f"can write 'yaml' only (got {to!r})")
    text = to_yaml(_load(fleet, fleet_format))
    if output is None:
        stdout.out(text, end="", highlight=False)
        return
    try:
        with open(output, "x", encoding="utf-8") as out:
            out.write(text)
    except FileExistsError:
        raise InputError(None, "--output", f"{output} exists: give a new file name") from None
    except OSError as exc:
        raise InputError(None, "--output", f"cannot write {output} ({exc.strerror or exc})") from exc
    stderr.print(f"wrote {shown(str(output))}")


def _load(fleet: Path, form: FleetFormat | None) -> Inventory:
    from deployer.config.inventory import load_inventory

    return load_inventory(fleet, form.value if form is not None else None)
