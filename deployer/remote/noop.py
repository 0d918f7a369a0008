"""The shell's no-op (docs/design.md section 11): an up-to-date board answers a push without starting Python.

After a push leaves a board as the controller's local records say, the controller sends `noop` with a token
(a hash of those records: tasks/noop.py). The agent writes a *probe*, RD/noop.probe: a shell script that
prints what decides the driver's fingerprint and what the release's state rests on (`uname -r`; `stat` of
the ICD folder, files and libraries, of the current release's index, manifest and cache file; the driver
variables of the login environment). It runs the probe as the next push's shell will and writes RD/noop:
the token, `current`'s target and the probe's checksum. The next push puts a test of that line in front of
its remote command; on a match the shell prints RD/noop.json and exits. Anything else (a token from other
records, another release, a driver or file the probe sees changed, no `cksum`) falls through to the agent.
"""

import json
import os
import re
import shlex
import subprocess

from . import environ
from .fields import req_str
from .fs import write_atomic
from .layout import CACHE_FILE, MANIFEST_FILE, NOOP_ANSWER, NOOP_LINE, NOOP_PROBE, RELEASE_ID_RE, RELEASE_INDEX
from .stamp import DRIVER_ENV_GREP, probe_paths

TOKEN_RE = re.compile(r"[0-9a-f]{64}")
PROBE_TIMEOUT_S = 10.0


MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Any, Dict, List, Optional, Tuple  # noqa: F401


def forget(rd):
    # type: (str) -> None
    """No shell answers from now on: `begin` and `rollback` call this before they change anything."""
    try:
        os.unlink(os.path.join(rd, NOOP_LINE))
    except FileNotFoundError:
        pass


def probe_script(paths):
    # type: (List[str]) -> bytes
    """The probe: its output changes when anything it covers changes (and `stat` fails if a path is gone)."""
    return "\n".join([
        "# written by the deployer agent (docs/design.md section 11); the shell's no-op compares its checksum",
        "uname -r || exit 1",
        "stat -L -c '%n %s %Y %i' -- " + " ".join(shlex.quote(p) for p in paths) + " || exit 1",
        "env | grep -E %s | sort" % shlex.quote(DRIVER_ENV_GREP),
        "",
    ]).encode("utf-8")


def _sh(args):
    # type: (List[str]) -> Tuple[Optional[int], bytes]
    """(exit status, stdout) of `sh ARGS` in the login environment, from the home folder, as ssh runs it."""
    try:
        proc = subprocess.Popen(["sh"] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=environ.LOGIN_ENV, cwd=os.path.expanduser("~"))
    except OSError:
        return None, b""
    try:
        out = proc.communicate(timeout=PROBE_TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, b""
    return proc.returncode, out


def remember(rd, req, current):
    # type: (str, Dict[str, Any], Optional[str]) -> Optional[str]
    """The `noop` op's work, under the device lock. Returns why no token was written, or None."""
    token = req_str(req, "token", pattern=TOKEN_RE)
    release = req_str(req, "current", pattern=RELEASE_ID_RE)
    if current != release:
        return "current is %s, not %s" % (current, release)
    forget(rd)
    target = os.readlink(os.path.join(rd, "current"))
    release_dir = os.path.join(rd, "current")
    paths = probe_paths(req.get("opencl")) + [os.path.join(release_dir, f)
                                              for f in (RELEASE_INDEX, MANIFEST_FILE, CACHE_FILE)]
    probe = os.path.join(rd, NOOP_PROBE)
    write_atomic(probe, [probe_script(paths)], mode=0o600)
    status, _ = _sh([probe])
    if status != 0:
        return "the probe failed on this board (exit %s)" % status
    status, checksum = _sh(["-c", 'sh "$0" 2>&1 | cksum', probe])
    if status != 0 or not checksum.strip():
        return "no cksum on this board"
    answer = json.dumps({"op": "noop", "current": release}) + "\n"
    write_atomic(os.path.join(rd, NOOP_ANSWER), [answer.encode("utf-8")], mode=0o600)
    line = "%s %s %s\n" % (token, target, checksum.decode("ascii", "replace").strip())
    write_atomic(os.path.join(rd, NOOP_LINE), [line.encode("ascii", "replace")], mode=0o600)  # last: it arms the rest
    return None
