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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deployer import phases
from deployer.cache.mace import DEFAULT_MACE_VERSION, mace_warnings, parse_cache
from deployer.cache.store import CACHE_FILE, device_dir, store_device, store_failure
from deployer.config.inventory import Device
from deployer.config.kernels import Library
from deployer.connect.deadline import INTERRUPTED
from deployer.errors import AgentError, DeviceError, LocalStateError, SmokeMismatch
from deployer.protocol.fingerprint import parse_fingerprint
from deployer.protocol.reply import Reply, printable, raise_for_failed_programs
from deployer.protocol.reply import field as reply_field
from deployer.protocol.session import AgentSession, open_session
from deployer.protocol.spool import Spool
from deployer.tasks.bench import BenchItem, BenchPlan, batches, parse_bench, parse_create_ms
from deployer.tasks.fleet import FleetInterrupted, fail_limit, fan_out
from deployer.tasks.models import ModelPlan, ModelResult, check_models, skipped_model, wire_models
from deployer.tasks.plan import DevicePlan, FileContents, LocalFile, RemoteState, build_key, parse_state, plan_device
from deployer.tasks.progress import Progress
from deployer.tasks.smoke import KernelResult, SmokePlan, Startup, compare, parse_startup, split_outputs

STAGES = ("connect", "state", "fingerprint", "upload", "compile", "pull", "smoke", "commit", "store")
MAX_PULL = 256 << 20
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
    smoke: SmokePlan
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
    from deployer.tasks.smoke import load_references, plan_smoke

    if mace_programs is not None:
        app = load_mace_programs(*mace_programs)
        library = app.library
        settings["mace_version"] = settings.get("mace_version") or app.mace_version or ""
        settings["mace_app"] = True
    else:
        library = load_library(kernels)
    model_files, loaded = load_models(list(models))  # a model of our format: its graph and weights travel
    smoke_plan = plan_smoke(library, load_references(library))  # runs the user's references: input errors first
    files = local_files(release_paths(library, model_files), HashIndex(None if check else cache / HASH_INDEX))
    return PushJob(library=library, smoke=smoke_plan, files=files, cache=cache, check=check,
                   models=tuple(plan_model(m, library) for m in loaded), **settings)


def release_paths(library: Library, models: Sequence[Path]) -> list[tuple[str, Path]]:
    """(path in the release, local path) of everything that travels; kernels first."""
    paths = [(f"kernels/{name}", library.folder / name) for name in library.files()]
    return paths + [(f"models/{model.name}", model) for model in models]


@dataclass(slots=True)
class DeviceOutcome:
    name: str
    ok: bool = False
    error: str | None = None
    failed_stage: str | None = None
    fingerprint: dict[str, Any] | None = None
    cache_file: str | None = None
    stages: dict[str, float] = field(default_factory=dict)
    kernels: list[KernelResult] = field(default_factory=list)
    models: list[ModelResult] = field(default_factory=list)
    startup: Startup | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    release: str | None = None
    plan: DevicePlan | None = None
    changed: bool = False  # a new release was committed
    pulled: bool = False  # the cache file was pulled (it differed from the local copy)
    bench: list[BenchItem] = field(default_factory=list)  # a bench step's timings
    create_ms: dict[str, float] = field(default_factory=dict)  # a bench step's program creation, by key
    warnings: list[str] = field(default_factory=list)  # why MACE will not use this device's cache file

    @property
    def built(self) -> int:
        return len({k.program_key for k in self.kernels if k.built})

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "ok": self.ok, "error": self.error, "failed_stage": self.failed_stage,
            "fingerprint": self.fingerprint, "cache_file": self.cache_file,
            "stages": {k: round(v, 4) for k, v in self.stages.items()},
            "kernels": [k.to_json() for k in self.kernels], "models": [m.to_json() for m in self.models],
            "startup": self.startup.to_json() if self.startup else None, "release": self.release,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "plan": self.plan.to_json() if self.plan else None, "changed": self.changed, "pulled": self.pulled,
            "warnings": self.warnings,
        }


@dataclass(frozen=True, slots=True)
class FleetResult:
    outcomes: tuple[DeviceOutcome, ...]
    interrupted: bool = False  # Ctrl-C: the devices in flight were stopped, those not started were not

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[DeviceOutcome]:
        return [o for o in self.outcomes if not o.ok]


def new_release_id() -> str:
    """Sortable by time, unique across controllers."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


@dataclass(slots=True)
class _Built:
    """The device's cache file after `compile` (or the current one, for a push that builds nothing)."""

    cache_sha256: str
    programs: dict[str, str]  # key -> binary sha256, as the device reports
    manifest_file: str = "build/manifest.json"


class _DeviceRun:
    """The state of one device's push while it runs; each stage is a method."""

    def __init__(self, device: Device, job: PushJob, progress: Progress) -> None:
        self.device, self.job, self.progress = device, job, progress
        self.outcome = DeviceOutcome(device.name)
        self.logs: dict[str, str] = {}
        self.stage = "connect"
        self.skipped: dict[str, str] = {}  # program key -> why this device skips it (unmet `requires`)
        self.state: RemoteState | None = None
        self.build_keys: dict[str, str] = {}  # program key -> build key, for the programs this device builds
        self.binary_shas: dict[str, str] = {}  # program key -> sha256 of its binary in the cache file as pulled

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        self.stage = stage
        self.progress.stage(self.device.name, stage)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.outcome.stages[stage] = self.outcome.stages.get(stage, 0.0) + time.perf_counter() - start

    def run(self) -> DeviceOutcome:
        try:
            with ExitStack() as stack:
                with self.timed("connect"):
                    session = stack.enter_context(open_session(
                        self.device, accept_new_host_keys=self.job.accept_new_host_keys, check=self.job.check))
                self.progress.traffic(self.device.name, lambda: (session.bytes_sent, session.bytes_received))
                try:
                    self._push(session)
                finally:
                    self.outcome.bytes_sent = session.bytes_sent
                    self.outcome.bytes_received = session.bytes_received
        except DeviceError as exc:
            self._fail(exc)
        self.progress.finished(self.device.name, self.outcome.ok, self.outcome.error)
        return self.outcome

    def run_on(self, session: AgentSession) -> tuple[DeviceOutcome, DeviceError | None]:
        """The push on a session opened by the caller (a nightly run's steps share one): the outcome and
        the device's error, if any, for the caller to grade."""
        try:
            self._push(session)
        except DeviceError as exc:
            self._fail(exc)
            return self.outcome, exc
        return self.outcome, None

    def _fail(self, exc: DeviceError) -> None:
        exc.for_device(self.device.name, self.stage)
        self.outcome.ok = False
        self.outcome.failed_stage = exc.stage
        self.outcome.error = f"{exc.stage}: {exc.reason}"
        if self.job.check:
            return
        try:
            store_failure(self.job.cache, self.device.name,
                          {"stage": exc.stage, "error": exc.message, "at": time.time()}, self.logs)
        except LocalStateError:
            pass  # the failure itself is reported; its local record is best effort

    def _push(self, session: AgentSession) -> None:
        with self.timed("state"):
            self.state = parse_state(session.request("state", opencl=self.device.opencl.as_request()))
        fingerprint = self.state.fingerprint
        if fingerprint is None:  # the driver stamp changed (or first push): ask the driver itself
            with self.timed("fingerprint"):
                fingerprint = session.request("fingerprint", opencl=self.device.opencl.as_request(),
                                              remember=not self.job.check,
                                              timeout_s=self.device.timeouts.command).get("fingerprint", dict)
        plan = self._plan(self.state, fingerprint)
        if self.job.check:
            self.outcome.ok = True
            return
        if self.job.smoke_only and plan.new_release:
            raise NotDeployed(_why_not_deployed(plan))
        phases.reached("plan")  # tests only: `state` answered and planned, nothing begun yet
        if plan.new_release:
            with self.timed("upload"):
                self._upload(session, plan)
            with self.timed("compile"):
                built = self._compile(session, plan)
        else:
            built = self._current_build()
        with self.timed("pull"):
            cache_bytes, manifest = self._pull(session, built)
        if self.job.bench is not None:
            with self.timed("bench"):
                self._bench(session, self.job.bench)
        else:
            with self.timed("smoke"):
                self._smoke(session, built, plan)
        if plan.new_release:
            with self.timed("commit"):
                session.request("commit", keep=self.job.keep)
            self.outcome.changed = True
        if manifest is not None:
            with self.timed("store"):
                self._store(cache_bytes, manifest)
        self.outcome.cache_file = str(device_dir(self.job.cache, self.device.name) / CACHE_FILE)
        self.outcome.ok = True

    def _mace_version(self) -> str:
        """The flag wins, then the device's `vars.mace_version`, then the default."""
        return self.job.mace_version or str(self.device.vars.get("mace_version") or DEFAULT_MACE_VERSION)

    # ----- state: one round trip, then the plan -----

    def _plan(self, state: RemoteState, fingerprint: Mapping[str, Any]) -> DevicePlan:
        self.outcome.fingerprint = parse_fingerprint(fingerprint)
        self.outcome.warnings = mace_warnings(self.outcome.fingerprint, mace_format=self.job.mace_format,
                                              mace_version=self._mace_version())
        self.skipped = self.job.library.skipped(self.outcome.fingerprint)
        fingerprint_id = str(self.outcome.fingerprint.get("id", ""))
        shas, mace_version = self.job.shas, self._mace_version()
        self.build_keys = {
            spec["key"]: build_key(spec, shas, mace_version=mace_version, mace_format=self.job.mace_format,
                                   fingerprint_id=fingerprint_id)
            for spec in self._program_specs(with_build_keys=False)}
        plan = plan_device(self.job.files, self.build_keys, state, mace_version=mace_version,
                           mace_format=self.job.mace_format)
        self.outcome.plan = plan
        self.outcome.release = state.current
        return plan

    # ----- upload: only what the current release does not hold -----

    def _upload(self, session: AgentSession, plan: DevicePlan) -> None:
        """begin: a delta on the current release (its other files are hard-linked there), then put what
        the device says it lacks."""
        release = new_release_id()
        changed = [f.to_request() for f in self.job.files if f.remote in plan.upload]
        base: dict[str, Any] = {"base": plan.current, "drop": list(plan.removed)} if plan.current else {}
        reply = session.request("begin", release=release, files=changed, **base)
        self.outcome.release = release
        need = reply.get("need", list)
        by_path = {f.remote: f for f in self.job.files}
        unknown = [n for n in need if n not in by_path]
        if unknown:
            raise AgentError(f"the device asked for files that are not in the release: {unknown[:3]}",
                             kind="bad_reply")
        for path in need:
            file = by_path[path]
            session.request("put", self.job.contents.read(file), path=file.remote, size=file.size,
                            sha256=file.sha256, mode=file.mode)
            phases.reached("upload")  # tests only: after the first put (a no-op unless the variable is set)

    def _program_specs(self, *, with_build_keys: bool = True) -> list[dict[str, Any]]:
        """Every program variant this device builds (those whose `requires` it meets)."""
        library = self.job.library
        specs: list[dict[str, Any]] = [
            {"key": program.key(variant), "name": program.name, "source": f"kernels/{program.source}",
             "headers": [f"kernels/{h}" for h in program.headers], "options": list(variant.options),
             "compile_options": list(library.compile_options)}
            for program in library.programs for variant in program.variants
            if program.key(variant) not in self.skipped
        ]
        if with_build_keys:
            for spec in specs:
                spec["build_key"] = self.build_keys[spec["key"]]
        return specs

    def _compile(self, session: AgentSession, plan: DevicePlan) -> _Built:
        """Build the programs whose build key changed; the others' binaries come from the current release."""
        specs = self._program_specs()
        rebuild = [s for s in specs if s["key"] in plan.rebuild]
        keep: dict[str, Any] = {"keep": list(plan.reuse), "base": plan.current} if plan.reuse and plan.current else {}
        request: dict[str, Any] = {"opencl": self.device.opencl.as_request(), "mace_version": self._mace_version(),
                   "mace_format": self.job.mace_format, "timeout_s": self.device.timeouts.command}
        try:
            reply = session.request("build", programs=rebuild, **keep, **request)
        except AgentError as exc:
            if exc.kind != "reuse_missing":
                raise
            reply = session.request("build", programs=specs, **request)  # the device lost a binary: build all
        results = reply.get("programs", list)
        for result in results:
            key = str(reply_field(result, "key", str))
            self.logs[key] = printable(str(reply_field(result, "log", str, optional=True) or ""), 1 << 16)
        built = {str(reply_field(r, "key", str)) for r in results if reply_field(r, "ok", bool)}
        self.outcome.kernels = [
            KernelResult(c.id, c.program_key, c.program_key in built, "skipped",
                         detail=self.skipped.get(c.program_key) or (None if c.program_key in built else "build failed"))
            for c in self.job.smoke.cases
        ]
        raise_for_failed_programs(results)
        shas = {str(reply_field(r, "key", str)): str(reply_field(r, "sha256", str)) for r in results}
        return _Built(reply.get("cache_sha256", str), shas, reply.get("manifest_file", str))

    def _current_build(self) -> _Built:
        """Nothing to build: the current release's cache file is what this push would produce."""
        state = self.state
        assert state is not None and state.cache_sha256 is not None
        return _Built(state.cache_sha256, {k: p.sha256 for k, p in state.programs.items()})

    # ----- pull: only a cache file that differs from the local copy -----

    def _pull(self, session: AgentSession, built: _Built) -> tuple[bytes, dict[str, Any] | None]:
        local = _local_cache(self.job.cache, self.device.name)
        if local is not None and hashlib.sha256(local).hexdigest() == built.cache_sha256:
            cache_bytes, manifest = local, None
        else:
            cache_bytes = _get(session, f"build/{CACHE_FILE}", built.cache_sha256)
            manifest = _parse_manifest(session.request("get", path=built.manifest_file,
                                                      max_reply=MAX_MANIFEST).payload)
            self.outcome.pulled = True
        try:
            entries = parse_cache(cache_bytes, fmt=self.job.mace_format).programs
        except ValueError as exc:
            raise AgentError(f"the pulled cache file is not a valid MACE {self.job.mace_format} container: {exc}",
                             kind="bad_cache") from exc
        missing = sorted(k for k in self.build_keys if k not in entries)
        if missing:
            raise AgentError(f"the pulled cache file lacks program(s) {missing}", kind="bad_cache")
        self.binary_shas = {k: hashlib.sha256(entries[k]).hexdigest() for k in self.build_keys}
        return cache_bytes, manifest

    # ----- smoke: what changed (or everything, or nothing) -----

    def _smoke_keys(self, built: _Built) -> set[str]:
        """The programs this push smoke-tests: by --smoke, and for `changed` those whose binary differs
        from the one the current release had (a new fingerprint rebuilds, so changes, every binary)."""
        if self.job.smoke_mode == "never":
            return set()
        keys = set(self.build_keys)
        if self.job.smoke_mode == "always" or self.state is None:
            return keys
        old = self.state.programs
        return {k for k in keys if k not in old or old[k].sha256 != built.programs.get(k)}

    def _smoke(self, session: AgentSession, built: _Built, plan: DevicePlan) -> None:
        keys = self._smoke_keys(built)
        not_smoked = {k: self._why_not_smoked() for k in self.build_keys if k not in keys}
        smoke, left_out = self.job.smoke, {**self.skipped, **not_smoked}
        run = smoke.requests(left_out)
        reply = Reply({"cases": []}, b"")  # nothing to run: every case is left out, and says why
        if run:
            cases = smoke.requests(self.skipped)  # all of this device's cases travel (once) in the blob
            reply = self._blob_request(session, "smoke", {"cases": cases}, bytes(smoke.payload),
                                       run=[c["id"] for c in run], cache_file=f"build/{CACHE_FILE}",
                                       expected=self._expected({c["program_key"] for c in run}))
        kernels = check_cases(smoke, reply, left_out)
        status = "unchanged" if self.job.smoke_mode == "changed" else "skipped"
        self.outcome.kernels = [replace(k, built=True, smoke=status) if k.program_key in not_smoked and not k.built
                                else k for k in kernels]
        self._startup(session, keys, plan)
        if self.job.mace_app:
            self.outcome.kernels = self._loaded(keys, status)
        failed = [f"{k.name}: {k.detail}" for k in self.outcome.kernels if k.smoke == "failed"]
        failed += [f"model {m.name}: {m.detail}" for m in self.outcome.models if m.ok is False]
        if failed:
            raise SmokeMismatch("; ".join(failed))

    def _loaded(self, keys: set[str], status: str) -> list[KernelResult]:
        """A MACE app's programs have no reference to compare with: each smoked one passes when the device
        created it from its pulled binary (the `startup` op), as MACE does at start."""
        figures = {p.key: p for p in self.outcome.startup.programs} if self.outcome.startup else {}
        results = []
        for key in sorted(self.build_keys):
            name = key.split(" ", 1)[0]
            if key in self.skipped:
                results.append(KernelResult(name, key, False, "skipped", detail=self.skipped[key]))
            elif key not in keys:
                results.append(KernelResult(name, key, True, status, detail=self._why_not_smoked()))
            elif (figure := figures.get(key)) is None or figure.error or figure.load_from_binary_ms is None:
                why = figure.error if figure is not None and figure.error else "not loaded"
                results.append(KernelResult(name, key, True, "failed", detail=f"load from its binary: {why}"))
            else:
                results.append(KernelResult(name, key, True, "passed",
                                            detail=f"loaded from its binary in {figure.load_from_binary_ms:.1f} ms"))
        return results

    def _expected(self, keys: set[str]) -> dict[str, str]:
        """sha256 of the pulled binaries the device may load: it checks each before any driver sees it."""
        return {key: self.binary_shas[key] for key in sorted(keys)}

    def _why_not_smoked(self) -> str:
        if self.job.smoke_mode == "never":
            return "not smoke-tested (--smoke never)"
        return f"binary unchanged since release {self.state.current if self.state else '?'} (--smoke always runs it)"

    def _blob_request(self, session: AgentSession, op: str, fields: Mapping[str, Any], payload: bytes,
                      **request: Any) -> Reply:
        """A smoke/startup request whose stable part (case or model descriptions, then their input bytes)
        the device keeps by hash: sent only when the device does not hold it yet."""
        head = json.dumps(fields, sort_keys=True).encode()
        blob = head + payload
        sha = hashlib.sha256(blob).hexdigest()
        known = self.state is not None and sha in self.state.blobs
        timeout_s = request.pop("timeout_s", self.device.timeouts.command)
        return session.request(op, b"" if known else blob, blob=sha, blob_json=len(head),
                               opencl=self.device.opencl.as_request(), timeout_s=timeout_s, **request)

    def _bench(self, session: AgentSession, bench: BenchJob) -> None:
        """Every case of the programs this device runs, in batches whose replies stay small, then the models."""
        cases = [c for c in bench.plan.cases if c.program_key in self.build_keys]
        limit = bench.settings["max_repeats"]
        fields = dict(bench.settings, cache_file=f"build/{CACHE_FILE}", timeout_s=bench.timeout_s)
        for batch in batches(cases, limit):
            reply = self._blob_request(session, "bench", {"cases": [c.request for c in batch]},
                                       bytes(bench.plan.payload),
                                       expected=self._expected({c.program_key for c in batch}), **fields)
            self.outcome.bench += parse_bench(reply, [c.id for c in batch], [], limit)
            self.outcome.create_ms.update(parse_create_ms(reply, self.build_keys))
        runnable = [m for m in self.job.models if skipped_model(m, self.skipped) is None]
        if runnable:
            models, payload = wire_models(runnable)
            reply = self._blob_request(session, "bench", {"models": models, "cases": []}, payload,
                                       expected=self._expected({k for m in runnable for k in m.program_keys}),
                                       **fields)
            self.outcome.bench += parse_bench(reply, [], [m.model.name for m in runnable], limit)

    def _startup(self, session: AgentSession, keys: set[str], plan: DevicePlan) -> None:
        """Start-up figures (the smoked programs from source vs from their binary, in a child of the agent
        whose driver cache is off) and the models' forward pass from the binaries, checked against numpy:
        each model whose programs were smoked or whose files changed."""
        skips = [skipped_model(model, self.skipped) for model in self.job.models]
        runnable = [model for model, skip in zip(self.job.models, skips, strict=True) if skip is None]
        models_changed = any(p.startswith("models/") for p in plan.upload) and self.job.smoke_mode != "never"
        chosen = [m for m in runnable if models_changed or keys & set(m.program_keys)]
        chosen_names = {m.model.name for m in chosen}
        specs = [s for s in self._program_specs() if s["key"] in keys]
        if not specs and not chosen:
            self.outcome.models = [skip or ModelResult(m.model.name, None, detail="not run: its programs are "
                                   "unchanged") for m, skip in zip(self.job.models, skips, strict=True)]
            return
        models, payload = wire_models(runnable)
        needed = {s["key"] for s in specs} | {k for m in chosen for k in m.program_keys}
        reply = self._blob_request(session, "startup", {"models": models}, payload,
                                   run=[m.model.name for m in chosen], cache_file=f"build/{CACHE_FILE}",
                                   expected=self._expected(needed), programs=specs)
        self.outcome.startup = parse_startup(reply, [s["key"] for s in specs])
        checked = iter(check_models(chosen, reply))
        self.outcome.models = [skip or (next(checked) if m.model.name in chosen_names else
                                        ModelResult(m.model.name, None, detail="not run: its programs are unchanged"))
                               for m, skip in zip(self.job.models, skips, strict=True)]

    def _store(self, cache_bytes: bytes, manifest: dict[str, Any]) -> Path:
        try:
            return store_device(self.job.cache, self.device.name, cache_bytes, manifest,
                                self.outcome.fingerprint or {}, self.logs)
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
        reply = session.request("get", path=path, spool=spool, max_reply=MAX_PULL)
        if reply.get("size", int) != spool.size:
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


def check_cases(plan: SmokePlan, reply: Reply, skipped: Mapping[str, str] | None = None) -> list[KernelResult]:
    """Each case's verdict from the agent's reply: device errors, output sizes, numpy comparison. Cases of
    the programs in `skipped` (key -> why) were not sent: they are skipped, not built, with the reason."""
    skipped = skipped or {}
    results_by_id = {}
    for record in reply.get("cases", list):
        results_by_id[str(reply_field(record, "id", str))] = record
    payload, offset = memoryview(reply.payload), 0
    verdicts = []
    for case in plan.cases:
        if case.skip_reason is not None:
            verdicts.append(KernelResult(case.id, case.program_key, True, "skipped", detail=case.skip_reason))
            continue
        if case.program_key in skipped:
            verdicts.append(KernelResult(case.id, case.program_key, False, "skipped", detail=skipped[case.program_key]))
            continue
        record = results_by_id.get(case.id)
        if record is None:
            verdicts.append(KernelResult(case.id, case.program_key, True, "failed", detail="no result from device"))
            continue
        sizes = [int(reply_field(o, "size", int)) for o in reply_field(record, "outputs", list)]
        if any(s < 0 for s in sizes) or offset + sum(sizes) > len(payload):
            raise AgentError(f"smoke reply for {case.id}: output sizes exceed the payload", kind="bad_reply")
        chunk = payload[offset: offset + sum(sizes)]
        offset += sum(sizes)
        verdicts.append(_verdict(case, record, chunk, sizes))
    return verdicts


def _verdict(case: Any, record: Mapping[str, Any], chunk: memoryview, sizes: Sequence[int]) -> KernelResult:
    if not reply_field(record, "ok", bool):
        error = printable(str(reply_field(record, "error", str, optional=True) or "failed"), 500)
        return KernelResult(case.id, case.program_key, True, "failed", detail=error)
    if case.expected is None:
        return KernelResult(case.id, case.program_key, True, "skipped", detail="no numpy reference")
    try:
        outputs = split_outputs(case, chunk, sizes)
    except ValueError as exc:
        return KernelResult(case.id, case.program_key, True, "failed", detail=str(exc))
    passed, worst, reason = compare(case, outputs)
    return KernelResult(case.id, case.program_key, True, "passed" if passed else "failed",
                        max_abs_error=worst, detail=reason)


def run_device(device: Device, job: PushJob, progress: Progress) -> DeviceOutcome:
    return _DeviceRun(device, job, progress).run()


def run_fleet(devices: Sequence[Device], job: PushJob, *, forks: int, progress: Progress) -> FleetResult:
    """Every device in parallel (at most `forks` at once), each within its `timeouts.device`; outcomes in
    inventory order. Past `max_fail_percentage`, the devices not yet started fail as `not_started`."""
    stop = None if job.max_fail_percentage is None else fail_limit(job.max_fail_percentage, len(devices))
    try:
        return FleetResult(tuple(fan_out(
            devices, lambda d: run_device(d, job, progress), forks=forks, label="device",
            deadline=lambda d: d.timeouts.device, stop=stop,
            not_started=lambda d, why: _not_started(d, why, progress))))
    except FleetInterrupted as stopped:
        outcomes = tuple(o if isinstance(o, DeviceOutcome) else _not_started(d, INTERRUPTED, progress)
                         for d, o in zip(devices, stopped.results, strict=True))
        return FleetResult(outcomes, interrupted=True)


def _not_started(device: Device, why: str, progress: Progress) -> DeviceOutcome:
    progress.finished(device.name, False, why)
    return DeviceOutcome(device.name, error=why, failed_stage="not_started")


@dataclass(frozen=True, slots=True)
class RollbackOutcome:
    name: str
    ok: bool
    current: str | None = None
    previous: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "current": self.current, "previous": self.previous,
                "error": self.error}


def _rollback_device(device: Device, cache: Path, accept_new_host_keys: bool) -> RollbackOutcome:
    """Switch the device back one release, then make the local cache match what is now `current`."""
    try:
        with open_session(device, accept_new_host_keys=accept_new_host_keys) as session:
            reply = session.request("rollback")
        current, previous = printable(reply.get("current", str), 80), printable(reply.get("previous", str), 80)
        manifest = reply.get("manifest", dict, optional=True)
        data = reply.payload
        if hashlib.sha256(data).hexdigest() != reply.get("cache_sha256", str):
            raise AgentError("the rolled-back cache file arrived corrupted", kind="checksum")
        if manifest is None or not data:
            return RollbackOutcome(device.name, True, current, previous,
                                   error="rolled back, but that release has no cache file: local cache unchanged")
        try:
            parse_cache(data)
        except ValueError as exc:
            raise AgentError(f"the rolled-back cache file is not a MACE container: {exc}", kind="bad_cache") from exc
        fingerprint = parse_fingerprint(manifest["fingerprint"]) if "fingerprint" in manifest else {}
        store_device(cache, device.name, data, manifest, fingerprint, {})
        return RollbackOutcome(device.name, True, current, previous)
    except DeviceError as exc:
        return RollbackOutcome(device.name, False, error=exc.reason)
    except LocalStateError as exc:
        return RollbackOutcome(device.name, False, error=f"rolled back, but the local cache: {exc}")


def rollback_fleet(devices: Sequence[Device], cache: Path, *, forks: int,
                   accept_new_host_keys: bool = False) -> list[RollbackOutcome]:
    return fan_out(devices, lambda d: _rollback_device(d, cache, accept_new_host_keys), forks=forks,
                   label="rollback", deadline=lambda d: d.timeouts.device)
