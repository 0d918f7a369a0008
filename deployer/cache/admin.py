"""`deploy cache ls|show|verify|prune|export`: the local cache, read and tidied; no device is touched.

Layout: docs/design.md, section 6. Export gives an app exactly the file it expects, or one tarball per
device model (devices with the same fingerprint share it; identical files are stored once).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deployer.cache.mace import PLATFORM_INFO_KEY, encode_legacy, parse_cache
from deployer.cache.store import (
    CACHE_FILE,
    COLLECTED,
    CONTENT_FILE,
    MANIFEST_FILE,
    RECORD_FILE,
    SAFE_NAME,
    collected_entries,
    device_dir,
    fingerprint_history,
    inside,
    read_json,
    slug,
    write_atomic,
)
from deployer.errors import InputError, LocalStateError


def device_names(cache: Path) -> list[str]:
    if not cache.is_dir():
        return []
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and SAFE_NAME.match(p.name))


def _existing_device(cache: Path, name: str) -> Path:
    root = device_dir(cache, name)
    if not root.is_dir():
        known = ", ".join(device_names(cache)) or "none"
        raise InputError(None, "device", f"no device {name!r} in cache {cache} (devices: {known})")
    return root


def summary(cache: Path) -> list[dict[str, Any]]:
    """One row per device: fingerprint, programs, size and age of its pushed cache, collected files."""
    rows = []
    for name in device_names(cache):
        root = cache / name
        manifest = read_json(root / MANIFEST_FILE) or {}
        cache_file = root / CACHE_FILE
        history = fingerprint_history(root)
        rows.append({
            "name": name,
            "fingerprint_id": history[-1]["id"] if history else None,
            "fingerprints_seen": len(history),
            "programs": len(manifest.get("programs", [])) if isinstance(manifest, dict) else 0,
            "cache_bytes": cache_file.stat().st_size if cache_file.exists() else None,
            "age_s": round(time.time() - cache_file.stat().st_mtime, 1) if cache_file.exists() else None,
            "collected": len(collected_entries(root)),
        })
    return rows


def show(cache: Path, name: str) -> dict[str, Any]:
    root = _existing_device(cache, name)
    manifest = read_json(root / MANIFEST_FILE)
    return {"name": name, "fingerprint_history": fingerprint_history(root),
            "programs": manifest.get("programs", []) if isinstance(manifest, dict) else [],
            "collected": collected_entries(root)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify_pushed(root: Path) -> Iterator[str]:
    cache_file, manifest = root / CACHE_FILE, read_json(root / MANIFEST_FILE)
    if not cache_file.exists():
        return
    if not isinstance(manifest, dict):
        yield f"{root.name}: {MANIFEST_FILE} is missing or not JSON"
        return
    data = cache_file.read_bytes()
    if manifest.get("cache_sha256") != hashlib.sha256(data).hexdigest():
        yield f"{root.name}: {CACHE_FILE} does not match the sha256 in {MANIFEST_FILE}"
    try:
        programs = parse_cache(data).programs
    except ValueError as exc:
        yield f"{root.name}: {CACHE_FILE}: {exc}"
        return
    for program in manifest.get("programs", []):
        binary = programs.get(str(program.get("key")))
        if binary is None or hashlib.sha256(binary).hexdigest() != program.get("sha256"):
            yield f"{root.name}: program {program.get('key')!r} differs from the manifest"


def _verify_collected(root: Path) -> Iterator[str]:
    folder = root / COLLECTED
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        record, content = read_json(entry / RECORD_FILE), entry / CONTENT_FILE
        where = f"{root.name}: {COLLECTED}/{entry.name}"
        if not isinstance(record, dict) or not content.exists():
            yield f"{where}: record or content missing"
        elif record.get("sha256") != _sha256(content):
            yield f"{where}: content does not match its record's sha256"
        else:
            try:
                parse_cache(content.read_bytes())
            except ValueError as exc:
                yield f"{where}: {exc}"


def verify(cache: Path) -> list[str]:
    """Every problem found: hashes against manifests and records, and every file parsed as MACE's format."""
    problems: list[str] = []
    for name in device_names(cache):
        problems += list(_verify_pushed(cache / name)) + list(_verify_collected(cache / name))
    return problems


def prune(cache: Path, *, older_than_days: float | None, stale: bool) -> list[str]:
    """Remove collected entries older than N days, or (with `stale`) those MACE would not start warm with
    or whose driver changed since they were written. Returns what was removed."""
    removed = []
    now = time.time()
    for name in device_names(cache):
        folder = cache / name / COLLECTED
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            record = read_json(entry / RECORD_FILE)
            if not isinstance(record, dict):
                continue
            verdict = record.get("verdict") or {}
            old = older_than_days is not None and now - float(record.get("collected_at", now)) > older_than_days * 86400
            is_stale = stale and (verdict.get("mace") == "cold" or verdict.get("drift") is True)
            if old or is_stale:
                shutil.rmtree(entry)
                removed.append(f"{name}: {record.get('remote_path')}")
    return removed


def convert(data: bytes, fmt: str) -> bytes:
    """A cache file in the other container generation. pb -> legacy drops the entries MACE v1.0 does not
    know (device name, program hashes); legacy -> pb is refused: the hashes need the kernel sources."""
    cache = parse_cache(data)
    if cache.format == fmt:
        return data
    if fmt != "legacy":
        raise InputError(None, "--mace-format", "a legacy file cannot become pb here (program hashes need the "
                                                "sources): push again with --mace-format pb")
    pairs = sorted(cache.programs.items())
    if cache.platform_info is not None:
        pairs.append((PLATFORM_INFO_KEY, cache.platform_info.encode()))
    return encode_legacy(pairs)


def export_file(cache: Path, name: str, to: Path, fmt: str | None = None) -> Path:
    """The exact file an app reads (`mace_cl_compiled_program.bin`), at `to` or inside the folder `to`,
    converted to `fmt` ("pb" or "legacy") if asked."""
    source = _existing_device(cache, name) / CACHE_FILE
    if not source.exists():
        raise LocalStateError(f"device {name!r} has no pushed cache file in {cache}")
    target = to / CACHE_FILE if to.is_dir() else to
    data = source.read_bytes()
    write_atomic(target, convert(data, fmt) if fmt else data)
    return target


def export_tarballs(cache: Path, out: Path) -> list[dict[str, Any]]:
    """One tarball per fingerprint (device model + driver): each distinct cache file once, by content hash,
    and `devices.json` saying which device uses which file."""
    groups: dict[str, list[str]] = {}
    for name in device_names(cache):
        history = fingerprint_history(cache / name)
        if history and (cache / name / CACHE_FILE).exists():
            groups.setdefault(str(history[-1]["id"]), []).append(name)
    written = []
    for fingerprint_id, names in sorted(groups.items()):
        model = fingerprint_history(cache / names[0])[-1].get("fingerprint", {}).get("device", {}).get("name", "device")
        files: dict[str, bytes] = {}
        mapping = {}
        for name in names:
            data = (cache / name / CACHE_FILE).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            files.setdefault(digest, data)
            mapping[name] = f"{digest[:16]}/{CACHE_FILE}"
        target = inside(out, f"{slug(str(model), 60)}-{fingerprint_id}.tar.gz")
        write_atomic(target, _tarball(files, mapping))
        written.append({"tarball": str(target), "fingerprint_id": fingerprint_id, "devices": names,
                        "distinct_files": len(files)})
    return written


def _tarball(files: dict[str, bytes], mapping: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        entries = {f"{d[:16]}/{CACHE_FILE}": data for d, data in sorted(files.items())}
        entries["devices.json"] = json.dumps(mapping, indent=1, sort_keys=True).encode()
        for path, data in entries.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
