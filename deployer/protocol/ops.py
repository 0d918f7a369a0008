"""The agent's operations as typed calls: each reply parsed and checked once, here, at the protocol boundary.

A board is untrusted (docs/design.md, section 2). Every function below sends one request and returns a typed
value whose sizes, ranges and formats were checked (hashes are 64 lowercase hex digits, paths are plain and
relative where the controller uses them as such, counts are bounded), or raises `AgentError(kind="bad_reply")`
naming the op and the field. Code above this module never reads a board's raw fields. The replies with
a payload of their own checking (`state`: tasks/plan.py `parse_state`; `fingerprint`: `parse_fingerprint`;
`smoke`, `startup`, `bench`: tasks/smoke.py and tasks/bench.py) are parsed by those functions, called here
or on the `Reply` the session returns.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deployer.errors import AgentError, CompileError
from deployer.protocol.fingerprint import parse_fingerprint
from deployer.protocol.reply import MAX_TEXT, SHA256, Fields, Reply, show
from deployer.protocol.session import AgentSession
from deployer.protocol.spool import Spool
from deployer.text import one_line, visible

MAX_LOG = 1 << 16  # a build log kept per program


# ----- begin: which files of the release the device lacks -----


def begin(session: AgentSession, release: str, files: Sequence[Mapping[str, Any]], **base: Any) -> list[str]:
    """Start a release; the paths (of `files`) the device asks to be sent."""
    reply = Fields(session.request("begin", release=release, files=list(files), **base).fields, "begin reply")
    offered = {str(f["path"]) for f in files}
    need = [_need_entry(entry) for entry in reply.items("need", len(files))]
    unknown = [n for n in need if n not in offered]
    if unknown:
        raise AgentError(f"the device asked for files that are not in the release: "
                         f"{[one_line(n, 80) for n in unknown[:3]]}", kind="bad_reply")
    return need


def _need_entry(entry: object) -> str:
    if not isinstance(entry, str) or len(entry) > MAX_TEXT:
        raise AgentError(f"begin reply field 'need': expected paths, got {show(entry)}", kind="bad_reply")
    return entry


# ----- build: the programs compiled, their binaries' hashes, the cache file's -----


@dataclass(frozen=True, slots=True)
class ProgramBuilt:
    key: str
    ok: bool
    sha256: str | None  # of its binary; None when it failed
    log: str  # the driver's build log, made printable, bounded
    reused: bool = False  # its binary came from the base release (`keep`)
    given: str | None = None  # a binary given to it (build sharing): "loaded" or "refused: <why>", printable


@dataclass(frozen=True, slots=True)
class BuildReply:
    programs: tuple[ProgramBuilt, ...]
    cache_sha256: str
    manifest_file: str  # relative to the release

    def raise_for_failed(self) -> None:
        failed = [p for p in self.programs if not p.ok]
        if failed:
            log = failed[0].log.strip().splitlines()
            names = ", ".join(repr(one_line(p.key, 200)) for p in failed)
            tail = "\n".join(log[-12:])
            raise CompileError(f"{len(failed)} program(s) failed to build: {names}\n{tail}", kind="build_failed")

    @property
    def binaries(self) -> dict[str, str]:
        return {p.key: p.sha256 for p in self.programs if p.sha256 is not None}


def parse_build(reply: Reply, asked: Sequence[str]) -> BuildReply:
    """The `build` reply: one record per program asked for (any other key is refused)."""
    fields = Fields(reply.fields, "build reply")
    programs = []
    for record in fields.items("programs", len(asked)):
        entry = Fields(record, "build reply program")
        key, ok = entry.text("key"), entry.flag("ok")
        if key not in asked:
            raise AgentError(f"build reply names a program that was not asked for: {one_line(key, 80)}",
                             kind="bad_reply")
        log = visible(entry.optional_text("log", 1 << 24) or "", MAX_LOG)
        given = entry.optional_text("given", 1 << 16)
        programs.append(ProgramBuilt(key, ok, entry.sha256("sha256") if ok else None, log,
                                     reused=entry.record.get("reused") is True,
                                     given=None if given is None else one_line(visible(given, 400), 400)))
    return BuildReply(tuple(programs), fields.sha256("cache_sha256"), fields.relative_path("manifest_file"))


# ----- get: a file of the current build, streamed -----


def get(session: AgentSession, path: str, spool: Spool, max_reply: int) -> int:
    """A build file streamed into `spool`; the size the device announced (the caller checks it and the hash)."""
    reply = session.request("get", path=path, spool=spool, max_reply=max_reply)
    return Fields(reply.fields, "get reply").integer("size", 0, max_reply)


# ----- rollback -----


@dataclass(frozen=True, slots=True)
class RolledBack:
    current: str  # the release now current (the one rolled back to)
    previous: str  # the release it replaced
    manifest: dict[str, Any] | None  # that release's manifest, as the device sent it (None: it has none)
    cache_sha256: str
    cache: bytes  # that release's cache file (b"": it has none)


def rollback(session: AgentSession) -> RolledBack:
    reply = session.request("rollback")
    fields = Fields(reply.fields, "rollback reply")
    manifest = reply.fields.get("manifest")
    if manifest is not None and not isinstance(manifest, dict):
        raise AgentError(f"rollback reply field 'manifest': expected an object, got {show(manifest)}",
                         kind="bad_reply")
    return RolledBack(one_line(fields.text("current", 80), 80), one_line(fields.text("previous", 80), 80),
                      manifest, fields.sha256("cache_sha256"), reply.payload)


# ----- shell and disk (a nightly run's steps and health check) -----


@dataclass(frozen=True, slots=True)
class ShellResult:
    exit: int | None  # None: killed by a signal, or timed out
    signal: int | None
    timed_out: bool
    stdout: str
    stderr: str


def shell(session: AgentSession, command: str, timeout_s: float, **extra: Any) -> ShellResult:
    reply = session.request("shell", command=command, timeout_s=timeout_s, **extra)
    fields = Fields(reply.fields, "shell reply")
    out_size = fields.integer("stdout_size", 0, len(reply.payload))
    err_size = fields.integer("stderr_size", 0, len(reply.payload) - out_size)
    out = reply.payload[:out_size].decode("utf-8", "replace")
    err = reply.payload[out_size: out_size + err_size].decode("utf-8", "replace")
    return ShellResult(fields.optional_integer("exit", 0, 255), fields.optional_integer("signal", 1, 128),
                       fields.flag("timed_out"), out, err)


def disk_free(session: AgentSession) -> int:
    """Free bytes on the filesystem of the device's remote dir."""
    return Fields(session.request("disk").fields, "disk reply").integer("free_bytes")


# ----- find and read (collect) -----


@dataclass(frozen=True, slots=True)
class Found:
    """A file the device listed, after checking what it said about it."""

    path: str
    size: int
    sha256: str
    mtime: float | None


@dataclass(frozen=True, slots=True)
class Refused:
    """A listed entry that will not be read: its path (made printable, one line) and why."""

    path: str
    why: str


@dataclass(frozen=True, slots=True)
class Listing:
    entries: tuple[Found | Refused, ...]
    truncated: bool  # the device stopped listing at max_files


def find(session: AgentSession, patterns: Sequence[str], max_files: int, max_size: int) -> Listing:
    """The files matching `patterns` on the device, each checked: at most `max_files` of them."""
    reply = Fields(session.request("find", patterns=list(patterns), max_files=max_files, max_size=max_size).fields,
                   "find reply")
    truncated = reply.flag("truncated")
    entries = [check_found(entry, max_size) for entry in reply.items("files")[:max_files]]
    return Listing(tuple(entries), truncated)


def check_found(entry: object, max_size: int) -> Found | Refused:
    """A `find` entry that may be read, or why it may not (the device's reply is untrusted)."""
    if not isinstance(entry, Mapping):
        return Refused("None", "malformed entry")
    path = entry.get("path")
    shown = one_line(str(path), 300)
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        return Refused(shown, "not an absolute path")
    if ".." in path.split("/") or posixpath.normpath(path) != path:
        return Refused(shown, "path with '..' or not normalised: refused")
    try:  # what os.fsdecode makes of a real file name encodes back; JSON's lone "\ud800" does not
        path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return Refused(shown, "not a file name: a lone surrogate")
    kind = entry.get("kind")
    if kind != "file":
        error = entry.get("error")
        return Refused(shown, one_line(str(error if isinstance(error, str) else kind), 300))
    size, sha, mtime = entry.get("size"), entry.get("sha256"), entry.get("mtime")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= max_size:
        return Refused(shown, f"size {one_line(repr(size), 40)} outside 0..{max_size} bytes: refused before "
                              "pulling")
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        return Refused(shown, "malformed sha256")
    if not isinstance(mtime, int | float) or isinstance(mtime, bool) or mtime != mtime:
        mtime = None
    return Found(path, size, sha, float(mtime) if mtime is not None else None)


def read(session: AgentSession, found: Found, spool: Spool) -> None:
    """A listed file streamed into `spool` (at most its announced size; the caller checks size and hash)."""
    session.request("read", path=found.path, size=found.size, sha256=found.sha256, max_reply=found.size, spool=spool)


def install(session: AgentSession, data: bytes, to: str, sha256: str) -> None:
    session.request("install", data, to=to, size=len(data), sha256=sha256)


# ----- fingerprint -----


def fingerprint(session: AgentSession, opencl: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The device's OpenCL fingerprint, checked (`parse_fingerprint`: its id recomputed from its strings)."""
    reply = Fields(session.request("fingerprint", opencl=dict(opencl), **extra).fields, "fingerprint reply")
    return parse_fingerprint(reply.record.get("fingerprint"))
