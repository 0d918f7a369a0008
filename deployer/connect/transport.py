"""The transport for a device: SSH, or the controller itself for `host: local`."""

from __future__ import annotations

from deployer.config.inventory import Device
from deployer.connect.channel import Transport
from deployer.connect.local import LocalTransport
from deployer.connect.ssh import SshTransport


def open_transport(device: Device, *, accept_new_host_keys: bool = False) -> Transport:
    """The transport for a device: the controller itself for `host: local`, else SSH."""
    if device.is_local:
        return LocalTransport(device)
    return SshTransport(device, accept_new_host_keys=accept_new_host_keys)
