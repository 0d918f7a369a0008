"""Named points of the commit protocol on the board (docs/design.md, section 12).

The agent calls `reached(phase)` at each; nothing happens unless an observer was installed. The agent
installs none: the tests do (tests/hooks/), to prove a phase was reached and stop a process exactly there.
"""

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Callable, Optional  # noqa: F401

_observer = None


def reached(phase, watch_fd=None):
    # type: (str, Optional[int]) -> None
    """`watch_fd`: the agent's input, which an observer that pauses may watch (it becomes readable when the
    controller is gone)."""
    if _observer is not None:
        _observer(phase, watch_fd)


def observe(observer):
    # type: (Optional[Callable[[str, Optional[int]], None]]) -> None
    global _observer
    _observer = observer
