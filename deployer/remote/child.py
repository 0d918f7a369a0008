"""The OpenCL child: every driver call runs in a child process, so a crashing driver kills only the child."""

import io
import os
import select
import signal
import subprocess
import sys
import threading
import time

from .bench import op_bench
from .boot import LAUNCH
from .build import op_build
from .bundle import bundle_root
from .fields import req_str
from .framing import AgentFailure, FramingError, bad_request, read_message, write_message
from .fs import io_failure
from .opencl import OpenCL
from .selection import fingerprint_of, parse_selection, select_device
from .smoke import op_smoke
from .startup import op_startup

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Dict, List  # noqa: F401

CHILD_OPS = ("fingerprint", "build", "smoke", "startup", "bench")


def run_child_request(req, payload):
    op = req.get("op")
    if op not in CHILD_OPS:
        raise bad_request("the child runs %s, not %r" % (", ".join(CHILD_OPS), op))
    root = req_str(req, "root")
    if not os.path.isabs(root) or not os.path.isdir(root):
        raise bad_request("field 'root': %r is not an absolute directory" % root)
    root = os.path.realpath(root)
    selection = parse_selection(req.get("opencl"))
    cl = OpenCL(selection.library)
    sel = select_device(cl, selection)
    if op == "fingerprint":
        return {"fingerprint": fingerprint_of(sel)}, b""
    if op == "build":
        return op_build(cl, sel, req, root, payload)
    if op == "startup":
        return op_startup(cl, sel, req, root, payload)
    if op == "bench":
        return op_bench(cl, sel, req, root, payload)
    return op_smoke(cl, sel, req, root, payload)


def child_main():
    # Drivers may print to stdout; keep the real stdout for the reply and send fd 1 to stderr.
    reply_stream = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        req, payload = read_message(sys.stdin.buffer)
        reply, out = run_child_request(req, payload)
        reply = dict(reply, ok=True)
    except AgentFailure as exc:
        reply, out = exc.reply(), b""
    except (FramingError, EOFError) as exc:
        reply, out = bad_request("child request: %s" % exc).reply(), b""
    except OSError as exc:
        reply, out = io_failure(exc, exc.filename or "(file)").reply(), b""
    except Exception as exc:  # the agent never answers with a traceback
        reply, out = AgentFailure("internal", "%s: %s" % (type(exc).__name__, exc)).reply(), b""
    write_message(reply_stream, reply, out)
    # Skip interpreter and driver teardown: a driver crashing in its destructors after a complete
    # reply must not turn a good result into driver_crash.
    os._exit(0)


def stderr_tail(data, lines=12, chars=2000):
    text = data.decode("utf-8", "replace").strip()
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def child_command():
    """How to start `child`: by import from this bundle, so its bytecode stays cached."""
    return [sys.executable, "-c", LAUNCH, bundle_root(), __package__ + ".main", "child"]


def run_child(req, payload, root, timeout, env=None, watch_fd=None):
    """Run one OpenCL op in the `child` of this bundle: (reply, payload). A child killed by a signal is
    driver_crash, one past `timeout` seconds is killed and reported as timeout. `env`: the child's
    environment (default: the agent's). `watch_fd`: the agent's input; if it closes meanwhile (the
    controller is gone: killed, interrupted, its link cut), the child is killed at once and EOFError
    ends the session, so a compile never keeps a dropped release and the device lock for minutes."""
    op = req.get("op")
    request = io.BytesIO()
    write_message(request, dict(req, root=root), payload)
    child = subprocess.Popen(child_command(), env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = exchange(child, request.getvalue(), timeout, watch_fd)
    except TimedOut as exc:
        tail = stderr_tail(exc.err)
        raise AgentFailure("timeout", "OpenCL %s did not finish within %g s; the child was killed%s"
                           % (op, timeout, "; stderr: " + tail if tail else "")) from None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = "signal %d" % -child.returncode
        tail = stderr_tail(err)
        raise AgentFailure("driver_crash", "OpenCL driver crashed (%s) during %s%s"
                           % (name, op, "; stderr: " + tail if tail else ""))
    try:
        reply, reply_payload = read_message(io.BytesIO(out))
    except (FramingError, EOFError) as exc:
        raise AgentFailure("internal", "the OpenCL child exited with status %d and no valid reply (%s); "
                           "stderr: %s" % (child.returncode, exc, stderr_tail(err))) from exc
    if reply.pop("ok", None) is not True:
        error = reply["error"] if isinstance(reply.get("error"), dict) else {}
        raise AgentFailure(str(error.get("kind", "internal")), str(error.get("message", reply)))
    return reply, reply_payload


class TimedOut(Exception):
    def __init__(self, out, err):
        Exception.__init__(self, "timed out")
        self.out, self.err = out, err


def _feed(stream, data):
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, ValueError, OSError):
        pass  # the child ended early: its exit status and stderr say why


def exchange(child, request, timeout, watch_fd, kill=None, limit=None):
    """Send the request (None: the child has no stdin pipe), collect the child's stdout and stderr until
    both end; raises TimedOut past `timeout` and EOFError as soon as `watch_fd` hangs up (polled for
    POLLHUP only: the controller sends nothing while it waits for this reply, so nothing there is read).
    `kill`: how to stop the child (default: kill it; a shell command's whole process group). `limit`: the
    most bytes kept of each stream; the rest is read and dropped, so a flood cannot fill the agent's memory."""
    kill = kill or child.kill
    writer = None
    if request is not None:
        writer = threading.Thread(target=_feed, args=(child.stdin, request))
        writer.daemon = True
        writer.start()
    out_fd, err_fd = child.stdout.fileno(), child.stderr.fileno()
    chunks = {out_fd: [], err_fd: []}  # type: Dict[int, List[bytes]]
    poller = select.poll()
    for fd in chunks:
        poller.register(fd, select.POLLIN)
    if watch_fd is not None:
        poller.register(watch_fd, 0)  # hang-up and errors are always reported
    open_fds = set(chunks)
    kept = {out_fd: 0, err_fd: 0}
    deadline = time.monotonic() + timeout
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            kill()
            child.wait()
            raise TimedOut(b"".join(chunks[out_fd]), b"".join(chunks[err_fd]))
        for fd, event in poller.poll(min(left, 1.0) * 1000):
            if fd == watch_fd:
                kill()
                child.wait()
                raise EOFError("the controller is gone (input closed during an OpenCL step)")
            data = os.read(fd, 1 << 16) if event & (select.POLLIN | select.POLLHUP | select.POLLERR) else b""
            if data:
                if limit is None or kept[fd] < limit:
                    data = data if limit is None else data[: limit - kept[fd]]
                    chunks[fd].append(data)
                    kept[fd] += len(data)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
    child.wait()
    if writer is not None:
        writer.join(1.0)
    child.stdout.close()
    child.stderr.close()
    return b"".join(chunks[out_fd]), b"".join(chunks[err_fd])
