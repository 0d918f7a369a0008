"""Releases as deltas: the index, files linked from the base release, and programs reused from it."""

import hashlib
import os
import shutil
import stat

from .build import fit_logs
from .fields import req_field, req_int, req_str
from .framing import AgentFailure, bad_request
from .fs import is_inside, read_file_limited, read_json_file, resolve_inside
from .layout import CACHE_FILE, LOG_TAIL, MANIFEST_FILE, MAX_GET, RELEASE_INDEX, SHA256_RE
from .mace import decode_any

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Dict, Tuple  # noqa: F401


def release_index(release_dir):
    """{path: {size, sha256, mode}} of a committed release (empty for one without an index)."""
    index = read_json_file(os.path.join(release_dir, RELEASE_INDEX)) if release_dir else None
    files = index.get("files") if index else None
    if not isinstance(files, dict):
        return {}
    return {path: rec for path, rec in files.items()
            if isinstance(rec, dict) and isinstance(rec.get("size"), int)
            and SHA256_RE.fullmatch(str(rec.get("sha256")))}


def parse_file_list(req):
    """begin's optional `files`: every file the new release will hold, [{path, size, sha256, mode}]."""
    files = req_field(req, "files", None)
    if files is None:
        return None
    if not isinstance(files, list):
        raise bad_request("field 'files': expected a list")
    parsed = []
    for i, item in enumerate(files):
        if not isinstance(item, dict):
            raise bad_request("files[%d]: expected an object" % i)
        parsed.append({"path": req_str(item, "path"), "size": req_int(item, "size", lo=0),
                       "sha256": req_str(item, "sha256", pattern=SHA256_RE),
                       "mode": req_int(item, "mode", 0o644, lo=0, hi=0o777)})
    return parsed


def link_unchanged(files, base_dir, root, drop):
    """A release as a delta on `base_dir`: every file of the base except those in `drop` or `files` is
    hard-linked unchanged, and each file of `files` is linked too when the base holds its content at any
    path (a rename). Returns (paths the controller must still send, {path: record} linked). A failed
    link (another file system, a link limit) just means that file travels."""
    index = release_index(base_dir)
    by_content = {}  # type: Dict[Tuple[int, str], str]
    for path, rec in index.items():
        by_content.setdefault((rec["sha256"], rec["size"]), path)
    listed = set(item["path"] for item in files)
    wanted = [dict(rec, path=path) for path, rec in sorted(index.items()) if path not in listed and path not in drop]
    need, linked = [], {}
    for item in wanted + files:
        source = by_content.get((item["sha256"], item["size"])) if item["path"] in listed else item["path"]
        if source is not None and _link_from(base_dir, source, root, item):
            linked[item["path"]] = {"size": item["size"], "sha256": item["sha256"], "mode": item.get("mode", 0o644)}
        else:
            need.append(item["path"])
    return need, linked


def _link_from(base_dir, source, root, item):
    target = prepare_target(root, item["path"])
    try:
        source_path = resolve_inside(base_dir, source)
        st = os.lstat(source_path)
        if st.st_size != item["size"] or not stat.S_ISREG(st.st_mode):
            return False
        os.link(source_path, target)
        return True
    except (OSError, AgentFailure):
        return False


def prepare_target(root, rel):
    """The path of a new file in the release, its folders created and re-checked to be inside it."""
    target = resolve_inside(root, rel)
    os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
    if not is_inside(os.path.realpath(os.path.dirname(target)), root):  # checked again once created
        raise bad_request("path %r resolves outside the release" % rel)
    return target


def reusable_programs(base_dir, manifest, keep):
    """{key: (manifest entry, binary, log text)} for the `keep` programs of the base release, each binary
    checked against the base's manifest (a damaged one is left out, and so is built again)."""
    programs = manifest.get("programs") if isinstance(manifest.get("programs"), list) else []
    old = {p.get("key"): p for p in programs if isinstance(p, dict)}
    wanted = dict((key, old[key]) for key in keep if key in old)
    if not wanted:
        return {}
    try:
        _, pairs = decode_any(read_file_limited(os.path.join(base_dir, CACHE_FILE), MAX_GET, CACHE_FILE))
    except (OSError, ValueError, AgentFailure):
        return {}
    binaries = {}  # type: Dict[str, bytes]
    for key, value in pairs:
        binaries.setdefault(key, value)  # MACE: the first pair of a key wins
    reuse = {}
    for key, record in wanted.items():
        binary = binaries.get(key)
        if binary is None or hashlib.sha256(binary).hexdigest() != record.get("sha256"):
            continue  # the old cache file does not hold what its manifest says: build it again
        log_file = record.get("log_file")
        log = b""
        if isinstance(log_file, str) and log_file.startswith("build/logs/"):
            try:
                log = read_file_limited(resolve_inside(base_dir, log_file), LOG_TAIL * 64, log_file)
            except (OSError, AgentFailure):
                log = b""
        reuse[key] = (record, binary, log.decode("utf-8", "replace"))
    return reuse


def link_build(previous_dir, root, manifest, reuse):
    """Every program is reused and nothing else changed: the current release's cache file is exactly
    what a build would write, so its build folder is hard-linked (copied where links fail) into the new
    release, and no driver runs at all."""
    source = os.path.join(previous_dir, "build")
    for dirpath, _, names in os.walk(source):
        target_dir = os.path.join(root, "build", os.path.relpath(dirpath, source))
        os.makedirs(target_dir, 0o755, exist_ok=True)
        for name in names:
            try:
                os.link(os.path.join(dirpath, name), os.path.join(target_dir, name))
            except OSError:
                shutil.copy2(os.path.join(dirpath, name), os.path.join(target_dir, name))
    records = [{"key": p["key"], "ok": True, "build_ms": 0.0, "binary_size": p.get("binary_size"),
                "sha256": p.get("sha256"), "log": reuse[p["key"]][2], "reused": True}
               for p in manifest["programs"]]
    reply = {"programs": records, "cache_file": CACHE_FILE, "manifest_file": MANIFEST_FILE,
             "cache_sha256": manifest.get("cache_sha256"), "cache_size": manifest.get("cache_size")}
    return fit_logs(reply, [dict(r) for r in records]), b""
