"""The transport for a device: SSH, or the controller itself for `host: local`."""

from __future__ import annotations

from deployer.config.inventory import Device
from deployer.connect.channel import Transport
from deployer.connect.local import LocalTransport
from deployer.connect.mux import MuxTransport, master_socket


def open_transport(device: Device, *, accept_new_host_keys: bool = False) -> Transport:
    """The transport for a device: the controller itself for `host: local`, else SSH: through the connection
    master when the device says `ssh.persist` and one can be used, else a connection of this run's own."""
    if device.is_local:
        return LocalTransport(device)
    if device.ssh.persist > 0:
        path = master_socket()
        if path is not None:
            return MuxTransport(device, path, accept_new_host_keys=accept_new_host_keys)
    from deployer.connect.ssh import SshTransport  # Paramiko: only for a direct connection (~50 ms of a start)

    return SshTransport(device, accept_new_host_keys=accept_new_host_keys)
