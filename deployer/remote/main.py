"""The agent's entry point: `serve RD` runs one session, `child` one OpenCL request.

Started by LAUNCH as `python3 -c LAUNCH RD/agent/ID12 deployer_remote.main serve RD` (docs/design.md,
section 1); `python3 -m deployer.remote.main serve RD` runs the same code from a controller's checkout.
"""

import atexit
import os
import shutil
import signal
import sys

from .bundle import BUNDLE_RE, EPHEMERAL_PREFIX, bundle_root
from .child import child_main
from .framing import AgentFailure, write_message
from .layout import AGENT_DIR, READONLY_ENV
from .session import Session, on_signal


def serve_main(rd):
    out = sys.stdout.buffer
    readonly = bool(os.environ.get(READONLY_ENV))
    if readonly:
        _remove_ephemeral_bundle()
    try:
        if not readonly:
            os.makedirs(os.path.expanduser(rd), 0o755, exist_ok=True)
    except OSError as exc:
        write_message(out, AgentFailure("io", "cannot create remote dir %s: %s" % (rd, exc.strerror)).reply())
        return 1
    rd = os.path.realpath(os.path.expanduser(rd))  # every containment check compares realpaths
    if not readonly:
        _mark_used(bundle_root())
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    return Session(rd).serve(sys.stdin.buffer, out)


def _mark_used(root):
    """The bundle's folder mtime says when it last ran: pruning keeps the ones used last."""
    if os.path.basename(os.path.dirname(root)) != AGENT_DIR or not BUNDLE_RE.match(os.path.basename(root)):
        return  # run from a checkout (tests, the controller's own copy), not a stored bundle
    try:
        os.utime(root)
    except OSError:
        pass  # a bundle in a read-only place (a checkout) is never pruned anyway


def _remove_ephemeral_bundle():
    """A --check session runs from a temp folder the bootstrap made: remove it at exit (the OpenCL child,
    started from it, has finished by then)."""
    root = bundle_root()
    if os.path.basename(root).startswith(EPHEMERAL_PREFIX):
        atexit.register(shutil.rmtree, root, True)  # a session that ends without `bye` (bye removes it)


def main(argv):
    """`argv`: [module, "serve", RD] or [module, "child"] (as LAUNCH passes them)."""
    if len(argv) == 3 and argv[1] == "serve":
        return serve_main(argv[2])
    if len(argv) == 2 and argv[1] == "child":
        child_main()
        return 0
    sys.stderr.write("usage: %s serve REMOTE_DIR | child\n" % os.path.basename(argv[0]))
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
