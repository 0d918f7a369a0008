"""`shell` and `disk`: what a nightly run's health and shell steps ask of a board.

The command travels in the request, never on a command line (other users of a board can read those in
`ps`), and runs under `/bin/sh -c` in its own process group from the user's home, stdin closed. At its
timeout the whole group is killed (a command that forked a daemon holding the pipes open included) and the
reply says so; the session goes on, so one hung command costs its timeout and nothing more.
"""

import os
import signal
import subprocess

from .child import TimedOut, exchange
from .fields import req_int, req_str, req_timeout

MAX_OUTPUT = 1 << 20  # the most bytes of each stream a reply carries


def op_shell(req, payload, watch_fd=None):
    command = req_str(req, "command")
    timeout = req_timeout(req)
    limit = req_int(req, "max_output", 64 << 10, 0, MAX_OUTPUT)
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=os.path.expanduser("~"), start_new_session=True)

    def kill_group():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass  # already gone

    timed_out = False
    try:
        out, err = exchange(proc, None, timeout, watch_fd, kill=kill_group, limit=limit)
    except TimedOut as exc:
        out, err, timed_out = exc.out, exc.err, True
    finally:
        kill_group()  # what the command left running in its group ends with it
    code = proc.returncode
    return {"exit": code if code is not None and code >= 0 else None,
            "signal": -code if code is not None and code < 0 else None,
            "timed_out": timed_out, "stdout_size": len(out), "stderr_size": len(err),
            "truncated": len(out) >= limit > 0 or len(err) >= limit > 0}, out + err


def op_disk(rd):
    """Free and total bytes of the filesystem that holds the remote dir (its nearest existing parent)."""
    path = rd
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    stat = os.statvfs(path)
    return {"path": path, "free_bytes": stat.f_bavail * stat.f_frsize, "total_bytes": stat.f_blocks * stat.f_frsize}
