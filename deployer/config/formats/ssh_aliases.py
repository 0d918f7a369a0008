"""`--fleet ssh:pi-01,pi-02`: devices named by `Host` aliases of `~/.ssh/config`, each reached as that alias
(HostName, Port, User, IdentityFile, ProxyJump from its block). An alias no `Host` line names literally is an
error with the nearest alias: a typo must not become a connection to a host of that name.
"""

from __future__ import annotations

from types import MappingProxyType

from deployer.config import sshconfig
from deployer.config.fields import did_you_mean
from deployer.config.formats.model import FleetSpec, GroupSpec, HostSpec
from deployer.errors import InputError, InventoryError, Where

PREFIX = "ssh:"


def load_aliases(spec: str, config_path: str = sshconfig.DEFAULT_PATH) -> FleetSpec:
    """The devices of `ssh:alias,alias` (duplicates once, in the order given)."""
    where = Where(spec)
    names = list(dict.fromkeys(a.strip() for a in spec.removeprefix(PREFIX).split(",") if a.strip()))
    if not names:
        raise InventoryError(where, None, "no aliases: write ssh:alias1,alias2 (Host names of ~/.ssh/config)")
    try:
        config = sshconfig.load_ssh_config(config_path)
    except InputError as exc:
        raise InventoryError(where, "ssh_config", str(exc)) from exc
    known = config.literal_hosts()
    for name in names:
        if name.lower() not in {k.lower() for k in known}:
            raise InventoryError(where, None, f"{name!r} is no Host alias of {config.path}"
                                              f"{did_you_mean(name, known)} (aliases: {', '.join(known) or 'none'})")
    origin = f"{config.path} (Host block)"
    hosts = tuple(
        HostSpec(name, where, {"host": name}, MappingProxyType({}), MappingProxyType({"host": origin}))
        for name in names
    )
    groups = (
        GroupSpec("all", where, (), ("ungrouped",), MappingProxyType({})),
        GroupSpec("ungrouped", where, tuple(names), (), MappingProxyType({})),
    )
    return FleetSpec(spec, hosts, groups, ("ungrouped",), config_path)
