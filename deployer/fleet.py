"""Fan work out over a fleet: a bounded thread pool, results back in inventory order.

Every per-device function handed to `fan_out` returns an outcome record and never raises for a device's
own failure, so one device never stops the others (a raise here is a bug, and surfaces as one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


D = TypeVar("D", bound=Named)
R = TypeVar("R")


def fan_out(devices: Sequence[D], work: Callable[[D], R], *, forks: int, label: str) -> list[R]:
    """`work(device)` for every device, at most `forks` at once; results in the order of `devices`."""
    if not devices:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(devices))), thread_name_prefix=label) as pool:
        futures = {pool.submit(work, device): device.name for device in devices}
        results = {futures[future]: future.result() for future in as_completed(futures)}
    return [results[device.name] for device in devices]
