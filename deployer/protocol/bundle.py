"""The agent as shipped: the bundle of `deployer.remote`, its identity, and the commands that run it.

One upload per agent version: the board keeps each bundle in RD/agent/<id12>/ and runs it by import
(docs/design.md, section 1). The identity is `deployer.remote.bundle.bundle_id` over the sorted (path,
bytes) of the package's modules, so two controllers with the same code agree on it.
"""

from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from deployer import remote
from deployer.config.inventory import Device
from deployer.remote.boot import BOOTSTRAP, LAUNCH
from deployer.remote.bundle import PACKAGE, bundle_files, bundle_id
from deployer.remote.layout import AGENT_DIR, NOOP_ANSWER, NOOP_LINE, NOOP_PROBE, READONLY_ENV

NO_REMOTE_DIR = 73  # the bootstrap's exit status when it cannot create the remote dir (EX_CANTCREAT)
NEED_AGENT = 75  # the run command's exit status when this agent is not on the device yet (EX_TEMPFAIL)

# The board modules a compiled binary and the cache file depend on: the build op, the OpenCL binding and the
# container writer. A program's build key hashes these, not the whole bundle, so a change to another part of
# the agent (collect, the session, smoke) rebuilds nothing on any board.
BUILD_MODULES = ("build.py", "opencl.py", "mace.py")


@dataclass(frozen=True, slots=True)
class Bundle:
    files: tuple[tuple[str, bytes], ...]  # (path on the board, bytes), sorted by path
    id: str  # sha256 hex over the sorted (path, size, bytes)
    build_id: str  # the same over BUILD_MODULES only

    @property
    def id12(self) -> str:
        return self.id[:12]

    def message(self) -> tuple[dict[str, object], bytes]:
        """The `agent` message the bootstrap reads: the index (path, size) and the bytes in that order."""
        index = [[path, len(data)] for path, data in self.files]
        header: dict[str, object] = {"op": "agent", "sha256": self.id, "files": index}
        return header, b"".join(data for _, data in self.files)


def build_bundle(folder: Path) -> Bundle:
    files = tuple(bundle_files(str(folder)))
    if not files or any(path.count("/") != 1 for path, _ in files):
        raise RuntimeError(f"{folder}: the agent bundle is flat modules only")
    wanted = {f"{PACKAGE}/{name}" for name in BUILD_MODULES}
    return Bundle(files, bundle_id(files), bundle_id(f for f in files if f[0] in wanted))


_BUNDLE_LOCK = threading.Lock()


def agent_bundle() -> Bundle:
    """This controller's agent, read once per process (under a lock: the devices' threads ask at once, and each
    would read and hash the package again)."""
    with _BUNDLE_LOCK:
        return _read_bundle()


@cache
def _read_bundle() -> Bundle:
    return build_bundle(Path(remote.__file__).parent)


def remote_path(path: str) -> str:
    """A shell word for a remote path; `~/x` becomes "$HOME"/x so the device's shell expands it."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _runner(device: Device, check: bool) -> tuple[str, str, str]:
    """(remote dir as a shell word, the bundle's id12, `exec [env K=1] PYTHON`). The inventory's `env:`
    is not here: it may hold secrets, and a command line is readable by every user of the board (it goes
    in the session's first request, `env`)."""
    run = f"exec {f'env {READONLY_ENV}=1 ' if check else ''}{shlex.quote(device.python)}"
    return remote_path(device.remote_dir), agent_bundle().id12, run


def run_command(device: Device, *, check: bool = False, noop_token: str | None = None) -> str:
    """A session's remote command: run the stored bundle, or exit NEED_AGENT when it is not there yet.
    Short on purpose (it travels with every push); the bootstrap comes only when needed. `noop_token`: the
    shell's no-op first (docs/design.md section 11): when RD/noop holds this token, `current`'s target and
    the probe's checksum as it is now, the shell prints RD/noop.json and no Python starts."""
    root, id12, run = _runner(device, check)
    where = f"{root}/{AGENT_DIR}/{id12}"
    first = ""
    if noop_token is not None:
        assert all(c in "0123456789abcdef" for c in noop_token)  # it goes on a command line as is
        first = (f'[ -f {root}/{NOOP_LINE} ] && [ "$(cat {root}/{NOOP_LINE})" = "{noop_token} '
                 f'$(readlink {root}/current) $(sh {root}/{NOOP_PROBE} 2>&1 | cksum)" ] && '
                 f"exec cat {root}/{NOOP_ANSWER}; ")
    return (f'{first}[ -d {where}/{PACKAGE} ] || exit {NEED_AGENT}; '
            f"{run} -c {shlex.quote(LAUNCH)} {where} {PACKAGE}.main serve {root}")


def bootstrap_command(device: Device, *, check: bool = False) -> str:
    """The second remote command, only on a device without this bundle: the bootstrap receives it, unpacks it
    and runs it. `check`: a read-only session (push --check): nothing is created in the remote dir, and the
    bundle runs from a temp folder that it removes when it exits."""
    root, id12, run = _runner(device, check)
    return (("" if check else f"{{ mkdir -p {root}/{AGENT_DIR} || exit {NO_REMOTE_DIR}; }} && ")
            + f"{run} -c {shlex.quote(BOOTSTRAP)} {root} {id12}")
