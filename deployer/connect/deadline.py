"""A per-device deadline: each device's work runs inside a `Deadline`, which a transport opened in that
work finds with `current_deadline()` and asks to be closed at expiry (from a timer thread). A context
variable carries it rather than an argument, so the layers between (the push stages, the agent session)
need not pass it along: only the fan-out sets it, only the transport reads it.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from deployer.errors import DeadlineExceeded

INTERRUPTED = "interrupted (Ctrl-C)"


class Deadline:
    """A limit on one device's whole run (`seconds`; None: no time limit). At expiry, or when the run is
    interrupted, every registered closer runs once (from the timer thread, or the one that interrupts); the
    work then sees its connection end and asks `expired` why (`reason`)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.reason = ""
        self._lock = threading.Lock()
        self._closers: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._fired = threading.Event()
        self._started = time.monotonic()
        self._timer = threading.Timer(seconds, self._expire) if seconds else None
        if self._timer is not None:
            self._timer.daemon = True

    @property
    def expired(self) -> bool:
        return self._fired.is_set()

    def remaining(self) -> float:
        if self.seconds is None:
            return math.inf
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

    def interrupt(self) -> None:
        """Expire now, because the whole run was interrupted: the device's connection is closed."""
        self._expire(INTERRUPTED)

    def _expire(self, reason: str | None = None) -> None:
        with self._lock:
            if self._fired.is_set():
                return
            self.reason = reason or f"deadline of {self.seconds:g} s exceeded"
            self._fired.set()
            closers, self._closers = list(self._closers.values()), {}
        for close in closers:
            close()

    def start(self) -> None:
        self._started = time.monotonic()
        if self._timer is not None:
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


_current: ContextVar[Deadline | None] = ContextVar("deployer_deadline", default=None)


def current_deadline() -> Deadline | None:
    """The deadline of the device whose work runs in this thread, if it has one."""
    return _current.get()


@contextmanager
def deadline_scope(seconds: float | None) -> Iterator[Deadline]:
    """Run a block under a deadline of `seconds` (None or <= 0: no time limit; it can still be interrupted)."""
    deadline = Deadline(seconds if seconds is not None and seconds > 0 else None)
    token = _current.set(deadline)
    deadline.start()
    try:
        yield deadline
    finally:
        deadline.cancel()
        _current.reset(token)


BACKOFF_S = 0.5  # the first wait before a connect retry; each next one doubles


def backoff_delays(retries: int, cap: float, *, jitter: bool = True) -> list[float]:
    """The waits before each retry: 0.5 s, 1 s, 2 s, ... each at most `cap`, times a jitter in [0.5, 1)
    so that a fleet refused at once does not come back at once (without `jitter`: the longest they can be)."""
    return [min(BACKOFF_S * 2**n, max(cap, BACKOFF_S)) * (random.uniform(0.5, 1.0) if jitter else 1.0)
            for n in range(retries)]


def raise_if_expired(deadline: Deadline | None, cause: BaseException | None = None) -> None:
    """After a connection broke: if the device's deadline closed it, say so instead."""
    if deadline is not None and deadline.expired:
        raise DeadlineExceeded(f"{deadline.reason}: the connection was closed") from cause
