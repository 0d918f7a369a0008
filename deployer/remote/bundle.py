"""The agent as a bundle: its files, its identity, and the pruning of old bundles on the board.

The controller ships this package as one bundle (`deployer.protocol.bundle`); on the board it is unpacked
into RD/agent/<id12>/deployer_remote/ and imported from there. Both sides name the files the same way
(`deployer_remote/<module>.py`) and hash them with `bundle_id`, so two controllers with the same code agree
on the identity whatever archive carried it, and the agent can say which bundle it runs.
"""

import hashlib
import os
import re
import shutil
import time

from .layout import AGENT_DIR, KEEP_BUNDLES

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Iterable, List, Optional, Tuple  # noqa: F401

PACKAGE = "deployer_remote"  # the package's name on the board
MODULE_RE = re.compile(r"[a-z_][a-z0-9_]*\.py\Z")
BUNDLE_RE = re.compile(r"[0-9a-f]{12}\Z")
LEGACY_RE = re.compile(r"agent_[0-9a-f]{12}\.py\Z")  # the one-file agent of earlier versions
STALE_TEMP_S = 600.0


def package_dir():
    # type: () -> str
    return os.path.dirname(os.path.abspath(__file__))


EPHEMERAL_PREFIX = "deployer-check-"  # a --check session's bundle: a temp folder the bootstrap made


def drop_ephemeral_bundle():
    # type: () -> None
    """Remove a --check session's temp bundle now (its modules are loaded, its OpenCL child has ended): at
    `bye`, before the answer, so the controller never returns while it is still there."""
    root = bundle_root()
    if os.path.basename(root).startswith(EPHEMERAL_PREFIX):
        shutil.rmtree(root, True)


def bundle_root():
    # type: () -> str
    """The folder that holds the top package (what LAUNCH puts on sys.path)."""
    root = package_dir()
    for _ in (__package__ or PACKAGE).split("."):
        root = os.path.dirname(root)
    return root


def bundle_files(folder=None):
    # type: (Optional[str]) -> List[Tuple[str, bytes]]
    """The package's modules as (bundle path, bytes), sorted by path."""
    folder = folder or package_dir()
    files = []
    for name in sorted(os.listdir(folder)):
        if MODULE_RE.match(name):
            with open(os.path.join(folder, name), "rb") as handle:
                files.append((PACKAGE + "/" + name, handle.read()))
    return files


def bundle_id(files):
    # type: (Iterable[Tuple[str, bytes]]) -> str
    """sha256 over the sorted (path, size, bytes): never over an archive's bytes."""
    digest = hashlib.sha256()
    for path, data in sorted(files):
        digest.update(("%s\0%d\0" % (path, len(data))).encode("utf-8"))
        digest.update(data)
    return digest.hexdigest()


def prune_bundles(rd, running, keep=KEEP_BUNDLES):
    # type: (str, str, int) -> None
    """Keep the running bundle and the newest others (a session of another controller version may be using
    one); delete older bundles, the one-file agents of earlier versions and a killed bootstrap's temp
    folders. Run at commit, as old releases are pruned."""
    base = os.path.join(rd, AGENT_DIR)
    try:
        names = os.listdir(base)
    except OSError:
        return
    candidates = []
    for name in names:
        path = os.path.join(base, name)
        try:
            mtime = os.lstat(path).st_mtime
        except OSError:
            continue
        if name.startswith(".tmp-") and time.time() - mtime > STALE_TEMP_S:
            shutil.rmtree(path, ignore_errors=True)
        elif (BUNDLE_RE.match(name) or LEGACY_RE.match(name)) and os.path.realpath(path) != running:
            candidates.append((mtime, name, path))
    candidates.sort(reverse=True)
    for _, name, path in candidates[keep - 1:]:
        if LEGACY_RE.match(name):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    if not any(LEGACY_RE.match(name) for _, name, _ in candidates[:keep - 1]):
        shutil.rmtree(os.path.join(base, "__pycache__"), ignore_errors=True)  # the one-file agents' bytecode
