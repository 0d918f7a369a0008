"""`deploy rollback`: each device back one release, and the local cache made to match (by the runner)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.cache.mace import parse_cache
from deployer.cache.store import store_device
from deployer.config.inventory import Device
from deployer.errors import AgentError, DeviceError, LocalStateError
from deployer.protocol import ops
from deployer.protocol.fingerprint import parse_fingerprint
from deployer.tasks import runner
from deployer.tasks.progress import Progress
from deployer.tasks.runner import Connect, DeviceWork, FleetOutcome, Outcome


@dataclass(slots=True)
class RollbackOutcome(Outcome):
    current: str | None = None  # the release now current (the one rolled back to)
    previous: str | None = None  # the release it replaced

    def to_json(self) -> dict[str, Any]:
        return {**self.base_json(), "current": self.current, "previous": self.previous}


def rollback_stages(work: DeviceWork[RollbackOutcome], cache: Path) -> None:
    """Switch the device back one release, then make the local cache match what is now `current`."""
    session, outcome, device = work.session(), work.outcome, work.device
    with work.stage("rollback"):
        back = ops.rollback(session)
    outcome.current, outcome.previous = back.current, back.previous
    manifest, data = back.manifest, back.cache
    if hashlib.sha256(data).hexdigest() != back.cache_sha256:
        raise AgentError("the rolled-back cache file arrived corrupted", kind="checksum")
    if manifest is None or not data:
        outcome.error = "rolled back, but that release has no cache file: local cache unchanged"
        return
    try:
        parse_cache(data)
    except ValueError as exc:
        raise AgentError(f"the rolled-back cache file is not a MACE container: {exc}", kind="bad_cache") from exc
    fingerprint = parse_fingerprint(manifest["fingerprint"]) if "fingerprint" in manifest else {}
    with work.stage("store"):
        try:
            store_device(cache, device.name, data, manifest, fingerprint, {})
        except LocalStateError as exc:
            raise DeviceError(f"rolled back, but the local cache: {exc}") from exc


def rollback_fleet(devices: Sequence[Device], cache: Path, *, forks: int, progress: Progress,
                   accept_new_host_keys: bool = False) -> FleetOutcome[RollbackOutcome]:
    return runner.run_fleet(
        devices, RollbackOutcome,
        lambda d: runner.run_device(d, RollbackOutcome(d.name), lambda work: rollback_stages(work, cache),
                                    progress=progress, connect=Connect(accept_new_host_keys)),
        forks=forks, progress=progress, label="rollback")
