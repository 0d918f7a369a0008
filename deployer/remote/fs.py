"""Files on the board: paths kept inside a root, atomic writes (temp, fsync, rename), bounded reads."""

import hashlib
import json
import os
import re

from . import phases
from .framing import AgentFailure, bad_request, show
from .layout import MAX_INDEX


def is_inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_inside(root, rel):
    """Join a request path onto `root` (a realpath), refusing anything that could leave it."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise bad_request("path must be a non-empty string (got %s)" % show(rel))
    if os.path.isabs(rel):
        raise bad_request("path %r is absolute; paths are relative to the release" % rel)
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad_request("path %r has an empty, '.' or '..' component" % rel)
    target = os.path.join(root, *parts)
    if not is_inside(os.path.realpath(target), root) or os.path.realpath(target) == root:
        raise bad_request("path %r resolves outside %s" % (rel, root))
    return target


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the data was synced already
        pass
    finally:
        os.close(fd)


def temp_name(path):
    head, name = os.path.split(path)
    return os.path.join(head, ".%s.tmp-%d" % (name, os.getpid()))


def write_atomic(path, chunks, mode=0o644, check=None, phase=None):
    """Write an iterable of byte chunks to `path` via temp file + fsync + rename.

    `check(size, sha256_hex)` runs before the rename and may raise to abandon the file. The temp file
    never survives an error. `phase`: the test hook's name for the moment before the rename. Returns
    (size, sha256 hex).
    """
    tmp = temp_name(path)
    digest, size = hashlib.sha256(), 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if check is not None:
            check(size, digest.hexdigest())
        os.chmod(tmp, mode)
        if phase is not None:
            phases.reached(phase, 0)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return size, digest.hexdigest()


def read_file_limited(path, limit, what):
    size = os.path.getsize(path)
    if size > limit:
        raise bad_request("%s is %d bytes, over the limit of %d" % (what, size, limit))
    with open(path, "rb") as handle:
        return handle.read()


def io_failure(exc, rel):
    return AgentFailure("io", "%s: %s" % (rel, exc.strerror or exc))


def log_slug(key):
    return re.sub(r"[^A-Za-z0-9._=-]", "_", key)[:200]


def tail_text(text, limit):
    if len(text) <= limit:
        return text
    return "[... %d characters cut ...]\n" % (len(text) - limit) + text[-limit:]


def read_json_file(path, limit=MAX_INDEX):
    """A JSON object the agent wrote earlier, or None if it is missing, too big or not an object."""
    try:
        value = json.loads(read_file_limited(path, limit, path).decode("utf-8"))
    except (OSError, ValueError, AgentFailure):
        return None
    return value if isinstance(value, dict) else None
