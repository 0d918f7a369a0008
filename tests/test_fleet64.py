"""64 simulated boards in one run on the CI machine's cores, and a controller that stays flat run after run.

A nightly controller lives for months and runs the same playbook every night: memory, open files and
threads must not creep with each run or each board. The cheapest whole run is `deploy run` with one `shell`
step (no OpenCL on the boards: a push would spend ~90 s building and fingerprinting on 64 boards here),
called in-process ten times against the same 64 real sshd devices, history included. Measured on the
2 shared cores: 3-4 s to start the 64 servers, 12-15 s for the first run (the agent travels), 6-9 s for
each later one, 83 s in all (96 s with the default 16 forks).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from deployer.sim.fleet import fleet_specs
from tests.conftest import Cli
from tests.test_faults import MakeFleet
from tests.test_run import write_playbook

BOARDS = 64
RUNS = 10
WARM_UP = 2  # the first run uploads the agent to every board; the second meets every lazy import and cache

PLAYBOOK = """\
name: fleet64
steps:
  - name: hello
    shell:
      command: echo hello
"""


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def _threads_down_to(count: int) -> int:
    """Threads now, once those of the last run have ended (a closed Paramiko transport's thread ends on its
    own a moment later): waits up to 10 s for `count`."""
    end = time.monotonic() + 10
    while threading.active_count() > count and time.monotonic() < end:
        time.sleep(0.05)
    return threading.active_count()


def _usage(threads: int) -> dict[str, int]:
    gc.collect()
    return {"threads": _threads_down_to(threads), "fds": len(os.listdir("/proc/self/fd")), "rss_kib": _rss_kib(),
            "blocks": sys.getallocatedblocks()}


@pytest.mark.slow
def test_64_boards_run_ten_times_in_one_process_and_the_controller_stays_flat(
        make_fleet: MakeFleet, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    threads = threading.active_count()
    start = time.monotonic()
    fleet = make_fleet(fleet_specs(BOARDS))
    started_s = time.monotonic() - start  # 4-6 s here: the servers start together, then are waited for
    playbook = write_playbook(tmp_path, PLAYBOOK)
    args = ("run", playbook, "--fleet", fleet.inventory, "--cache", tmp_path / "cache", "--history",
            tmp_path / "history.db", "--json", "--quiet", "--forks", "32")  # 32: ~10% less wall time than 16
    seconds: list[float] = []
    for night in range(RUNS):
        if night == WARM_UP:
            before = _usage(threads)
        begun = time.monotonic()
        run = cli(*args)
        seconds.append(time.monotonic() - begun)
        assert run.code == 0, run.err[-2000:]
        devices = run.json()["devices"]
        assert len(devices) == BOARDS and {d["status"] for d in devices} == {"pass"}, night
    after = _usage(threads)
    print(f"start {started_s:.1f} s, runs {[round(s, 1) for s in seconds]} s, before {before}, after {after}")
    # Threads: every worker and every SSH transport's thread ends with its run. Open files: each board's
    # socket and channel, the history and the locks are closed (a leak per board would add 8 x 64 here).
    assert after["threads"] == before["threads"] == threads, (before, after)
    assert after["fds"] <= before["fds"] + 2, (before, after)  # 2: a lazily opened file, never one per board
    # Memory, over 8 runs of 64 boards: Python's own blocks grew by a few hundred here (typer's and typing's
    # caches) and RSS by ~1.2 MiB (malloc's per-thread arenas settling); a leak of one session per board and
    # run (a Paramiko transport and its buffers, well over 32 KiB) would add 16 MiB and 64 x 8 x its objects.
    assert after["blocks"] - before["blocks"] < 20_000, (before, after)
    assert after["rss_kib"] - before["rss_kib"] < 16 * 1024, (before, after)
