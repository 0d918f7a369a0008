"""Fan work out over a fleet: a bounded thread pool, results back in inventory order.

Every per-device function handed to `fan_out` returns an outcome record and never raises for a device's
own failure, so one device never stops the others (a raise here is a bug, and surfaces as one).

Two controls of a rollout live here, so that every fleet command can use them:
- a **stop rule** (`fail_limit`: `--max-fail-percentage`): once it names a reason, devices not yet started
  are not started (`not_started(device, reason)` gives their outcome); devices in flight finish normally;
- a per-device **deadline**: each device's work runs inside a `Deadline`, which a transport opened in that
  work finds with `current_deadline()` and asks to be closed at expiry (from a timer thread). A context
  variable carries it rather than an argument, so the layers between (the pipeline's stages, the agent
  session) need not pass it along: only the fan-out sets it, only the transport reads it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


class Outcome(Protocol):
    @property
    def ok(self) -> bool: ...


D = TypeVar("D", bound=Named)
R = TypeVar("R")
StopRule = Callable[[Sequence[R]], "str | None"]  # outcomes finished so far -> why to stop, or None


class Deadline:
    """A limit on one device's whole run. At expiry every registered closer runs once, from a timer thread;
    the work then sees its connection end and asks `expired` why."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._closers: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._fired = threading.Event()
        self._started = time.monotonic()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    @property
    def expired(self) -> bool:
        return self._fired.is_set()

    def remaining(self) -> float:
        return max(0.0, self.seconds - (time.monotonic() - self._started))

    def sleep(self, seconds: float) -> bool:
        """Sleep, cut short by expiry; True if the deadline has passed."""
        return self._fired.wait(seconds)

    def on_expiry(self, close: Callable[[], None]) -> Callable[[], None]:
        """Run `close` at expiry (at once if already expired); returns a function that unregisters it."""
        with self._lock:
            fired = self._fired.is_set()
            key, self._next = self._next, self._next + 1
            if not fired:
                self._closers[key] = close

        def unregister() -> None:
            with self._lock:
                self._closers.pop(key, None)

        if fired:
            close()
        return unregister

    def _expire(self) -> None:
        with self._lock:
            self._fired.set()
            closers, self._closers = list(self._closers.values()), {}
        for close in closers:
            close()

    def start(self) -> None:
        self._started = time.monotonic()
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()


_current: ContextVar[Deadline | None] = ContextVar("deployer_deadline", default=None)


def current_deadline() -> Deadline | None:
    """The deadline of the device whose work runs in this thread, if it has one."""
    return _current.get()


@contextmanager
def deadline_scope(seconds: float | None) -> Iterator[Deadline | None]:
    """Run a block under a deadline of `seconds` (None or <= 0: none)."""
    if seconds is None or seconds <= 0:
        yield None
        return
    deadline = Deadline(seconds)
    token = _current.set(deadline)
    deadline.start()
    try:
        yield deadline
    finally:
        deadline.cancel()
        _current.reset(token)


def fail_limit(percentage: float, total: int) -> Callable[[Sequence[Outcome]], str | None]:
    """Stop once more than `percentage` % of the `total` selected devices have failed."""

    def rule(done: Sequence[Outcome]) -> str | None:
        count = sum(1 for outcome in done if not outcome.ok)
        if total and count * 100 > percentage * total:
            return f"rollout stopped: {count} of {total} devices failed (> {percentage:g}%)"
        return None

    return rule


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
    the rest get `not_started(device, reason)` instead of `work`."""
    if not devices:
        return []
    if stop is not None and not_started is None:
        raise ValueError("fan_out: a stop rule needs not_started")
    lock = threading.Lock()
    done: list[R] = []

    def one(device: D) -> R:
        if stop is not None and not_started is not None:
            with lock:
                reason = stop(done)
            if reason is not None:
                return not_started(device, reason)
        with deadline_scope(deadline(device) if deadline else None):
            result = work(device)
        with lock:
            done.append(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(devices))), thread_name_prefix=label) as pool:
        futures = {pool.submit(one, device): device.name for device in devices}
        results = {futures[future]: future.result() for future in as_completed(futures)}
    return [results[device.name] for device in devices]
