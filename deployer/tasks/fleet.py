"""Fan work out over a fleet: a bounded thread pool, results back in inventory order.

Every per-device function handed to `fan_out` returns an outcome record and never raises for a device's
own failure, so one device never stops the others (a raise here is a bug, and surfaces as one). The stop
rule (`fail_limit`: `--max-fail-percentage`) lives here; each device's work runs inside its `Deadline`
(`deployer.connect.deadline`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from typing import Protocol, TypeVar

from deployer.connect.deadline import INTERRUPTED, Deadline, deadline_scope
from deployer.errors import Interrupted


class Named(Protocol):
    @property
    def name(self) -> str: ...


class Outcome(Protocol):
    @property
    def ok(self) -> bool: ...

D = TypeVar("D", bound=Named)
R = TypeVar("R")

StopRule = Callable[[Sequence[R]], "str | None"]  # outcomes finished so far -> why to stop, or None


def fail_limit(percentage: float, total: int) -> Callable[[Sequence[Outcome]], str | None]:
    """Stop once more than `percentage` % of the `total` selected devices have failed."""

    def rule(done: Sequence[Outcome]) -> str | None:
        count = sum(1 for outcome in done if not outcome.ok)
        if total and count * 100 > percentage * total:
            return f"rollout stopped: {count} of {total} devices failed (> {percentage:g}%)"
        return None

    return rule


class FleetInterrupted(Interrupted):
    """Ctrl-C during a fan-out, after every device in flight was stopped: `results` in the order of the
    devices, None for a device that neither ran nor got a `not_started` outcome."""

    def __init__(self, results: list[object]) -> None:
        super().__init__(INTERRUPTED)
        self.results = results


STOP_GRACE_S = 5.0  # after an interrupt, how long devices in flight get to notice their closed connection


def fan_out(
    devices: Sequence[D],
    work: Callable[[D], R],
    *,
    forks: int,
    label: str,
    deadline: Callable[[D], float | None] | None = None,
    stop: StopRule[R] | None = None,
    not_started: Callable[[D, str], R] | None = None,
) -> list[R]:
    """`work(device)` for every device, at most `forks` at once; results in the order of `devices`.

    `deadline(device)`: seconds for that device's whole work (None: no limit). `stop`: checked as each
    device is about to start, over the outcomes finished so far; once it gives a reason, that device and
    the rest get `not_started(device, reason)` instead of `work`.

    Interrupted (Ctrl-C raises in this, the main, thread): every device in flight has its connection closed
    (its agent drops the uncommitted release), devices not started get `not_started(device, INTERRUPTED)`,
    and once they have all ended (at most STOP_GRACE_S) FleetInterrupted carries what each one did."""
    if not devices:
        return []
    if stop is not None and not_started is None:
        raise ValueError("fan_out: a stop rule needs not_started")
    lock = threading.Lock()
    done: list[R] = []
    active: set[Deadline] = set()
    interrupted = threading.Event()

    def one(device: D) -> R:
        if interrupted.is_set() and not_started is not None:
            return not_started(device, INTERRUPTED)
        if stop is not None and not_started is not None:
            with lock:
                reason = stop(done)
            if reason is not None:
                return not_started(device, reason)
        with deadline_scope(deadline(device) if deadline else None) as limit:
            with lock:
                active.add(limit)
            if interrupted.is_set():
                limit.interrupt()
            try:
                result = work(device)
            finally:
                with lock:
                    active.discard(limit)
        with lock:
            done.append(result)
        return result

    pool = ThreadPoolExecutor(max_workers=max(1, min(forks, len(devices))), thread_name_prefix=label)
    futures: dict[Future[R], str] = {}
    try:
        futures = {pool.submit(one, device): device.name for device in devices}
        results = {futures[future]: future.result() for future in as_completed(futures)}
    except Interrupted:
        interrupted.set()
        with lock:
            stopping = list(active)
        for limit in stopping:
            limit.interrupt()
        wait(futures, timeout=STOP_GRACE_S)
        ended = {futures[f]: f.result() for f in futures if f.done() and not f.cancelled() and not f.exception()}
        raise FleetInterrupted([ended.get(device.name) for device in devices]) from None
    finally:
        pool.shutdown(wait=not interrupted.is_set(), cancel_futures=interrupted.is_set())
    return [results[device.name] for device in devices]
