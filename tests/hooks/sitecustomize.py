"""Tests only: pause a process at a named phase of the commit protocol (docs/design.md, section 12).

Put this folder on PYTHONPATH with DEPLOYER_TEST_PHASE_HOOK="<phase>:<marker file>" in the environment (the
kill tests do, for the controller and, through the inventory's `env:`, for the agent on a sim device). Python
imports `sitecustomize` at start-up; this one watches for the `phases` module of deployer (the controller's
`deployer.phases`, the board's `deployer_remote.phases`) and installs an observer in it. Production code only
calls `phases.reached(name)`; without this file nothing observes it.

At the named phase the observer appends the phase and a newline to the marker file, then pauses: up to 30 s,
until "<marker>.continue" exists, or until `watch_fd` (the agent's input) becomes readable, which at these
points means the controller is gone. Each phase fires once per process; the code after it is unchanged.
Python >= 3.6, standard library only: it runs on the boards' Python too.
"""

import importlib.machinery
import os
import select
import sys
import time

MYPY = False
if MYPY:  # type comments: this file runs on the boards' Python too
    from types import ModuleType  # noqa: F401
    from typing import Any, Optional, Sequence, Set  # noqa: F401

ENV = "DEPLOYER_TEST_PHASE_HOOK"
PAUSE_S = 30.0
_hit = set()  # type: Set[str]


def _pause_at(phase, watch_fd=None):
    # type: (str, Optional[int]) -> None
    name, sep, marker = os.environ.get(ENV, "").partition(":")
    if not sep or not marker or name != phase or phase in _hit:
        return
    _hit.add(phase)
    with open(marker, "a") as handle:
        handle.write(phase + "\n")
    end = time.monotonic() + PAUSE_S
    while time.monotonic() < end and not os.path.exists(marker + ".continue"):
        if watch_fd is None:
            time.sleep(0.05)
        elif select.select([watch_fd], [], [], 0.05)[0]:
            return


class _ObservePhases:
    """A meta-path finder that lets the real one load `*.phases` of deployer, then installs the observer."""

    def find_spec(self, name, path=None, target=None):
        # type: (str, Optional[Sequence[str]], Any) -> Any
        if name not in ("deployer.phases", "deployer.remote.phases", "deployer_remote.phases"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            # type: (ModuleType) -> None
            load(module)
            module.observe(_pause_at)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get(ENV):
    sys.meta_path.insert(0, _ObservePhases())
