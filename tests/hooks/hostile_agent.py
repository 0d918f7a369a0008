"""Tests only: a board's python that lies in every way the agent protocol allows (tests/test_hostile.py).

Installed as a sim device's `python:` through a wrapper, `exec python3 hostile_agent.py CASE AGENT_ID`, so
the real sshd runs it in place of the agent: it says hello with this controller's bundle identity (AGENT_ID),
then reads framed requests as the agent does (docs/design.md, section 1) and answers each as CASE says: sizes
that do not match, payloads far larger than announced, `..`, absolute and symlinked paths, escape sequences in
every string, a fingerprint that is not one, malformed and truncated frames, replies to questions not asked,
floods on stdout. An op CASE does not lie about gets a plausible answer (a build that fails, nothing found,
no older release), so what the controller meets in each case is its lie. `container.bin` beside this file, when present,
is the MACE container the `escapes` case serves to `collect`. Python >= 3.6, standard library only.
"""

import hashlib
import json
import os
import sys

MYPY = False
if MYPY:  # type comments: this file runs on the boards' Python
    from typing import Any, Callable, Dict, Iterator, List, Optional  # noqa: F401

# Clear the screen, retitle the window (ended by a bell), an 8-bit CSI: what must never reach a terminal raw.
ESC = "\x1b[2J\x1b]0;owned\x07\x9b31m"
CASES = ("paths", "fingerprint", "escapes", "keys", "manifest", "oversize", "sizes", "truncated", "malformed",
         "not_object", "unasked", "flood", "hello", "error_text", "pull")
FLOOD_BYTES = 400 * 1000 * 1000  # more than a controller holding it would survive the test's memory bound
HERE = os.path.dirname(os.path.abspath(__file__))

out = sys.stdout.buffer


def fingerprint(text=""):
    # type: (str) -> Dict[str, Any]
    """A well-formed fingerprint whose strings carry `text`; its id is the true hash of what it says."""
    platform = {"name": "Portable Computing Language" + text, "vendor": text, "version": "OpenCL 3.0 PoCL 3.1",
                "profile": "FULL_PROFILE"}
    device = {"name": "cpu-hostile" + text, "vendor": text, "type": ["CPU"], "version": "OpenCL 3.0" + text,
              "driver_version": "3.1" + text, "compute_units": 1, "max_work_group_size": 64,
              "extensions": [text], "image_support": False}
    ident = "|".join(str(part) for part in (platform["name"], platform["version"], device["name"],
                                             device["driver_version"]))
    return {"platform": platform, "device": device, "cpu_only": True, "platform_index": 0, "device_index": 0,
            "python": "3.11.2" + text, "id": hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()[:16]}


def send(fields, payload=b"", announce=None):
    # type: (Dict[str, Any], bytes, Optional[int]) -> None
    """One reply: its line, then `payload`; `announce` is the payload_size it claims, true or not."""
    if payload or announce is not None:
        fields = dict(fields, payload_size=len(payload) if announce is None else announce)
    out.write(json.dumps(fields).encode("utf-8") + b"\n")
    out.write(payload)
    out.flush()


def state(**fields):
    # type: (Any) -> bytes
    """A `state` payload: nothing deployed, the plain fingerprint, unless `fields` say otherwise."""
    record = {"current": None, "files": {}, "manifest": None, "blobs": []}  # type: Dict[str, Any]
    record["fingerprint"] = fingerprint()
    record.update(fields)
    return json.dumps(record).encode("utf-8")


def fail(kind, message):
    # type: (str, str) -> None
    send({"ok": False, "error": {"kind": kind, "message": message}})


def flood(data, total):
    # type: (bytes, int) -> None
    """`total` bytes of `data` repeated, no newline; ends when the controller stops reading and hangs up."""
    chunk = data * ((1 << 20) // len(data) + 1)
    sent = 0
    while sent < total:
        out.write(chunk)
        sent += len(chunk)
    out.flush()


def requests():
    # type: () -> Iterator[Dict[str, Any]]
    """The controller's framed requests, each payload read and dropped."""
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline((1 << 20) + 1)
        if not line:
            return
        request = json.loads(line.decode("utf-8"))
        left = request.get("payload_size", 0)
        while left > 0:
            chunk = stdin.read(min(left, 1 << 20))
            if not chunk:
                return
            left -= len(chunk)
        yield request


def container():
    # type: () -> bytes
    path = os.path.join(HERE, "container.bin")
    if not os.path.exists(path):
        return b""
    with open(path, "rb") as handle:
        return handle.read()


# ----- plausible answers, for the ops a case does not lie about -----------------------------------------

def plausible(request):
    # type: (Dict[str, Any]) -> None
    op = request.get("op")
    if op == "state":
        send({"ok": True, "current": None}, state())
    elif op == "fingerprint":
        send({"ok": True, "fingerprint": fingerprint()})
    elif op == "begin":
        send({"ok": True, "release": request.get("release"), "previous": None,
              "need": [f.get("path") for f in request.get("files") or []]})
    elif op == "put":
        send({"ok": True, "path": request.get("path"), "size": request.get("size")})
    elif op == "build":
        send({"ok": True, "cache_file": "build/mace_cl_compiled_program.bin", "manifest_file": "build/manifest.json",
              "cache_sha256": "0" * 64, "programs": [
                  {"key": p.get("key"), "ok": False, "build_ms": 1, "binary_size": 0, "sha256": "", "reused": False,
                   "log": "error: this board builds nothing"} for p in request.get("programs") or []]})
    elif op == "find":
        send({"ok": True, "files": [], "truncated": False})
    elif op == "rollback":
        fail("no_previous", "no release older than the current one")
    elif op == "env":
        send({"ok": True, "variables": len(request.get("env") or {})})
    else:
        fail("io", "this board refuses %s" % op)


# ----- the lies -------------------------------------------------------------------------------------------

def lie_paths(request):
    # type: (Dict[str, Any]) -> None
    """`..`, absolute, escape-laden and symlinked paths in the release index and in `find`'s results."""
    op = request.get("op")
    sha = "a" * 64
    if op == "state":
        files = {"../../outside.cl": {"size": 1, "sha256": sha}, "/etc/passwd": {"size": 1, "sha256": sha},
                 "kernels/" + ESC + ".cl": {"size": 1, "sha256": sha}}
        send({"ok": True, "current": None}, state(current="../../" + ESC, files=files))
    elif op == "find":
        entries = [
            {"path": "../../etc/passwd", "kind": "file", "size": 1, "sha256": sha, "mtime": 1.0},
            {"path": "/data/../../etc/shadow", "kind": "file", "size": 1, "sha256": sha, "mtime": 1.0},
            {"path": "/data/./x.bin", "kind": "file", "size": 1, "sha256": sha, "mtime": 1.0},
            {"path": "/data/link.bin", "kind": "symlink", "error": "symlink to /etc/" + ESC},
            {"path": "/data/big.bin", "kind": "file", "size": 1 << 40, "sha256": sha, "mtime": 1.0},
            {"path": "/data/hash.bin", "kind": "file", "size": 1, "sha256": "../" + ESC, "mtime": 1.0},
            {"path": "/data/nul\x00.bin", "kind": "file", "size": 1, "sha256": sha, "mtime": 1.0},
            {"path": "/data/\ud800.bin", "kind": "file", "size": 1, "sha256": sha, "mtime": 1.0},  # no file name
            "/data/not-a-record.bin",
        ]
        send({"ok": True, "files": entries, "truncated": False})
    elif op == "rollback":  # a release id that climbs out, a manifest naming files outside
        empty = hashlib.sha256(b"").hexdigest()
        send({"ok": True, "current": "../../" + ESC, "previous": "/etc", "cache_sha256": empty,
              "manifest": {"programs": [{"key": "../../../outside", "log_file": "/etc/passwd"}]}})
    else:
        plausible(request)


def lie_fingerprint(request):
    # type: (Dict[str, Any]) -> None
    """A fingerprint that is not one: an id that is not the hash of what it describes, a string, a list."""
    op = request.get("op")
    bogus = dict(fingerprint(ESC), id="../../" + ESC)
    if op == "state":
        send({"ok": True, "current": None}, state(fingerprint=None))
    elif op == "fingerprint":
        send({"ok": True, "fingerprint": bogus})
    elif op == "rollback":
        data = container()
        send({"ok": True, "current": "r2", "previous": "r3", "cache_sha256": hashlib.sha256(data).hexdigest(),
              "manifest": {"programs": [], "fingerprint": ESC}}, data)
    else:
        plausible(request)


def lie_escapes(request):
    # type: (Dict[str, Any]) -> None
    """Escape sequences in every string a well-formed answer carries: fingerprint, program keys, build logs,
    error messages and kinds, release ids, collected paths, the collected file's own entries."""
    op = request.get("op")
    if op == "state":
        send({"ok": True, "current": None}, state(fingerprint=fingerprint(ESC)))
    elif op == "fingerprint":
        send({"ok": True, "fingerprint": fingerprint(ESC)})
    elif op == "build":
        programs = [{"key": p.get("key"), "ok": False, "build_ms": 1, "binary_size": 0, "sha256": ESC,
                     "reused": False, "log": (ESC + "error: " + ESC + "\n") * 2000}
                    for p in request.get("programs") or []]
        send({"ok": True, "cache_file": ESC, "manifest_file": "build/manifest.json", "cache_sha256": "0" * 64,
              "programs": programs})
    elif op == "find":
        data = container()
        send({"ok": True, "truncated": False, "files": [
            {"path": "/data/" + ESC + ".bin", "kind": "file", "size": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), "mtime": 1.0},
            {"path": "/data/denied" + ESC, "kind": "denied", "error": ESC + "permission denied" + ESC}]})
    elif op == "read":
        send({"ok": True}, container())
    elif op == "rollback":
        data = container()
        send({"ok": True, "current": ESC, "previous": ESC, "cache_sha256": hashlib.sha256(data).hexdigest(),
              "manifest": {"programs": [{"key": ESC}], "fingerprint": fingerprint(ESC), "note": ESC}}, data)
    elif op == "install":
        fail(ESC, ESC + "disk on fire" + ESC)
    elif op == "shell":  # a nightly shell step: the names of the metrics in its JSON output
        out, err = json.dumps({ESC: 1.5, "speed" + ESC: 2.5}).encode("utf-8"), (ESC * 100 + "\n").encode("utf-8")
        send({"ok": True, "exit": 0, "signal": None, "timed_out": False, "stdout_size": len(out),
              "stderr_size": len(err), "truncated": False}, out + err)
    else:
        plausible(request)


def lie_oversize(request):
    # type: (Dict[str, Any]) -> None
    """Payloads far larger than announced, and announcements far over what an op may send."""
    op = request.get("op")
    if op == "state":  # 200 bytes announced (a valid state), then 400 MB more without a newline
        send({"ok": True, "current": None}, state(fingerprint=None).ljust(200))
        flood(ESC.encode("utf-8"), FLOOD_BYTES)
    elif op == "find":
        send({"ok": True, "truncated": False, "files": [
            {"path": "/data/small.bin", "kind": "file", "size": 100, "sha256": "b" * 64, "mtime": 1.0}]})
    elif op == "read":  # 100 bytes found, 400 MB announced and sent
        send({"ok": True}, announce=FLOOD_BYTES)
        flood(b"\0", FLOOD_BYTES)
    elif op == "rollback":  # over the 256 MiB a rollback may carry
        send({"ok": True, "current": "r2", "previous": "r3", "cache_sha256": "c" * 64, "manifest": {}},
             announce=FLOOD_BYTES)
        flood(b"\0", FLOOD_BYTES)
    elif op == "install":  # a small reply that announces 400 MB
        send({"ok": True, "to": request.get("to")}, announce=FLOOD_BYTES)
        flood(b"\0", FLOOD_BYTES)
    else:
        plausible(request)


def lie_truncated(request):
    # type: (Dict[str, Any]) -> None
    """Frames cut short: a payload that ends early, a line that never ends; then the board is gone, its
    last words on stderr three long lines of escape sequences."""
    sys.stderr.write((ESC * 2000 + "\n") * 3)
    sys.stderr.flush()
    if request.get("op") == "state":
        send({"ok": True, "current": None}, b'{"current": null, "fi', announce=10 * 1000 * 1000)
    else:
        out.write(b'{"ok": true, "files": [{"path": "/da')
        out.flush()
    sys.exit(0)


def lie_malformed(request):
    # type: (Dict[str, Any]) -> None
    """A reply line that is not JSON, nor UTF-8: raw escape bytes."""
    out.write(b"\x1b[2J{\"ok\": tru\xff\x9b31m\x07\n")
    out.flush()


def lie_not_object(request):
    # type: (Dict[str, Any]) -> None
    """Valid JSON that is not an object: a string of escape sequences."""
    send_line = json.dumps(ESC * 10).encode("utf-8") + b"\n"
    out.write(send_line)
    out.flush()


def lie_unasked(request):
    # type: (Dict[str, Any]) -> None
    """An answer to a question not asked (a commit's, a hello) before each true one: out of step after."""
    send({"ok": True, "current": "r9", "op": "commit"})
    send({"op": "hello", "agent": ESC})
    plausible(request)


def lie_flood(request):
    # type: (Dict[str, Any]) -> None
    """400 MB of escape sequences on stdout, never a newline."""
    flood(ESC.encode("utf-8"), FLOOD_BYTES)


def lie_error_text(request):
    # type: (Dict[str, Any]) -> None
    """Failures whose kind and message are escape sequences, the message 200 KB long."""
    op = request.get("op")
    if op == "env":
        plausible(request)
    elif op in ("find", "install"):
        fail(ESC + "kind", ESC * 10000)
    else:
        fail("io", ESC * 10000)


def built(request, **fields):
    # type: (Dict[str, Any], Any) -> None
    """A build reply that says every program asked for was built, `fields` changing it."""
    reply = {"ok": True, "cache_file": "build/mace_cl_compiled_program.bin", "manifest_file": "build/manifest.json",
             "cache_sha256": hashlib.sha256(b"").hexdigest(), "programs": [
                 {"key": p.get("key"), "ok": True, "build_ms": 1, "binary_size": 4, "sha256": "d" * 64,
                  "reused": False, "log": ""} for p in request.get("programs") or []]}  # type: Dict[str, Any]
    reply.update(fields)
    send(reply)


def lie_keys(request):
    # type: (Dict[str, Any]) -> None
    """A build that reports a program it was not asked for, its key escape sequences climbing out."""
    if request.get("op") == "build":
        built(request, programs=[{"key": "../../" + ESC, "ok": True, "build_ms": 1, "binary_size": 4,
                                  "sha256": "d" * 64, "reused": False, "log": ESC}])
    else:
        plausible(request)


def lie_manifest(request):
    # type: (Dict[str, Any]) -> None
    """A build whose manifest file climbs out of the release."""
    if request.get("op") == "build":
        built(request, manifest_file="../../../etc/" + ESC)
    else:
        plausible(request)


def lie_pull(request):
    # type: (Dict[str, Any]) -> None
    """A build that says it worked, then a cache file that is not a MACE container (its hash true); for
    rollback the same file."""
    op = request.get("op")
    junk = (ESC * 100).encode("utf-8")
    if op == "build":
        built(request, cache_sha256=hashlib.sha256(junk).hexdigest())
    elif op == "get":
        if "manifest" in str(request.get("path")):
            send({"ok": True, "size": 16}, b'{"programs": []}')
        else:
            send({"ok": True, "size": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}, junk)
    elif op == "rollback":
        send({"ok": True, "current": "r2", "previous": "r3", "cache_sha256": hashlib.sha256(junk).hexdigest(),
              "manifest": {"programs": []}}, junk)
    else:
        plausible(request)


def lie_sizes(request):
    # type: (Dict[str, Any]) -> None
    """Sizes that do not match: a pulled file's size field, a read shorter than `find` said, a rollback's
    cache file whose hash is not the one announced."""
    op = request.get("op")
    junk = b"\0" * 64
    if op == "build":
        lie_pull(request)
    elif op == "get":
        send({"ok": True, "size": len(junk) + 7, "sha256": hashlib.sha256(junk).hexdigest()}, junk)
    elif op == "find":
        send({"ok": True, "truncated": False, "files": [
            {"path": "/data/short.bin", "kind": "file", "size": 100, "sha256": hashlib.sha256(junk).hexdigest(),
             "mtime": 1.0}]})
    elif op == "read":
        send({"ok": True}, junk)
    elif op == "rollback":
        send({"ok": True, "current": "r2", "previous": "r3", "cache_sha256": "e" * 64, "manifest": {}}, junk)
    else:
        plausible(request)


def main(argv):
    # type: (List[str]) -> int
    case, agent = argv[1], argv[2]
    if case == "hello":
        send({"op": "hello", "agent_version": "1", "agent": ESC + "not-yours", "python": ESC, "pid": 1})
    else:
        send({"op": "hello", "agent_version": "1", "agent": agent, "python": "3.11.2", "pid": os.getpid()})
    handlers = {name: globals()["lie_" + name] for name in CASES if name != "hello"}
    answer = handlers.get(case, plausible)  # type: Callable[[Dict[str, Any]], None]
    try:
        for request in requests():
            if request.get("op") == "bye":
                send({"ok": True, "dropped": None})
                return 0
            answer(request)
    except BrokenPipeError:  # the controller stopped listening: what a flood should come to
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
