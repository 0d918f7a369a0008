"""Run one measured command and report its wall time, exit code and peak RSS as one JSON line on stdout.

    python spawn.py TIMEOUT_S STDOUT STDERR -- ARGV...

Why a launcher: a child's ru_maxrss counts the resident set it had between fork and exec, a copy of its
parent's. bench/push.py holds the 16 MiB model and its imports (~60 MiB); this process holds ~10 MiB
(printed as launcher_rss_kib), so that is the floor under every figure instead. The command is started
with subprocess.Popen in its own session (killed whole on timeout, SIGALRM) and reaped with os.wait4.
"""
import os
import signal
import subprocess
import sys
import time


def kill_tree(leader: int) -> None:
    """At the time limit: the command's process group, and every descendant that left it (Ansible's workers
    outlived a killed ansible-playbook at N = 32 and took the fleet's core from the next tool's run)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
            parents[int(entry)] = int(stat.rsplit(") ", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    tree, grown = {leader}, True
    while grown:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(leader, signal.SIGKILL)
    except ProcessLookupError:
        pass


timeout, out, err = int(float(sys.argv[1])), sys.argv[2], sys.argv[3]
argv = sys.argv[sys.argv.index("--") + 1:]
with open(out, "wb") as stdout, open(err, "wb") as stderr:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True)
    signal.signal(signal.SIGALRM, lambda *_: kill_tree(proc.pid))
    signal.alarm(timeout)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    signal.alarm(0)
proc.returncode = os.waitstatus_to_exitcode(status)
# This process's own peak since its exec (VmHWM; its ru_maxrss would count its parent's copy, as above).
# (proc.returncode is set above so Popen's finalizer does not wait again)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print('{"wall_s": %.4f, "rc": %d, "maxrss_kib": %d, "launcher_rss_kib": %d, "cpu_s": %.4f}'
      % (wall, proc.returncode, usage.ru_maxrss, hwm, usage.ru_utime + usage.ru_stime))
