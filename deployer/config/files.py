"""Reading the files a user names (the inventory, an ssh config, keys, known_hosts): regular files only, and
bounded, so that `/dev/zero`, a FIFO or a runaway file is a clear input error instead of unbounded memory."""

from __future__ import annotations

import os
import stat

from deployer.errors import InputError, Where

MAX_INVENTORY = 4 << 20  # an inventory, group_vars and the like: thousands of boards fit in far less
MAX_SSH_CONFIG = 1 << 20
MAX_NAMED_FILE = 16 << 20  # a file the inventory names (identity_file, known_hosts, ssh_config)


def unfit_file(file: str, limit: int) -> str | None:
    """Why `file` is not a readable regular file of at most `limit` bytes (None: it is, or it does not exist)."""
    try:
        info = os.stat(file)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a device, a pipe or a folder)"
    if info.st_size > limit:
        return f"{info.st_size} bytes, over the limit of {limit}"
    return None


def read_user_file(file: str, limit: int, what: str, error: type[InputError] = InputError) -> bytes | None:
    """The bytes of `file`, or None if it does not exist; anything unfit is `error` naming the file."""
    problem = unfit_file(file, limit)
    if problem is not None:
        raise error(Where(file), None, f"{what}: {problem}")
    try:
        with open(file, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(Where(file), None, f"cannot read this {what} ({exc.strerror or exc})") from exc
    if len(data) > limit:
        raise error(Where(file), None, f"this {what} grew past the limit of {limit} bytes while read")
    return data
