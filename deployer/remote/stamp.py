"""The driver stamp: what decides the fingerprint, read without loading the driver (design.md section 11)."""

import glob
import hashlib
import json
import os
import re

from .layout import AGENT_VERSION
from .selection import icd_files, icd_folder, icd_library

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import List  # noqa: F401

# The driver-related variables, spelled once: a name prefix, or a whole name when it ends in "=" (as `env`
# prints it, NAME=value). Plain identifier characters only: each is a regex in Python and in `grep -E` alike.
DRIVER_ENV = ("OCL_", "POCL_", "CUDA_", "OPENCL", "CL_", "GPU_", "HSA_", "ROC", "MALI", "ADRENO",
              "LD_LIBRARY_PATH=", "LD_PRELOAD=")
# For the stamp: matched (re.match) against a variable's name
DRIVER_ENV_RE = re.compile("(" + "|".join(p[:-1] + "$" if p.endswith("=") else p for p in DRIVER_ENV) + ")")
# For the shell's probe (remote/noop.py): the same variables as `env` prints them, and the agent's own
# choice of library
DRIVER_ENV_GREP = "^(" + "|".join(DRIVER_ENV + ("DEPLOYER_OPENCL_LIBRARY=",)) + ")"

LIBRARY_GLOBS = ("/usr/lib", "/usr/lib/*-linux-*", "/usr/lib64", "/lib", "/lib/*-linux-*", "/lib64",
                 "/usr/local/lib", "/vendor/lib64", "/vendor/lib", "/system/vendor/lib64", "/system/lib64")


def _stat_record(path):
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _find_library(name):
    """Where the dynamic loader would most likely find `name`: a path as is, else the usual folders."""
    return _search_trail(name)[-1]


def _search_trail(name):
    """The folders searched for `name` before it was found, then where it was found (`name` itself when it
    is a path or was found nowhere): a library that appears earlier in the search changes a folder's mtime."""
    if "/" in name:
        return [name]
    folders = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    for pattern in LIBRARY_GLOBS:
        folders += sorted(glob.glob(pattern))
    trail = []  # type: List[str]
    for folder in folders:
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return trail + [candidate]
        if os.path.isdir(folder):
            trail.append(folder)
    return [name]


def _library(selection):
    """The OpenCL library the selection names (inventory `opencl.library`), else the agent's default."""
    library = selection.get("library") if isinstance(selection, dict) else None
    return library or os.environ.get("DEPLOYER_OPENCL_LIBRARY") or "libOpenCL.so.1"


def driver_stamp(selection):
    """A hash of everything that decides the fingerprint without loading a driver: the kernel release,
    the driver-related environment, the ICD files and the files of the libraries they name, the loader,
    and the OpenCL selection. A driver upgrade changes a library's size, mtime or inode, so the stamp
    changes and the next push fingerprints again (child process, ~80 ms on PoCL); otherwise the cached
    fingerprint stands."""
    where, files = icd_files()
    icds = []
    for path in files:
        try:
            library = icd_library(path)
        except OSError:
            library = ""
        icds.append([_stat_record(path), library, _stat_record(_find_library(library)) if library else None])
    parts = {"uname": os.uname().release, "where": where, "icds": icds,
             "loader": _stat_record(_find_library(_library(selection))),
             "env": sorted((k, v) for k, v in os.environ.items() if DRIVER_ENV_RE.match(k)),
             "selection": selection, "agent": AGENT_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def probe_paths(selection):
    """What the shell's probe stats (remote/noop.py): the ICD folder (or file) and each ICD file, then for
    each library they name and for the loader, the folders searched before it and the library itself."""
    paths = [icd_folder()]
    _, files = icd_files()
    for path in files:
        paths.append(path)
        try:
            library = icd_library(path)
        except OSError:
            continue  # the stat of the ICD file itself sees it change
        if library:
            paths += _search_trail(library)
    paths += _search_trail(_library(selection))
    unique = []  # type: List[str]
    for path in paths:
        if path not in unique:
            unique.append(path)
    return unique
