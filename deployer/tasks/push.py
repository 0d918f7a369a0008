"""One device's push (connect, state, upload, compile, pull, smoke, commit, store) and the fleet.

Every push is incremental (docs/design.md section 11): one `state` round trip tells what the device's
current release holds, and only what differs travels, builds, is pulled and is smoke-tested. A push that
changes nothing makes no release at all.

`run_device` never raises a `DeviceError`: it returns a failed `DeviceOutcome` naming the stage and the
reason, so one device never stops the others. `run_fleet` fans devices out over a bounded thread pool.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deployer import phases
from deployer.cache.binaries import BinaryStore
from deployer.cache.mace import DEFAULT_MACE_VERSION, mace_warnings, parse_cache
from deployer.cache.store import CACHE_FILE, device_dir, store_device, store_failure
from deployer.config.inventory import Device
from deployer.config.kernels import Library
from deployer.connect.deadline import current_deadline
from deployer.errors import AgentError, DeviceError, LocalStateError
from deployer.protocol import ops
from deployer.protocol.fingerprint import parse_fingerprint
from deployer.protocol.session import AgentSession
from deployer.protocol.spool import Spool
from deployer.tasks import runner
from deployer.tasks.bench import BenchItem, BenchPlan
from deployer.tasks.fleet import fail_limit
from deployer.tasks.models import ModelPlan, ModelResult
from deployer.tasks.noop import arm_stage, noop_allowed, noop_offer
from deployer.tasks.plan import (
    DevicePlan,
    FileContents,
    LocalFile,
    RemoteState,
    build_key,
    parse_state,
    plan_device,
    program_specs,
    read_current,
)
from deployer.tasks.progress import Progress
from deployer.tasks.runner import INTERNAL, NOT_STARTED, Connect, DeviceWork, FleetOutcome, OnFailure, Outcome, Work
from deployer.tasks.share import BuildShare, DeviceShare
from deployer.tasks.smoke import KernelResult, Smoke, Startup
from deployer.tasks.verify import bench_stage, smoke_stage

STAGES = ("connect", "state", "fingerprint", "upload", "compile", "pull", "smoke", "commit", "store")
MAX_PULL = 256 << 20
CHECKED_REFERENCES = ".smoke-checked.json"  # digests of the references that ran without error (tasks/smoke.py)
MAX_MANIFEST = 16 << 20  # the agent's own limit on a manifest it reads back (remote/layout.py MAX_INDEX)


@dataclass(frozen=True, slots=True)
class BenchJob:
    """A bench step's plan and its repeat settings (the agent's `bench` request fields)."""

    plan: BenchPlan
    settings: Mapping[str, int]  # warmup, min_repeats, max_repeats, min_time_ms, pause_ms, item_timeout_ms
    timeout_s: float  # the whole bench on one device


@dataclass(frozen=True, slots=True)
class PushJob:
    """What every device of one `deploy push` gets; built once, shared read-only by the workers."""

    library: Library
    smoke: Smoke
    files: tuple[LocalFile, ...]  # what the release holds, hashed once; bytes read when a device needs them
    cache: Path
    mace_version: str = ""  # "": each device's vars.mace_version, else DEFAULT_MACE_VERSION
    keep: int = 3
    accept_new_host_keys: bool = False
    mace_format: str = "pb"  # "legacy" for apps on MACE v1.0.x
    models: tuple[ModelPlan, ...] = ()  # models of the deployer's format: their forward pass is smoked too
    max_fail_percentage: float | None = None  # past it, devices not yet started are not started
    smoke_mode: str = "changed"  # changed: only programs whose binary (or the device's fingerprint) changed
    check: bool = False  # plan only: say what would travel and be rebuilt, touch nothing
    smoke_only: bool = False  # a nightly smoke step: the board's current binaries, every case; no upload, no build
    bench: BenchJob | None = None  # with smoke_only: time the current binaries instead of smoking them
    mace_app: bool = False  # the library is a MACE app's programs (--mace-programs): smoke = a load from the binary
    contents: FileContents = field(default_factory=FileContents, compare=False)
    share: BuildShare | None = field(default=None, compare=False)  # run_fleet's, when a device shares builds

    @property
    def shas(self) -> dict[str, str]:
        return {f.remote: f.sha256 for f in self.files}


def prepare_push(kernels: Path, models: Sequence[Path], cache: Path, *, check: bool = False,
                 mace_programs: tuple[Path, Path] | None = None, **settings: Any) -> PushJob:
    """Everything a push needs from local files, read and checked once (an InputError before any device):
    the kernel library, its smoke cases (the user's numpy references run here), the models, the hashes.
    `mace_programs` (SRC, DIR): a MACE app's programs instead of the library in `kernels` (no smoke cases:
    each is smoked by a load from its binary); SRC's MACE version unless `mace_version` is set.
    `settings`: the rest of PushJob's fields."""
    from deployer.config.kernels import load_library
    from deployer.config.mace_programs import load_mace_programs
    from deployer.config.models import load_models
    from deployer.tasks.models import plan_model
    from deployer.tasks.plan import HASH_INDEX, HashIndex, local_files
    from deployer.tasks.smoke import CheckedReferences, prepare_smoke

    if mace_programs is not None:
        app = load_mace_programs(*mace_programs)
        library = app.library
        settings["mace_version"] = settings.get("mace_version") or app.mace_version or ""
        settings["mace_app"] = True
    else:
        library = load_library(kernels)
    model_files, loaded = load_models(list(models))  # a model of our format: its graph and weights travel
    index = HashIndex(None if check else cache / HASH_INDEX)
    checked = None if check else CheckedReferences(cache / CHECKED_REFERENCES, library.folder, index.sha256)
    smoke = prepare_smoke(library, checked)  # runs the user's references unless these ran before: input errors first
    files = local_files(release_paths(library, model_files), index, checked.hashed if checked else None)
    return PushJob(library=library, smoke=smoke, files=files, cache=cache, check=check,
                   models=tuple(plan_model(m, library) for m in loaded), **settings)


def release_paths(library: Library, models: Sequence[Path]) -> list[tuple[str, Path]]:
    """(path in the release, local path) of everything that travels; kernels first."""
    paths = [(f"kernels/{name}", library.folder / name) for name in library.files()]
    return paths + [(f"models/{model.name}", model) for model in models]


@dataclass(slots=True)
class DeviceOutcome(Outcome):
    """One device's push: the runner's fields, and what the push found and did there."""

    fingerprint: dict[str, Any] | None = None
    cache_file: str | None = None
    kernels: list[KernelResult] = field(default_factory=list)
    models: list[ModelResult] = field(default_factory=list)
    startup: Startup | None = None
    release: str | None = None
    plan: DevicePlan | None = None
    changed: bool = False  # a new release was committed
    pulled: bool = False  # the cache file was pulled (it differed from the local copy)
    bench: list[BenchItem] = field(default_factory=list)  # a bench step's timings
    create_ms: dict[str, float] = field(default_factory=dict)  # a bench step's program creation, by key
    warnings: list[str] = field(default_factory=list)  # why MACE will not use this device's cache file
    origin: dict[str, str] = field(default_factory=dict)  # program key -> where its binary came from (json.md)
    shell_noop: bool = False  # the board's shell answered that nothing changed: no agent started there

    @property
    def built(self) -> int:
        return len({k.program_key for k in self.kernels if k.built})

    def describe(self, stage: str, reason: str) -> str:
        """`<stage>: <reason>` for a stage of the push; a device not started or hit by a bug says only why."""
        return reason if stage in (NOT_STARTED, INTERNAL) else f"{stage}: {reason}"

    def to_json(self) -> dict[str, Any]:
        return {
            **self.base_json(), "fingerprint": self.fingerprint, "cache_file": self.cache_file,
            "kernels": [k.to_json() for k in self.kernels], "models": [m.to_json() for m in self.models],
            "startup": self.startup.to_json() if self.startup else None, "release": self.release,
            "plan": self.plan.to_json() if self.plan else None, "changed": self.changed, "pulled": self.pulled,
            "warnings": self.warnings, "origin": self.origin, "shell_noop": self.shell_noop,
        }


FleetResult = FleetOutcome[DeviceOutcome]


def new_release_id() -> str:
    """Sortable by time, unique across controllers."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


# ----- the values the stages hand each other -----


@dataclass(frozen=True, slots=True)
class Planned:
    """What `state` (and `fingerprint`, when the driver stamp changed) settled for this device."""

    state: RemoteState
    plan: DevicePlan
    fingerprint: dict[str, Any]
    mace_version: str
    skipped: Mapping[str, str]  # program key -> why this device skips it (unmet `requires`)
    build_keys: Mapping[str, str]  # program key -> build key, for the programs this device builds

    def at(self, current: str) -> Planned:
        """This plan for a board whose current release is `current` (a no-op offer's is settled before the
        board answers): only the release id changes, no build key is hashed again."""
        release = read_current(current)
        return replace(self, state=replace(self.state, current=release), plan=replace(self.plan, current=release))


@dataclass(frozen=True, slots=True)
class Built:
    """The device's cache file after `compile` (or the current one, for a push that builds nothing)."""

    cache_sha256: str
    programs: Mapping[str, str]  # key -> binary sha256, as the device reports
    manifest_file: str = "build/manifest.json"


@dataclass(frozen=True, slots=True)
class Pulled:
    """The cache file as the controller holds it: its bytes, the manifest (None: the local copy was current)
    and the sha256 of each program's binary in it (the device checks each before any driver sees it)."""

    cache_bytes: bytes
    manifest: dict[str, Any] | None
    binary_shas: Mapping[str, str]

    def expected(self, keys: set[str]) -> dict[str, str]:
        return {key: self.binary_shas[key] for key in sorted(keys)}


@dataclass(slots=True)
class PushContext:
    """The explicit context every stage of one device's push gets: the job, the runner's `DeviceWork` (the
    device, its outcome, the session, stage timing) and the build logs kept for the local cache."""

    job: PushJob
    work: DeviceWork[DeviceOutcome]
    logs: dict[str, str] = field(default_factory=dict)
    shared: DeviceShare | None = None  # this device's part in build sharing, from its compile on

    @property
    def device(self) -> Device:
        return self.work.device

    @property
    def outcome(self) -> DeviceOutcome:
        return self.work.outcome

    def mace_version(self) -> str:
        """The flag wins, then the device's `vars.mace_version`, then the default."""
        return self.job.mace_version or str(self.device.vars.get("mace_version") or DEFAULT_MACE_VERSION)


# ----- the stages -----


def push_stages(context: PushContext) -> None:
    """One device's push, stage by stage; an error raised in a stage is that device's failure there."""
    job, work, outcome = context.job, context.work, context.outcome
    offer = noop_offer(context, settle) if not work.opened else None
    session = work.session(offer.token if offer else None)
    if offer is not None and session.shell_noop is not None:  # the board's shell: nothing changed
        planned = shown(context, offer.planned.at(session.shell_noop))
        outcome.shell_noop = True
    else:
        planned = plan_stage(context, session)
    if job.check:
        return
    if job.smoke_only and planned.plan.new_release:
        raise NotDeployed(_why_not_deployed(planned.plan))
    phases.reached("plan")  # tests only: `state` answered and planned, nothing begun yet
    if planned.plan.new_release:
        with work.stage("upload"):
            upload_stage(context, session, planned.plan)
        with work.stage("compile"):
            built = compile_stage(context, session, planned)
    else:
        built = current_build(planned.state)
        outcome.origin = {k: "reused" for k in sorted(planned.build_keys)}
    with work.stage("pull"):
        pulled = pull_stage(context, session, planned, built)
    if job.bench is not None:
        with work.stage("bench"):
            bench_stage(context, session, planned, pulled, job.bench)
    else:
        with work.stage("smoke"):
            smoke_stage(context, session, planned, built, pulled)
    if planned.plan.new_release:
        with work.stage("commit"):
            session.request("commit", keep=job.keep)
        outcome.changed = True
    if pulled.manifest is not None:
        with work.stage("store"):
            store_stage(context, pulled.cache_bytes, pulled.manifest)
    outcome.cache_file = str(device_dir(job.cache, context.device.name) / CACHE_FILE)
    if noop_allowed(job) and not outcome.shell_noop:
        with work.stage("arm"):
            arm_stage(context, settle, session, planned, built)


def record_failure(context: PushContext, exc: DeviceError) -> None:
    """A failed device's local record (its stage, message and build logs), beside its last good cache."""
    if context.job.check:
        return
    try:
        store_failure(context.job.cache, context.device.name,
                      {"stage": exc.stage, "error": exc.message, "at": time.time()}, context.logs)
    except LocalStateError:
        pass  # the failure itself is reported; its local record is best effort


# ----- state: one round trip, then the plan -----


def plan_stage(context: PushContext, session: AgentSession) -> Planned:
    device, job = context.device, context.job
    with context.work.stage("state"):
        state = parse_state(session.request("state", opencl=device.opencl.as_request()))
    raw = state.fingerprint
    if raw is None:  # the driver stamp changed (or first push): ask the driver itself
        with context.work.stage("fingerprint"):
            fingerprint = ops.fingerprint(session, device.opencl.as_request(), remember=not job.check,
                                          timeout_s=device.timeouts.command)
    else:
        fingerprint = parse_fingerprint(raw)
    context.outcome.fingerprint = fingerprint
    return shown(context, settle(context, state, fingerprint))


def shown(context: PushContext, planned: Planned) -> Planned:
    """The device's outcome says what the plan found: fingerprint, MACE's warnings, the plan, the release."""
    outcome = context.outcome
    outcome.fingerprint, outcome.plan, outcome.release = planned.fingerprint, planned.plan, planned.state.current
    outcome.warnings = mace_warnings(planned.fingerprint, mace_format=context.job.mace_format,
                                     mace_version=planned.mace_version)
    return planned


def settle(context: PushContext, state: RemoteState, fingerprint: dict[str, Any]) -> Planned:
    """The plan for a device in this state with this fingerprint."""
    job = context.job
    mace_version = context.mace_version()
    skipped = job.library.skipped(fingerprint)
    build_keys = {
        spec["key"]: build_key(spec, job.shas, mace_version=mace_version, mace_format=job.mace_format,
                               fingerprint_id=str(fingerprint.get("id", "")))
        for spec in program_specs(job.library, skipped)}
    plan = plan_device(job.files, build_keys, state, mace_version=mace_version, mace_format=job.mace_format)
    return Planned(state, plan, fingerprint, mace_version, skipped, build_keys)


# ----- upload: only what the current release does not hold -----


def upload_stage(context: PushContext, session: AgentSession, plan: DevicePlan) -> None:
    """begin: a delta on the current release (its other files are hard-linked there), then put what
    the device says it lacks."""
    job = context.job
    release = new_release_id()
    changed = [f.to_request() for f in job.files if f.remote in plan.upload]
    base: dict[str, Any] = {"base": plan.current, "drop": list(plan.removed)} if plan.current else {}
    need = ops.begin(session, release, changed, **base)
    context.outcome.release = release
    by_path = {f.remote: f for f in job.files}
    for path in need:
        file = by_path[path]
        session.request("put", job.contents.read(file), path=file.remote, size=file.size,
                        sha256=file.sha256, mode=file.mode)
        phases.reached("upload")  # tests only: after the first put (a no-op unless the variable is set)


# ----- compile: the programs whose build key changed -----


def compile_stage(context: PushContext, session: AgentSession, planned: Planned) -> Built:
    """Build the programs whose build key changed; the others' binaries come from the current release."""
    device, job, plan = context.device, context.job, planned.plan
    specs = program_specs(job.library, planned.skipped, planned.build_keys)
    rebuild = [s for s in specs if s["key"] in plan.rebuild]
    keep: dict[str, Any] = {"keep": list(plan.reuse), "base": plan.current} if plan.reuse and plan.current else {}
    request: dict[str, Any] = {"opencl": device.opencl.as_request(), "mace_version": planned.mace_version,
                               "mace_format": job.mace_format, "timeout_s": device.timeouts.command}
    given, payload = share_stage(context, planned, rebuild)
    try:
        reply = session.request("build", payload, programs=rebuild, **given, **keep, **request)
    except AgentError as exc:
        if exc.kind != "reuse_missing":
            raise
        # the device lost a binary: build all
        reply = session.request("build", payload, programs=specs, **given, **request)
    result = ops.parse_build(reply, [s["key"] for s in specs])
    context.outcome.origin = origins(context, planned, result.programs)
    context.logs.update((p.key, p.log) for p in result.programs)
    built = {p.key for p in result.programs if p.ok}
    context.outcome.kernels = [
        KernelResult(case, key, key in built, "skipped",
                     detail=planned.skipped.get(key) or (None if key in built else "build failed"))
        for case, key in job.smoke.outline
    ]
    result.raise_for_failed()
    return Built(result.cache_sha256, result.binaries, result.manifest_file)


def share_stage(context: PushContext, planned: Planned,
                rebuild: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], bytes]:
    """With `share_builds`: claim what this device must build, wait for what another device of its
    fingerprint builds (at most `timeouts.command`, never past the device's deadline), and return the build
    request's `given` field and its payload (docs/design.md section 11)."""
    share, device = context.job.share, context.device
    if share is None or not device.share_builds or not rebuild or context.job.check:
        return {}, b""
    deadline = current_deadline()
    limit = min(device.timeouts.command, deadline.remaining() if deadline is not None else device.timeouts.command)
    context.shared = DeviceShare.start(
        share, device.name, str(planned.fingerprint.get("id", "")),
        {str(s["key"]): str(s["build_key"]) for s in rebuild}, limit_s=limit,
        gone=lambda: deadline is not None and deadline.expired)
    given, payload = context.shared.request()
    return ({"given": given} if given else {}), payload


def origins(context: PushContext, planned: Planned, results: Sequence[ops.ProgramBuilt]) -> dict[str, str]:
    """Where each program's binary came from: compiled here, shared from a device, from the store, reused."""
    origin = {k: "reused" for k in planned.build_keys}
    for result in results:
        if not result.ok or result.key not in origin:
            continue
        if result.reused:
            origin[result.key] = "reused"
        elif context.shared is not None:
            origin[result.key] = context.shared.origin(result.key, result.given)
        else:
            origin[result.key] = "compiled"
    return {k: origin[k] for k in sorted(origin)}


def current_build(state: RemoteState) -> Built:
    """Nothing to build: the current release's cache file is what this push would produce."""
    assert state.cache_sha256 is not None
    return Built(state.cache_sha256, {k: p.sha256 for k, p in state.programs.items()})


# ----- pull: only a cache file that differs from the local copy -----


def pull_stage(context: PushContext, session: AgentSession, planned: Planned, built: Built) -> Pulled:
    job = context.job
    local = _local_cache(job.cache, context.device.name)
    manifest: dict[str, Any] | None = None
    if local is not None and hashlib.sha256(local).hexdigest() == built.cache_sha256:
        cache_bytes = local
    else:
        cache_bytes = _get(session, f"build/{CACHE_FILE}", built.cache_sha256)
        manifest = _parse_manifest(session.request("get", path=built.manifest_file, max_reply=MAX_MANIFEST).payload)
        context.outcome.pulled = True
    try:
        entries = parse_cache(cache_bytes, fmt=job.mace_format).programs
    except ValueError as exc:
        raise AgentError(f"the pulled cache file is not a valid MACE {job.mace_format} container: {exc}",
                         kind="bad_cache") from exc
    missing = sorted(k for k in planned.build_keys if k not in entries)
    if missing:
        raise AgentError(f"the pulled cache file lacks program(s) {missing}", kind="bad_cache")
    shas = {k: hashlib.sha256(entries[k]).hexdigest() for k in planned.build_keys}
    if context.shared is not None:  # what this device compiled, pulled and checked: for the others of its kind
        context.shared.publish({planned.build_keys[k]: (k, entries[k], shas[k])
                                for k, how in context.outcome.origin.items() if how.startswith("compiled")})
    return Pulled(cache_bytes, manifest, shas)


# ----- store: the pulled cache file into the local cache -----


def store_stage(context: PushContext, cache_bytes: bytes, manifest: dict[str, Any]) -> Path:
    try:
        return store_device(context.job.cache, context.device.name, cache_bytes, manifest,
                            context.outcome.fingerprint or {}, context.logs)
    except LocalStateError as exc:
        raise DeviceError(f"local cache: {exc}") from exc


class NotDeployed(DeviceError):
    """A smoke step found the board's current release is not the library's: nothing to smoke from."""


def _why_not_deployed(plan: DevicePlan) -> str:
    if plan.current is None:
        return "nothing deployed on this board yet (run a push step first)"
    parts = []
    if plan.upload:
        parts.append(f"{len(plan.upload)} file(s) differ")
    if plan.rebuild:
        parts.append(f"{len(plan.rebuild)} program(s) would be rebuilt (sources, options or driver changed)")
    return f"the board's release {plan.current} is not this library's: {'; '.join(parts) or 'it differs'} " \
           "(run a push step first)"


def _local_cache(cache: Path, device: str) -> bytes | None:
    try:
        return (device_dir(cache, device) / CACHE_FILE).read_bytes()
    except (OSError, LocalStateError):
        return None


def _get(session: AgentSession, path: str, sha256: str) -> bytes:
    """A file of the build, streamed to a temp file and read only once its size and hash match the build's
    report: a board sending other bytes, however many, costs a chunk of memory."""
    with tempfile.TemporaryFile() as out:
        spool = Spool(out)
        if ops.get(session, path, spool, MAX_PULL) != spool.size:
            raise AgentError(f"pulled {path}: size does not match what the agent announced", kind="bad_cache")
        if spool.sha256 != sha256:
            raise AgentError(f"pulled {path}: sha256 differs from the build's report (corrupted in transit?)",
                             kind="checksum")
        out.seek(0)
        return out.read()


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AgentError(f"the device's manifest is not JSON: {exc}", kind="bad_manifest") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("programs"), list):
        raise AgentError("the device's manifest lacks a programs list", kind="bad_manifest")
    return manifest


def _stages_of(job: PushJob) -> tuple[Work[DeviceOutcome], OnFailure[DeviceOutcome]]:
    """The runner's work and failure hook for one device's push, sharing that device's context."""
    held: list[PushContext] = []

    def work(device_work: DeviceWork[DeviceOutcome]) -> None:
        held.append(PushContext(job, device_work))
        try:
            push_stages(held[0])
        finally:
            if held[0].shared is not None:  # what it claimed and did not publish: its waiters build it
                held[0].shared.share.release(device_work.device.name)

    def on_failure(device_work: DeviceWork[DeviceOutcome], exc: DeviceError) -> None:
        record_failure(held[0] if held else PushContext(job, device_work), exc)

    return work, on_failure


def run_device(device: Device, job: PushJob, progress: Progress) -> DeviceOutcome:
    """One device's push by the runner: never raises for what the device did."""
    work, on_failure = _stages_of(job)
    return runner.run_device(device, DeviceOutcome(device.name), work, progress=progress,
                             connect=Connect(job.accept_new_host_keys, job.check), on_failure=on_failure)


def push_on(session: AgentSession, device: Device, job: PushJob) -> tuple[DeviceOutcome, DeviceError | None]:
    """The push on a session opened by the caller (a nightly run's steps share one): the outcome and the
    device's error, if any, for the caller to grade."""
    work, on_failure = _stages_of(job)
    return runner.run_on(session, device, DeviceOutcome(device.name), work, on_failure=on_failure)


def run_fleet(devices: Sequence[Device], job: PushJob, *, forks: int, progress: Progress) -> FleetResult:
    """Every device in parallel (at most `forks` at once), each within its `timeouts.device`; outcomes in
    inventory order. Past `max_fail_percentage`, the devices not yet started fail as `not_started`."""
    stop = None if job.max_fail_percentage is None else fail_limit(job.max_fail_percentage, len(devices))
    if job.share is None and not job.check and any(d.share_builds for d in devices):
        job = replace(job, share=BuildShare(BinaryStore(job.cache)))
    return runner.run_fleet(devices, DeviceOutcome, lambda d: run_device(d, job, progress), forks=forks,
                            progress=progress, label="device", stop=stop)
