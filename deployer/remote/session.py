"""One controller session: its ops, at most one begun release, the device lock, commit and rollback."""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys

from . import phases
from .bench import parse_bench_cases, parse_settings
from .blobs import blob_payload, prune_blobs, split_blob_fields, stored_blobs
from .build import given_binaries, parse_program_specs
from .bundle import bundle_files, bundle_id, bundle_root, drop_ephemeral_bundle, prune_bundles
from .child import run_child
from .collect import op_find, op_install, op_read
from .environ import op_env
from .fields import req_int, req_str, req_str_list, req_timeout
from .framing import AgentFailure, FramingError, Payload, bad_request, read_header, write_message
from .fs import fsync_dir, io_failure, read_file_limited, read_json_file, resolve_inside, write_atomic
from .layout import (
    AGENT_VERSION,
    CACHE_FILE,
    FINGERPRINT_CACHE,
    MANIFEST_FILE,
    MAX_GET,
    READONLY_ENV,
    RELEASE_ID_RE,
    RELEASE_INDEX,
    SHA256_RE,
)
from .noop import forget as forget_noop
from .noop import remember as remember_noop
from .releases import link_build, link_unchanged, parse_file_list, prepare_target, release_index, reusable_programs
from .selection import parse_selection
from .shell import op_disk, op_shell
from .smoke import load_checked_programs, parse_cases, parse_expected
from .stamp import driver_stamp
from .startup import NO_DRIVER_CACHE_ENV, parse_models


class SessionEnd(Exception):
    """Input ended or the agent was told to stop (SIGTERM/SIGHUP): abandon an uncommitted release."""


def on_signal(signum, frame):
    raise SessionEnd("stopped by %s" % signal.Signals(signum).name)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class signals_deferred:
    """Hold SIGTERM/SIGHUP while `current` is being switched: a commit the agent received completes (the
    switch, fsync of RD, pruning) and a stop signal is acted on after it, never half-way. A
    `with` class rather than contextlib, for the 3.6 agent's sake; only the main thread calls it."""

    def __enter__(self):
        self.previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        return self

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.previous)  # a held signal is delivered here
        return False

WRITING_OPS = ("begin", "put", "build", "commit", "rollback", "install", "noop")


class Session:
    """One controller session: at most one begun release, and the lock while writing it."""

    def __init__(self, rd):
        self.rd = rd
        self.agent_id = bundle_id(bundle_files())  # what the controller checks in `hello`
        self.input_fd = None  # the controller's end: watched for a hang-up during OpenCL steps
        self.lock_fd = None
        self.release_id = None
        self.files = {}  # path -> {size, sha256, mode} of the begun release: its index at commit
        self.readonly = bool(os.environ.get(READONLY_ENV))
        self.ops = {"state": self.op_state, "begin": self.op_begin, "put": self.op_put,
                    "fingerprint": self.op_opencl,
                    "build": self.op_opencl, "smoke": self.op_opencl, "startup": self.op_opencl,
                    "bench": self.op_opencl, "get": self.op_get,
                    "commit": self.op_commit, "bye": self.op_bye,
                    "find": op_find, "read": op_read, "install": op_install, "rollback": self.op_rollback,
                    "shell": self.op_shell, "disk": self.op_disk, "env": op_env, "noop": self.op_noop}
        self.answered = 0  # requests answered so far: `env` must be the first

    # ----- helpers -----

    def release_dir(self, release_id=None):
        return os.path.join(self.rd, "releases", release_id or self.release_id or "")

    def need_release(self):
        if self.release_id is None:
            raise bad_request("no release begun in this session (send begin first)")
        return self.release_dir()

    def unlock(self):
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor drops the flock
            self.lock_fd = None

    def abandon(self):
        """Delete the begun, uncommitted release (so `current` stays as it was) and drop the lock.

        A signal can land between commit's rename and its bookkeeping: a release that `current`
        already points to is never deleted."""
        if self.release_id is not None and self.previous() != self.release_id:
            shutil.rmtree(self.release_dir(), ignore_errors=True)
        self.release_id = None
        self.files = {}
        self.unlock()

    def previous(self):
        try:
            target = os.readlink(os.path.join(self.rd, "current"))
        except OSError:
            return None
        return os.path.basename(target.rstrip("/")) or None

    # ----- ops: each returns (reply fields, payload bytes) -----

    def take_lock(self):
        """RD/.lock, held until the session commits or ends: two controllers never race on `current`."""
        lock_path = os.path.join(self.rd, ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AgentFailure("locked", "another deploy is writing this device (lock %s)"
                                   % lock_path) from exc
            raise
        self.lock_fd = fd

    def switch_current(self, release_id):
        """Point `current` at releases/<id> with one rename of a temp symlink, then fsync RD."""
        tmp = os.path.join(self.rd, ".current.tmp-%d" % os.getpid())
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink("releases/" + release_id, tmp)
            os.rename(tmp, os.path.join(self.rd, "current"))
        except BaseException as exc:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise io_failure(exc, "current") from exc
            raise
        phases.reached("switch", 0)
        fsync_dir(self.rd)

    def current_dir(self):
        current = self.previous()
        path = os.path.join(self.rd, "releases", current) if current else None
        return path if path and os.path.isdir(path) else None

    def op_state(self, req, payload):
        """Everything the controller needs to plan an incremental push, in one round trip: the current
        release's file index and build manifest, the cached fingerprint if the driver stamp still matches,
        and the stored blobs. Reads only; takes no lock."""
        selection = req.get("opencl")
        parse_selection(selection)
        current = self.current_dir()
        manifest = read_json_file(os.path.join(current, MANIFEST_FILE)) if current else None
        cached = read_json_file(os.path.join(self.rd, FINGERPRINT_CACHE), 1 << 20) or {}
        stamp = driver_stamp(selection)
        state = {"current": self.previous(), "files": release_index(current), "manifest": manifest,
                 "fingerprint": cached.get("fingerprint") if cached.get("stamp") == stamp else None,
                 "blobs": stored_blobs(self.rd)}
        data = json.dumps(state, sort_keys=True).encode("utf-8")
        return {"current": state["current"], "payload_size": len(data)}, data

    def op_begin(self, req, payload):
        release_id = req_str(req, "release", pattern=RELEASE_ID_RE)
        if release_id in (".", "..") or len(release_id) > 200:
            raise bad_request("field 'release': %r is not a usable id" % release_id)
        if self.release_id is not None:
            raise bad_request("release %r is already begun in this session" % self.release_id)
        self.take_lock()
        forget_noop(self.rd)  # before anything changes: no shell answers for a board being written
        try:
            os.makedirs(os.path.join(self.rd, "releases"), 0o755, exist_ok=True)
            os.mkdir(self.release_dir(release_id), 0o755)
        except FileExistsError:
            self.unlock()
            raise bad_request("release %r already exists in %s/releases" % (release_id, self.rd)) from None
        except OSError:
            self.unlock()
            raise
        self.release_id = release_id
        files = parse_file_list(req)
        need = None
        if files is not None:
            try:
                need, self.files = link_unchanged(files, self.base_dir(req), self.release_dir(),
                                                  req_str_list(req, "drop", []))
            except BaseException:
                self.abandon()
                raise
        return {"release": release_id, "previous": self.previous(), "need": need}, b""

    def base_dir(self, req):
        """The release a delta is relative to: `base` must still be `current` (checked under the lock),
        else another deploy moved it since the controller planned, and the plan is void."""
        base = req_str(req, "base", None, pattern=RELEASE_ID_RE)
        if base is None:
            return None
        if base != self.previous() or self.current_dir() is None:
            raise AgentFailure("moved", "current is %s, not %s as planned: another deploy changed this device "
                               "meanwhile; run the push again" % (self.previous(), base))
        return os.path.realpath(self.current_dir())

    def op_put(self, req, payload):
        rel = req_str(req, "path")
        size = req_int(req, "size", lo=0)
        want = req_str(req, "sha256", pattern=SHA256_RE)
        mode = req_int(req, "mode", 0o644, lo=0, hi=0o777)
        root = self.need_release()

        def check(got_size, got_sha):
            if got_size != size or got_sha != want:
                raise AgentFailure("checksum", "%s: got %d bytes with sha256 %s, expected %d with sha256 %s"
                                   % (rel, got_size, got_sha, size, want))

        try:
            write_atomic(prepare_target(root, rel), payload.chunks(), mode, check, phase="rename")
        except OSError as exc:
            raise io_failure(exc, rel) from exc
        self.files[rel] = {"size": size, "sha256": want, "mode": mode}
        return {"path": rel, "size": size}, b""

    def read_root(self):
        """Where read-only ops look: the begun release, else `current` (a no-op push pulls and smokes
        what is already deployed)."""
        if self.release_id is not None:
            return self.release_dir()
        current = self.current_dir()
        if current is None:
            raise AgentFailure("no_release", "nothing is deployed here and no release is begun")
        return os.path.realpath(current)

    def op_get(self, req, payload):
        rel = req_str(req, "path")
        path = resolve_inside(self.read_root(), rel)
        try:
            if not os.path.isfile(path):
                raise AgentFailure("io", "%s: no such file in the release" % rel)
            data = read_file_limited(path, MAX_GET, rel)
        except OSError as exc:
            raise io_failure(exc, rel) from exc
        return {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "payload_size": len(data)}, data

    def op_opencl(self, req, payload):
        """fingerprint, build, smoke, startup: checked here, run in a child process (startup's with the
        drivers' kernel caches off)."""
        op = req["op"]
        timeout = req_timeout(req)
        parse_selection(req.get("opencl"))
        if op == "fingerprint":
            return self.fingerprint(req, timeout)
        if op == "build":
            return self.build(req, self.need_release(), timeout, given_binaries(req, payload))
        root = self.read_root()
        data = b""
        if op in ("smoke", "startup", "bench"):
            data = blob_payload(self.rd, req, payload, store=not self.readonly)
            req, data = split_blob_fields(req, data)
            expected = parse_expected(req)
            if op == "smoke":
                parse_cases(req, len(data), expected)
            elif op == "bench":
                parse_settings(req)
                parse_bench_cases(req, len(data), expected)
                if req.get("models"):
                    parse_models(req, len(data), expected)
            else:
                parse_program_specs(req, root)
                parse_models(req, len(data), expected)
            load_checked_programs(root, req_str(req, "cache_file"), expected)  # before any driver runs
        env = dict(os.environ, **NO_DRIVER_CACHE_ENV) if op == "startup" else None
        return run_child(req, data, root, timeout, env, watch_fd=self.input_fd)

    def fingerprint(self, req, timeout):
        """Fingerprint in a child; remember it with the driver stamp so the next `state` can skip this."""
        stamp = driver_stamp(req.get("opencl"))  # before the child: a driver changing meanwhile re-stamps
        root = self.release_dir() if self.release_id else self.rd
        if not os.path.isdir(root):  # a --check session on a device never pushed: RD is not created
            root = os.path.dirname(os.path.abspath(__file__))
        reply, data = run_child(req, b"", root, timeout, watch_fd=self.input_fd)
        if not self.readonly and req.get("remember", True):
            try:
                write_atomic(os.path.join(self.rd, FINGERPRINT_CACHE),
                             [json.dumps({"stamp": stamp, "fingerprint": reply.get("fingerprint")}).encode()])
            except OSError:
                pass  # only a cache: the next push fingerprints again
        return reply, data

    def build(self, req, root, timeout, given=(None, b"")):
        """Build `programs` in a child and take the `keep` programs' binaries from the base release (the
        controller matched their build keys); when nothing is built and the set and settings are the
        base's, the base's build folder is linked as it is and no driver runs. `given`: (the `given`
        list with offsets, its bytes): binaries another device built, tried on this driver first."""
        keep = req_str_list(req, "keep", [])
        if given[0]:
            req = dict(req, given=given[0])
        if not keep:
            return self.build_child(req, given[1], root, timeout)
        base = self.base_dir(req)
        if base is None:
            raise bad_request("'keep' needs the 'base' release the binaries come from")
        old = read_json_file(os.path.join(base, MANIFEST_FILE)) or {}
        reuse = reusable_programs(base, old, keep)
        missing = sorted(set(keep) - set(reuse))
        if missing:
            raise AgentFailure("reuse_missing", "the base release lacks (or holds damaged) binaries of %s"
                               % ", ".join(repr(k) for k in missing))
        if (not req.get("programs") and set(keep) == {p.get("key") for p in old.get("programs", [])}
                and old.get("mace_version") == req.get("mace_version")
                and old.get("mace_format", "pb") == req_str(req, "mace_format", "pb")):
            return link_build(base, root, old, reuse)
        offsets, at = [], len(given[1])
        for _key, (entry, binary, log) in sorted(reuse.items()):
            offsets.append({"offset": at, "size": len(binary), "log": log, "entry": entry})
            at += len(binary)
        payload = given[1] + b"".join(binary for _, (_, binary, _) in sorted(reuse.items()))
        return self.build_child(dict(req, reuse=offsets), payload, root, timeout)

    def build_child(self, req, payload, root, timeout):
        """The build's child. A driver that crashes on a given binary (PoCL does on a truncated one) must not
        cost the board its build: once, the same build without the given binaries, each compiled here."""
        phases.reached("build", self.input_fd)  # tests only: a build about to start its driver
        try:
            return run_child(req, payload, root, timeout, watch_fd=self.input_fd)
        except AgentFailure as exc:
            if exc.kind != "driver_crash" or not req.get("given"):
                raise
            refused = dict((g["key"], "refused: the driver crashed loading it (%s)" % exc.message)
                           for g in req["given"])
            reply, data = run_child(dict(req, given=[]), payload, root, timeout, watch_fd=self.input_fd)
            for record in reply.get("programs", []):
                if record.get("key") in refused:
                    record["given"] = refused[record["key"]]
            return reply, data

    def op_commit(self, req, payload):
        """The commit rule (docs/design.md, section 12): once the agent has read `commit`, the switch
        happens even if the controller is gone meanwhile; SIGTERM/SIGHUP wait until it is done. Only an
        error (disk, checksum) before the rename leaves `current` as it was."""
        with signals_deferred():
            phases.reached("commit", 0)
            keep = req_int(req, "keep", 3, lo=0)
            release = self.need_release()
            release_id = self.release_id
            index = {"release": release_id, "files": self.files}
            write_atomic(os.path.join(release, RELEASE_INDEX), [json.dumps(index, sort_keys=True).encode()])
            for dirpath, _, _ in os.walk(release):
                fsync_dir(dirpath)
            fsync_dir(os.path.dirname(release))
            phases.reached("fsync", 0)
            self.switch_current(release_id)
            self.release_id = None  # committed: no longer ours to delete
            pruned = self.prune(keep, release_id)
            prune_blobs(self.rd)
            if not self.readonly:
                prune_bundles(self.rd, bundle_root())
            self.unlock()
        return {"current": release_id, "pruned": pruned}, b""

    def op_rollback(self, req, payload):
        """Switch `current` back to the newest release older than it; reply with that release's cache file
        (payload) and manifest, so the controller's cache follows `current`."""
        if self.release_id is not None:
            raise bad_request("cannot roll back while release %r is begun" % self.release_id)
        self.take_lock()
        try:
            forget_noop(self.rd)
            current = self.previous()
            base = os.path.join(self.rd, "releases")
            names = sorted(n for n in (os.listdir(base) if os.path.isdir(base) else [])
                           if RELEASE_ID_RE.fullmatch(n) and os.path.isdir(os.path.join(base, n)))
            if current is None:
                raise AgentFailure("no_release", "nothing is deployed here: %s/current does not exist" % self.rd)
            older = [n for n in names if n < current]
            if not older:
                raise AgentFailure("no_previous", "no release older than %s to roll back to (releases kept: %s)"
                                   % (current, ", ".join(names) or "none"))
            target = older[-1]
            with signals_deferred():
                self.switch_current(target)
        finally:
            self.unlock()
        release = os.path.join(base, target)
        try:
            data = read_file_limited(os.path.join(release, CACHE_FILE), MAX_GET, CACHE_FILE)
            manifest = json.loads(read_file_limited(os.path.join(release, MANIFEST_FILE), MAX_GET,
                                                    MANIFEST_FILE).decode("utf-8"))
        except (OSError, ValueError):
            data, manifest = b"", None  # switched all the same; the controller says the cache is absent
        return {"current": target, "previous": current, "manifest": manifest,
                "cache_sha256": hashlib.sha256(data).hexdigest(), "payload_size": len(data)}, data

    def prune(self, keep, current):
        """Delete releases beyond the newest `keep` (ids sort by time); never the current one."""
        base = os.path.join(self.rd, "releases")
        names = sorted((n for n in os.listdir(base)
                        if RELEASE_ID_RE.fullmatch(n) and os.path.isdir(os.path.join(base, n))), reverse=True)
        pruned = [n for n in names[keep:] if n != current]
        phases.reached("prune", 0)
        for name in pruned:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        return pruned

    def op_noop(self, req, payload):
        """Arm the shell's no-op for the current release (remote/noop.py), under the lock; a board where
        it cannot be armed (the lock held, the driver changed since `state`, no `cksum`) says why and
        goes on answering through the agent."""
        if self.release_id is not None:
            raise bad_request("noop: release %r is begun and not committed" % self.release_id)
        try:
            self.take_lock()
        except AgentFailure:
            return {"armed": False, "why": "another deploy is writing this device"}, b""
        try:
            selection = req.get("opencl")
            parse_selection(selection)
            cached = read_json_file(os.path.join(self.rd, FINGERPRINT_CACHE), 1 << 20) or {}
            why = remember_noop(self.rd, req, self.previous()) if cached.get("stamp") == driver_stamp(selection) \
                else "the driver changed since this push fingerprinted it"
        finally:
            self.unlock()
        return {"armed": why is None, "why": why}, b""

    def op_shell(self, req, payload):
        return op_shell(req, payload, watch_fd=self.input_fd)

    def op_disk(self, req, payload):
        return op_disk(self.rd), b""

    def op_bye(self, req, payload):
        # Clean up before answering: once the controller hears "ok", nothing uncommitted is left.
        dropped = self.release_id
        self.abandon()  # an orderly end without commit also leaves `current` as it was
        if self.readonly:
            drop_ephemeral_bundle()
        return {"dropped": dropped}, b""

    # ----- the loop -----

    def dispatch(self, req, payload):
        """Answer one request: (reply object, payload); never raises for a bad request or a failed op."""
        op = req.get("op")
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return bad_request("unknown op %r (known: %s)" % (op, ", ".join(sorted(self.ops)))).reply(), b""
        self.answered += 1
        if op == "env" and self.answered > 1:  # a child or the stamp may already have read the environment
            return bad_request("env must be the session's first request").reply(), b""
        if self.readonly and op in WRITING_OPS:
            return AgentFailure("read_only", "this session only checks (deploy push --check): %s would write"
                                % op).reply(), b""
        try:
            reply, out = handler(req, payload)
            return dict(reply, ok=True), out
        except AgentFailure as exc:
            return exc.reply(), b""
        except OSError as exc:
            return io_failure(exc, exc.filename or op).reply(), b""
        except (EOFError, SessionEnd):
            raise
        except Exception as exc:  # an agent bug becomes a reply; the session goes on
            return AgentFailure("internal", "%s in %s: %s" % (type(exc).__name__, op, exc)).reply(), b""

    def serve(self, inp, out):
        """Answer requests until bye (exit 0) or end of input (exit 1 if a begun release was dropped)."""
        try:
            self.input_fd = inp.fileno()
        except (AttributeError, OSError, ValueError):
            self.input_fd = None
        try:
            write_message(out, {"op": "hello", "agent_version": AGENT_VERSION, "agent": self.agent_id,
                                "python": "%d.%d.%d" % tuple(sys.version_info[:3]), "pid": os.getpid()})
            while True:
                try:
                    req, size = read_header(inp)
                except FramingError as exc:
                    write_message(out, bad_request(str(exc)).reply())
                    continue
                payload = Payload(inp, size)
                reply, data = self.dispatch(req, payload)
                payload.drain()  # keep the stream in step even when an op ignored its payload
                try:
                    write_message(out, reply, data)
                except ValueError as exc:  # reply line too long: report it rather than die
                    write_message(out, AgentFailure("internal", str(exc)).reply())
                if req.get("op") == "bye":
                    return 0
        except (EOFError, SessionEnd, BrokenPipeError, KeyboardInterrupt):
            dropped = self.release_id is not None
            self.abandon()
            return 1 if dropped else 0
