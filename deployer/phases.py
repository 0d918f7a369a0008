"""Named points of a push on the controller (docs/design.md, section 12): `plan`, `upload`, `local-cache rename`.

Production code calls `reached(phase)` at each; nothing happens unless an observer was installed. deployer
installs none: the tests do (tests/hooks/), to prove a phase was reached and kill the controller there.
The board has its own copy of this seam (`deployer.remote.phases`): it cannot import the controller.
"""

from __future__ import annotations

from collections.abc import Callable

Observer = Callable[[str, "int | None"], None]
_observer: Observer | None = None


def reached(phase: str, watch_fd: int | None = None) -> None:
    if _observer is not None:
        _observer(phase, watch_fd)


def observe(observer: Observer | None) -> None:
    global _observer
    _observer = observer
