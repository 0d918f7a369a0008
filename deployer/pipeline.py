"""One device's push (connect, upload, fingerprint, compile, pull, smoke, commit, store) and the fleet.

`run_device` never raises a `DeviceError`: it returns a failed `DeviceOutcome` naming the stage and the
reason, so one device never stops the others. `run_fleet` fans devices out over a bounded thread pool.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deployer.agent import AgentSession, Reply, open_session, printable, raise_for_failed_programs
from deployer.agent import field as reply_field
from deployer.cache import CACHE_FILE, store_device, store_failure
from deployer.errors import AgentError, DeviceError, InputError, LocalStateError, SmokeMismatch, Where
from deployer.fleet import fail_limit, fan_out
from deployer.inventory import Device
from deployer.kernels import Library
from deployer.mace import DEFAULT_MACE_VERSION, parse_cache
from deployer.model import ModelPlan, ModelResult, check_models, skipped_model, wire_models
from deployer.smoke import KernelResult, SmokePlan, Startup, compare, parse_startup, split_outputs

STAGES = ("connect", "upload", "fingerprint", "compile", "pull", "smoke", "commit", "store")
MAX_PULL = 256 << 20
Progress = Callable[[str, str], None]  # (device, stage) as each stage starts


@dataclass(frozen=True, slots=True)
class PushJob:
    """What every device of one `deploy push` gets; built once, shared read-only by the workers."""

    library: Library
    smoke: SmokePlan
    files: tuple[tuple[str, bytes], ...]  # (path in the release, content): read once for all devices
    cache: Path
    mace_version: str  # "" = each device's vars.mace_version, else DEFAULT_MACE_VERSION
    keep: int = 3
    accept_new_host_keys: bool = False
    mace_format: str = "pb"  # "legacy" for apps on MACE v1.0.x
    models: tuple[ModelPlan, ...] = ()  # models of the deployer's format: their forward pass is smoked too
    max_fail_percentage: float | None = None  # past it, devices not yet started are not started


def release_files(library: Library, models: Sequence[Path]) -> tuple[tuple[str, bytes], ...]:
    """Everything that travels, read once before any device is touched; kernels first."""
    paths = [(f"kernels/{name}", library.folder / name) for name in library.files()]
    paths += [(f"models/{model.name}", model) for model in models]
    names = [remote for remote, _ in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(None, "model", f"two files would land at the same place: {', '.join(duplicates)}")
    return tuple((remote, _read_local(local)) for remote, local in paths)


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
        }


@dataclass(frozen=True, slots=True)
class FleetResult:
    outcomes: tuple[DeviceOutcome, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[DeviceOutcome]:
        return [o for o in self.outcomes if not o.ok]


def new_release_id() -> str:
    """Sortable by time, unique across controllers."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


class _DeviceRun:
    """The state of one device's push while it runs; each stage is a method."""

    def __init__(self, device: Device, job: PushJob, progress: Progress) -> None:
        self.device, self.job, self.progress = device, job, progress
        self.outcome = DeviceOutcome(device.name)
        self.logs: dict[str, str] = {}
        self.stage = "connect"
        self.skipped: dict[str, str] = {}  # program key -> why this device skips it (unmet `requires`)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        self.stage = stage
        self.progress(self.device.name, stage)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.outcome.stages[stage] = self.outcome.stages.get(stage, 0.0) + time.perf_counter() - start

    def run(self) -> DeviceOutcome:
        try:
            with ExitStack() as stack:
                with self.timed("connect"):
                    session = stack.enter_context(
                        open_session(self.device, accept_new_host_keys=self.job.accept_new_host_keys))
                try:
                    self._push(session)
                finally:
                    self.outcome.bytes_sent = session.bytes_sent
                    self.outcome.bytes_received = session.bytes_received
        except DeviceError as exc:
            self._fail(exc)
        return self.outcome

    def _fail(self, exc: DeviceError) -> None:
        exc.for_device(self.device.name, self.stage)
        self.outcome.ok = False
        self.outcome.failed_stage = exc.stage
        self.outcome.error = f"{exc.stage}: {exc.reason}"
        try:
            store_failure(self.job.cache, self.device.name,
                          {"stage": exc.stage, "error": exc.message, "at": time.time()}, self.logs)
        except LocalStateError:
            pass  # the failure itself is reported; its local record is best effort

    def _push(self, session: AgentSession) -> None:
        with self.timed("upload"):
            self._upload(session)
        with self.timed("fingerprint"):
            reply = session.request("fingerprint", opencl=self.device.opencl.as_request())
            self.outcome.fingerprint = _fingerprint(reply)
            self.skipped = self.job.library.skipped(self.outcome.fingerprint)
        with self.timed("compile"):
            build = self._compile(session)
        with self.timed("pull"):
            cache_bytes, manifest, programs = self._pull(session, build)
        with self.timed("smoke"):
            self._smoke(session, programs)
        with self.timed("commit"):
            session.request("commit", keep=self.job.keep)
        with self.timed("store"):
            target = self._store(cache_bytes, manifest)
        self.outcome.cache_file = str(target)
        self.outcome.ok = True

    def _mace_version(self) -> str:
        """The flag wins, then the device's `vars.mace_version`, then the default."""
        return self.job.mace_version or str(self.device.vars.get("mace_version") or DEFAULT_MACE_VERSION)

    def _upload(self, session: AgentSession) -> None:
        release = new_release_id()
        session.request("begin", release=release)
        self.outcome.release = release
        for remote, data in self.job.files:
            session.request("put", data, path=remote, size=len(data),
                            sha256=hashlib.sha256(data).hexdigest(), mode=0o644)

    def _program_specs(self) -> list[dict[str, Any]]:
        """Every program variant this device builds (those whose `requires` it meets)."""
        library = self.job.library
        return [
            {"key": program.key(variant), "name": program.name, "source": f"kernels/{program.source}",
             "headers": [f"kernels/{h}" for h in program.headers], "options": list(variant.options),
             "compile_options": list(library.compile_options)}
            for program in library.programs for variant in program.variants
            if program.key(variant) not in self.skipped
        ]

    def _compile(self, session: AgentSession) -> Reply:
        programs = self._program_specs()
        reply = session.request("build", opencl=self.device.opencl.as_request(), mace_version=self._mace_version(),
                                programs=programs, mace_format=self.job.mace_format,
                                timeout_s=self.device.timeouts.command)
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
        return reply

    def _pull(self, session: AgentSession, build: Reply) -> tuple[bytes, dict[str, Any], dict[str, bytes]]:
        want_sha = build.get("cache_sha256", str)
        cache_bytes = _get(session, build.get("cache_file", str), want_sha)
        manifest_reply = session.request("get", path=build.get("manifest_file", str))
        manifest = _parse_manifest(manifest_reply.payload)
        try:
            entries = parse_cache(cache_bytes, fmt=self.job.mace_format).programs
        except ValueError as exc:
            raise AgentError(f"the pulled cache file is not a valid MACE {self.job.mace_format} container: {exc}",
                             kind="bad_cache") from exc
        keys = {p["key"] for p in self._program_specs()}
        missing = sorted(k for k in keys if k not in entries)
        if missing:
            raise AgentError(f"the pulled cache file lacks program(s) {missing}", kind="bad_cache")
        return cache_bytes, manifest, {k: entries[k] for k in keys}

    def _smoke(self, session: AgentSession, programs: Mapping[str, bytes]) -> None:
        plan = self.job.smoke
        expected = {key: hashlib.sha256(data).hexdigest() for key, data in programs.items()}
        reply = session.request("smoke", bytes(plan.payload), opencl=self.device.opencl.as_request(),
                                cache_file=f"build/{CACHE_FILE}", expected=expected,
                                cases=plan.requests(self.skipped), timeout_s=self.device.timeouts.command)
        self.outcome.kernels = check_cases(plan, reply, self.skipped)
        self._startup(session, expected)
        failed = [f"{k.name}: {k.detail}" for k in self.outcome.kernels if k.smoke == "failed"]
        failed += [f"model {m.name}: {m.detail}" for m in self.outcome.models if m.ok is False]
        if failed:
            raise SmokeMismatch("; ".join(failed))

    def _startup(self, session: AgentSession, expected: Mapping[str, str]) -> None:
        """Start-up figures (each program from source vs from its binary, in a child of the agent whose
        driver cache is off) and the models' forward pass from the binaries, checked against numpy."""
        skips = [skipped_model(plan, self.skipped) for plan in self.job.models]
        plans = [plan for plan, skip in zip(self.job.models, skips, strict=True) if skip is None]
        models, payload = wire_models(plans)
        specs = self._program_specs()
        reply = session.request("startup", payload, opencl=self.device.opencl.as_request(),
                                cache_file=f"build/{CACHE_FILE}", expected=expected, programs=specs, models=models,
                                timeout_s=self.device.timeouts.command)
        self.outcome.startup = parse_startup(reply, [s["key"] for s in specs])
        checked = iter(check_models(plans, reply))
        self.outcome.models = [skip or next(checked) for skip in skips]

    def _store(self, cache_bytes: bytes, manifest: dict[str, Any]) -> Path:
        try:
            return store_device(self.job.cache, self.device.name, cache_bytes, manifest,
                                self.outcome.fingerprint or {}, self.logs)
        except LocalStateError as exc:
            raise DeviceError(f"local cache: {exc}") from exc


def _read_local(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(Where(str(path)), None, f"cannot read: {exc.strerror or exc}") from exc


def _get(session: AgentSession, path: str, sha256: str) -> bytes:
    reply = session.request("get", path=path)
    if len(reply.payload) > MAX_PULL or reply.get("size", int) != len(reply.payload):
        raise AgentError(f"pulled {path}: size does not match what the agent announced", kind="bad_cache")
    if hashlib.sha256(reply.payload).hexdigest() != sha256:
        raise AgentError(f"pulled {path}: sha256 differs from the build's report (corrupted in transit?)",
                         kind="checksum")
    return reply.payload


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AgentError(f"the device's manifest is not JSON: {exc}", kind="bad_manifest") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("programs"), list):
        raise AgentError("the device's manifest lacks a programs list", kind="bad_manifest")
    return manifest


def _fingerprint(reply: Reply) -> dict[str, Any]:
    fingerprint = reply.get("fingerprint", dict)
    for part in ("platform", "device"):
        record = reply_field(fingerprint, part, dict)
        reply_field(record, "name", str)
    reply_field(fingerprint["device"], "driver_version", str)
    reply_field(fingerprint, "cpu_only", bool)
    clean: dict[str, Any] = _printable_tree(fingerprint)
    return clean


def _printable_tree(value: Any, depth: int = 0) -> Any:
    """A device-sent JSON tree with every string made printable and bounded."""
    if depth > 4:
        return None
    if isinstance(value, str):
        return printable(value, 512)
    if isinstance(value, list):
        return [_printable_tree(v, depth + 1) for v in value[:512]]
    if isinstance(value, dict):
        return {printable(str(k), 64): _printable_tree(v, depth + 1) for k, v in list(value.items())[:64]}
    return value


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
    return FleetResult(tuple(fan_out(
        devices, lambda d: run_device(d, job, progress), forks=forks, label="device",
        deadline=lambda d: d.timeouts.device, stop=stop,
        not_started=lambda d, why: DeviceOutcome(d.name, error=why, failed_stage="not_started"))))


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
        fingerprint = manifest.get("fingerprint")
        store_device(cache, device.name, data, manifest, fingerprint if isinstance(fingerprint, dict) else {}, {})
        return RollbackOutcome(device.name, True, current, previous)
    except DeviceError as exc:
        return RollbackOutcome(device.name, False, error=exc.reason)
    except LocalStateError as exc:
        return RollbackOutcome(device.name, False, error=f"rolled back, but the local cache: {exc}")


def rollback_fleet(devices: Sequence[Device], cache: Path, *, forks: int,
                   accept_new_host_keys: bool = False) -> list[RollbackOutcome]:
    return fan_out(devices, lambda d: _rollback_device(d, cache, accept_new_host_keys), forks=forks,
                   label="rollback", deadline=lambda d: d.timeouts.device)
