"""`deploy inventory check|list`."""

from __future__ import annotations

import json

from rich.table import Table

from deployer.cli.app import (
    FleetFormatOption,
    FleetOption,
    JsonOption,
    LimitOption,
    inventory_app,
    select_devices,
    stdout,
)


@inventory_app.command("check")
def inventory_check(fleet: FleetOption, limit: LimitOption = None, fleet_format: FleetFormatOption = None,
                    as_json: JsonOption = False) -> None:
    """Validate an inventory (and a --limit) without touching any device."""
    devices = select_devices(fleet, limit, form=fleet_format)
    if as_json:
        stdout.print_json(json.dumps({"ok": True, "devices": [d.name for d in devices]}))
    else:
        stdout.print(f"{fleet}: ok, {len(devices)} device(s) selected")


@inventory_app.command("list")
def inventory_list(fleet: FleetOption, limit: LimitOption = None, fleet_format: FleetFormatOption = None,
                   as_json: JsonOption = False) -> None:
    """List the selected devices with their resolved settings (secrets hidden)."""
    from deployer.config.inventory import describe

    devices = select_devices(fleet, limit, form=fleet_format)
    if as_json:
        stdout.print_json(json.dumps({"devices": [describe(d) for d in devices]}))
        return
    table = Table("device", "address", "user", "groups", "remote dir", "python")
    for d in devices:
        address = "local" if d.is_local else f"{d.host}:{d.port}"
        table.add_row(d.name, address, d.user, ",".join(d.groups), d.remote_dir, d.python)
    stdout.print(table)
