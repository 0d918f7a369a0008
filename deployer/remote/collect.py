"""`find`, `read` and `install`: the caches apps wrote on the board (docs/design.md, section 8)."""

import errno
import glob
import hashlib
import os
import stat
import time

from .fields import req_int, req_str, req_str_list
from .framing import CHUNK, AgentFailure, bad_request, show
from .fs import io_failure, write_atomic
from .layout import MAX_GET, SHA256_RE

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Any, Dict, List, Set, Tuple  # noqa: F401

MAX_FIND_FILES = 100000

FIND_TIME_S = 30.0


def _found(path, max_size):
    """What `find` says of one match: regular files only, never followed through a symlink."""
    entry = {"path": path}
    try:
        st = os.lstat(path)
    except OSError as exc:
        entry.update(kind="error", error=exc.strerror or str(exc))
        return entry
    entry.update(size=st.st_size, mtime=st.st_mtime)
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        entry.update(kind="symlink", error="a symbolic link (to %s): not followed" % target)
    elif not stat.S_ISREG(st.st_mode):
        entry.update(kind="other", error="not a regular file")
    elif st.st_size > max_size:
        entry.update(kind="too_big", error="%d bytes, over the %d-byte cap" % (st.st_size, max_size))
    else:
        try:
            entry.update(kind="file", sha256=_hash_nofollow(path))
        except OSError as exc:
            entry.update(kind="denied" if exc.errno in (errno.EACCES, errno.EPERM) else "error",
                         error=exc.strerror or str(exc))
    return entry


def _hash_nofollow(path):
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def op_find(req, payload):
    """Files matching glob patterns (`~` allowed, `**` recursive), bounded in count and time."""
    patterns = req_str_list(req, "patterns")
    max_files = req_int(req, "max_files", 1000, lo=1, hi=MAX_FIND_FILES)
    max_size = req_int(req, "max_size", MAX_GET, lo=0)
    deadline = time.time() + FIND_TIME_S
    files = []  # type: List[Dict[str, Any]]
    seen, truncated = set(), False  # type: Set[Tuple[int, int]], bool
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if not os.path.isabs(expanded):
            raise bad_request("pattern %s is not an absolute path" % show(pattern))
        for path in glob.iglob(expanded, recursive=True):
            if len(files) >= max_files or time.time() > deadline:
                truncated = True
                break
            if path not in seen:
                seen.add(path)
                files.append(_found(path, max_size))
    return {"files": files, "truncated": truncated}, b""


def op_read(req, payload):
    """One file found by `find`, re-checked: still a regular file, still the size and hash it had."""
    path = req_str(req, "path")
    size = req_int(req, "size", lo=0, hi=MAX_GET)
    want = req_str(req, "sha256", pattern=SHA256_RE)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise AgentFailure("io", "%s: not a regular file" % path)
            data = f.read(size + 1)
    except OSError as exc:
        raise io_failure(exc, path) from exc
    got = hashlib.sha256(data).hexdigest()
    if len(data) != size or got != want:
        raise AgentFailure("changed", "%s changed while being read (was %d bytes, now %s%d)"
                           % (path, size, "over " if len(data) > size else "", len(data)))
    return {"path": path, "size": len(data), "sha256": got, "payload_size": len(data)}, data


def op_install(req, payload):
    """Write a file where an app reads it: a plain writable copy (temp, fsync, rename), never a link."""
    to = os.path.expanduser(req_str(req, "to"))
    size = req_int(req, "size", lo=0, hi=MAX_GET)
    want = req_str(req, "sha256", pattern=SHA256_RE)
    if not os.path.isabs(to) or "\0" in to:
        raise bad_request("install target %s is not an absolute path" % show(to))
    data = payload.read_all()
    if len(data) != size or hashlib.sha256(data).hexdigest() != want:
        raise AgentFailure("checksum", "install payload does not match its size/sha256")
    try:
        if os.path.islink(to):
            raise AgentFailure("io", "%s is a symbolic link: refusing to write through it" % to)
        os.makedirs(os.path.dirname(to), exist_ok=True)
        write_atomic(to, [data], mode=0o644)
    except OSError as exc:
        raise io_failure(exc, to) from exc
    return {"to": to, "size": size}, b""
