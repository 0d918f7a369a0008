"""`deploy collect`: gather the cache files that apps wrote on the devices, and judge each one.

Per device: one session (the same agent and connection as a push), the device's current fingerprint,
then `find` (bounded glob on the device, hashes computed there), and `read` only for files whose hash
is not already in the local cache. Everything the device sends is untrusted: paths are checked, sizes
capped, names never used as local paths, and a file is parsed as a MACE container in pure Python (never
handed to an OpenCL driver) before it is kept. A file that is not a MACE container stays out of the cache.
"""

from __future__ import annotations

import hashlib
import posixpath
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.cache.mace import (
    DEFAULT_MACE_VERSION,
    MaceCache,
    binary_kind,
    mace_verdict,
    mace_warnings,
    parse_cache,
)
from deployer.cache.store import (
    CACHE_FILE,
    COLLECTED,
    CONTENT_FILE,
    RECORD_FILE,
    AtomicFile,
    collected_entries,
    device_dir,
    fingerprint_history,
    inside,
    record_fingerprint,
    slug,
    write_json,
)
from deployer.config.inventory import Device
from deployer.errors import AgentError, LocalStateError
from deployer.protocol import ops
from deployer.protocol.session import AgentSession
from deployer.protocol.spool import Spool
from deployer.tasks import runner
from deployer.tasks.progress import Progress
from deployer.tasks.runner import Connect, DeviceWork, FleetOutcome, Outcome
from deployer.text import one_line, visible

CACHE_NAMES = ("mace_cl_compiled_program.bin", "mace_run.config")
# MACE's usual work dirs (format note, section 6) and anywhere under the login home.
DEFAULT_DIRS = ("~", "/data/local/tmp/mace_run", "/tmp/data/mace_run", "/tmp/mace_run")
MAX_SIZE = 256 << 20
MAX_FILES = 1000


def default_patterns() -> list[str]:
    return [f"{d}/**/{name}" for d in DEFAULT_DIRS for name in CACHE_NAMES]


@dataclass(frozen=True, slots=True)
class CollectJob:
    cache: Path
    patterns: tuple[str, ...] = ()  # empty: each device's vars.collect_paths, else default_patterns()
    max_size: int = MAX_SIZE
    max_files: int = MAX_FILES
    accept_new_host_keys: bool = False


@dataclass(slots=True)
class FileOutcome:
    remote_path: str
    status: str  # "new" | "updated" | "unchanged" | "refused" | "failed"
    detail: str | None = None
    record: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("new", "updated", "unchanged")

    def to_json(self) -> dict[str, Any]:
        return {"remote_path": self.remote_path, "status": self.status, "ok": self.ok, "detail": self.detail,
                "record": self.record}


@dataclass(slots=True)
class CollectOutcome(Outcome):
    fingerprint: dict[str, Any] | None = None
    files: list[FileOutcome] = field(default_factory=list)
    truncated: bool = False

    def passed(self) -> bool:
        return all(f.ok for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {**self.base_json(), "fingerprint": self.fingerprint, "truncated": self.truncated,
                "files": [f.to_json() for f in self.files]}


def _patterns(device: Device, job: CollectJob) -> list[str]:
    configured = device.vars.get("collect_paths")
    if job.patterns:
        chosen = list(job.patterns)
    elif isinstance(configured, list) and all(isinstance(p, str) for p in configured):
        chosen = list(configured)
    else:
        chosen = default_patterns()
    # Normalised here, so that a `..` in what the device reports back can only be hostile.
    return [p if p.startswith("~") else posixpath.normpath(p) for p in chosen]


def local_folder(remote_path: str) -> str:
    """A folder name for a remote path: readable slug plus a hash, so two odd names never collide."""
    digest = hashlib.sha256(remote_path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{slug(remote_path.strip('/'), 120)}-{digest}"


def describe_file(data: bytes, remote_path: str, fingerprint: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a collected file holds, and MACE's verdict; ValueError if it is not a MACE container."""
    cache = parse_cache(data)
    kind = "tuned_parameters" if posixpath.basename(remote_path) == "mace_run.config" else "compiled_programs"
    record: dict[str, Any] = {
        "format": cache.format, "kind": kind, "platform_info": cache.platform_info,
        "device_name": cache.device_name,
        "programs": [{"key": key, "size": len(binary), "binary_kind": binary_kind(binary)}
                     for key, binary in sorted(cache.programs.items())],
    }
    if kind == "compiled_programs" and fingerprint:
        record.update(_judged(cache, fingerprint))
    return record


def _judged(cache: MaceCache, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """MACE's verdict on a file an app wrote, and why MACE will not use any such file on this device."""
    app_version = cache.platform_info.rsplit(", ", 1)[-1] if cache.platform_info else DEFAULT_MACE_VERSION
    return {"verdict": mace_verdict(cache, fingerprint).to_json(),
            "warnings": mace_warnings(fingerprint, mace_format=cache.format, mace_version=app_version)}


def _fingerprint(session: AgentSession, device: Device) -> dict[str, Any]:
    """The device's current fingerprint, reduced to what records keep."""
    fingerprint = ops.fingerprint(session, device.opencl.as_request())
    return {k: fingerprint.get(k) for k in ("id", "platform", "device", "cpu_only")}


@dataclass(slots=True)
class CollectContext:
    """The explicit context of one device's collect: the job, the runner's `DeviceWork`, the device's folder."""

    job: CollectJob
    work: DeviceWork[CollectOutcome]
    root: Path

    @property
    def outcome(self) -> CollectOutcome:
        return self.work.outcome


def collect_stages(work: DeviceWork[CollectOutcome], job: CollectJob) -> None:
    """fingerprint, find, then read each new or changed file; the controller's own disk failing is a local
    cache error of this device."""
    try:
        _collect(CollectContext(job, work, device_dir(job.cache, work.device.name)), work.session())
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise LocalStateError(str(exc)) from exc


def _collect(context: CollectContext, session: AgentSession) -> None:
    work, outcome, job = context.work, context.outcome, context.job
    with work.stage("fingerprint"):
        try:
            outcome.fingerprint = _fingerprint(session, work.device)
        except AgentError:
            outcome.fingerprint = None  # a device without OpenCL can still be collected from
    with work.stage("find"):
        listing = ops.find(session, _patterns(work.device, job), job.max_files, job.max_size)
    outcome.truncated = listing.truncated
    known = {r.get("remote_path"): r for r in collected_entries(context.root)}
    for entry in listing.entries:
        if isinstance(entry, ops.Refused):
            outcome.files.append(FileOutcome(entry.path, "refused", entry.why))
        else:
            outcome.files.append(_one(context, session, entry, known.get(entry.path)))
    record_fingerprint(context.root, outcome.fingerprint)


def _one(context: CollectContext, session: AgentSession, found: ops.Found,
         previous: Mapping[str, Any] | None) -> FileOutcome:
    shown = one_line(found.path, 300)
    if previous is not None and previous.get("sha256") == found.sha256:
        return FileOutcome(shown, "unchanged", record=_store(context, previous, stored=False))
    folder = inside(context.root, f"{COLLECTED}/{local_folder(found.path)}")
    with context.work.stage("read", f"read {shown}"), AtomicFile(folder / CONTENT_FILE) as content:
        spool = Spool(content)  # streamed to disk; renamed into place only once checked
        try:
            ops.read(session, found, spool)
        except AgentError as exc:
            return FileOutcome(shown, "failed", exc.reason)
        if not spool.matches(found.size, found.sha256):
            return FileOutcome(shown, "failed", "pulled bytes differ from what the device announced")
        try:
            described = describe_file(content.read_back(), found.path, context.outcome.fingerprint)
        except ValueError as exc:
            return FileOutcome(shown, "failed", f"kept out of the cache: {exc}")
        content.commit()
    record = {"device": context.work.device.name, "remote_path": found.path, "size": found.size,
              "sha256": found.sha256, "mtime": found.mtime, "collected_at": time.time(),
              "file": posixpath.basename(found.path), **described}
    return FileOutcome(shown, "updated" if previous else "new", record=_store(context, record, stored=True))


def _store(context: CollectContext, record: Mapping[str, Any], *, stored: bool) -> dict[str, Any]:
    """The record that names the content (`stored`: just written); a previous record only gets a new
    verdict."""
    fingerprint = context.outcome.fingerprint
    folder = inside(context.root, f"{COLLECTED}/{local_folder(str(record['remote_path']))}")
    updated = dict(record, fingerprint=fingerprint)
    if not stored and fingerprint and updated.get("kind") == "compiled_programs":
        content = (folder / CONTENT_FILE).read_bytes()
        updated.update(_judged(parse_cache(content), fingerprint))
    write_json(inside(folder, RECORD_FILE), updated)
    return updated


def collect_on(session: AgentSession, device: Device, job: CollectJob) -> CollectOutcome:
    """Collect on a session opened by the caller (a nightly run's steps share one); a device error
    (connection, timeout) is raised for the caller to grade, a local cache error is in the outcome."""
    outcome, exc = runner.run_on(session, device, CollectOutcome(device.name),
                                 lambda work: collect_stages(work, job))
    if exc is not None:
        raise exc
    return outcome


def collect_fleet(devices: Sequence[Device], job: CollectJob, *, forks: int,
                  progress: Progress) -> FleetOutcome[CollectOutcome]:
    return runner.run_fleet(
        devices, CollectOutcome,
        lambda d: runner.run_device(d, CollectOutcome(d.name), lambda work: collect_stages(work, job),
                                    progress=progress, connect=Connect(job.accept_new_host_keys)),
        forks=forks, progress=progress, label="collect")


@dataclass(slots=True)
class InstallOutcome(Outcome):
    status: str = "failed"  # "installed" | "skipped" | "failed"
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.base_json(), "status": self.status,
                "detail": self.detail if self.detail is not None else self.error}


def install_stages(work: DeviceWork[InstallOutcome], cache: Path, to: str) -> None:
    """Put the device's pushed cache file at `to` on it, only if its driver is still the one that built it."""
    device, outcome = work.device, work.outcome
    root = device_dir(cache, device.name)
    source, history = root / CACHE_FILE, fingerprint_history(root)
    if not source.exists() or not history:
        outcome.status, outcome.detail = "skipped", f"no pushed cache for this device in {cache}"
        return
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise LocalStateError(f"cannot read {source}: {exc.strerror or exc}") from exc
    session = work.session()
    with work.stage("fingerprint"):
        current = str(_fingerprint(session, device).get("id"))
    if current != history[-1].get("id"):
        built_for = history[-1].get("id")
        why = f"fingerprint changed (cache built for {built_for}, device now {visible(current, 40)})"
        outcome.status, outcome.detail = "skipped", why + ": push again first"
        return
    with work.stage("install"):
        ops.install(session, data, to, hashlib.sha256(data).hexdigest())
    outcome.status, outcome.detail = "installed", to


def install_fleet(devices: Sequence[Device], cache: Path, to: str, *, forks: int, progress: Progress,
                  accept_new_host_keys: bool = False) -> FleetOutcome[InstallOutcome]:
    return runner.run_fleet(
        devices, InstallOutcome,
        lambda d: runner.run_device(d, InstallOutcome(d.name), lambda work: install_stages(work, cache, to),
                                    progress=progress, connect=Connect(accept_new_host_keys)),
        forks=forks, progress=progress, label="install")
