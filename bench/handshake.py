#!/usr/bin/env python3
"""Controller CPU per SSH connection: deploy's Paramiko transport against OpenSSH's client, same machine, same
fleet, one connection at a time (so each figure is that connection's own CPU, not a share of a crowd).

    PYTHONPATH=. .venv/bin/python bench/handshake.py --fleet D/inventory.yml [--rounds 3]

Paramiko: `deployer.connect.ssh.SshTransport` (TCP, kex, host key check, public key auth) then `exec true` and
its exit status, timed by this process's CPU clock (user + system, every thread). OpenSSH: `ssh ... true` with
the floor's options (bench/push.py SSH_OPTS), timed by the CPU of reaped children (RUSAGE_CHILDREN: the ssh
client's whole process, exec and dynamic loading included). Medians in ms. bench/README.md has the figures.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from push import SSH_OPTS  # noqa: E402  (bench/push.py, beside this file)


def paramiko_ms(device: object) -> float:
    from deployer.connect.ssh import SshTransport
    start = time.process_time()
    transport = SshTransport(device)  # type: ignore[arg-type]
    try:
        channel = transport.exec("true")
        channel.close_input()
        channel.finish(10)
    finally:
        transport.close()
    return (time.process_time() - start) * 1000


def openssh_ms(device: object, key: Path, known_hosts: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["ssh", *SSH_OPTS, "-o", f"UserKnownHostsFile={known_hosts}", "-i", str(key),
                    "-p", str(device.port), f"{device.user}@{device.host}", "true"],  # type: ignore[attr-defined]
                   check=True, capture_output=True, timeout=30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from deployer.config.inventory import load_inventory
    devices = load_inventory(str(args.fleet)).devices
    key = args.fleet.parent / "client_key"
    paramiko_ms(devices[0])  # imports and first-use set-up out of the figures
    pm, om = [], []
    for _ in range(args.rounds):
        for device in devices:
            pm.append(paramiko_ms(device))
            om.append(openssh_ms(device, key, device.ssh.known_hosts))
    print(f"connections: {len(pm)} each; controller CPU per connection, median (min-max) ms:")
    print(f"  paramiko (deploy): {statistics.median(pm):.1f} ({min(pm):.1f}-{max(pm):.1f})")
    print(f"  openssh client:    {statistics.median(om):.1f} ({min(om):.1f}-{max(om):.1f})")
    print(f"  ratio: {statistics.median(pm) / statistics.median(om):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
