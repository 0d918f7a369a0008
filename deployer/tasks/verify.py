"""What a push runs on the board from the binaries it deploys: the smoke cases against numpy, the start-up
figures and the models' forward pass (`startup`), a nightly bench step's timings (docs/design.md section 11).

Each stage gets the device's `PushContext` and what the earlier stages settled (`Planned`, `Built`,
`Pulled`: tasks/push.py); each request carries its stable part (cases, models, their input bytes) as a blob
the board keeps by hash, so a later push sends only which ones to run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from deployer.cache.store import CACHE_FILE
from deployer.errors import AgentError, SmokeMismatch
from deployer.protocol.reply import MAX_ERROR, Fields, Reply, output_sizes
from deployer.protocol.session import AgentSession
from deployer.tasks.bench import batches, parse_bench, parse_create_ms
from deployer.tasks.models import ModelResult, check_models, skipped_model, wire_models
from deployer.tasks.plan import RemoteState, program_specs
from deployer.tasks.smoke import KernelResult, SmokePlan, Startup, compare, parse_startup, split_outputs
from deployer.text import visible

if TYPE_CHECKING:
    from deployer.tasks.push import BenchJob, Built, Planned, Pulled, PushContext, PushJob


def smoke_keys(job: PushJob, planned: Planned, built: Built) -> set[str]:
    """The programs this push smoke-tests: by --smoke, and for `changed` those whose binary differs
    from the one the current release had (a new fingerprint rebuilds, so changes, every binary)."""
    if job.smoke_mode == "never":
        return set()
    keys = set(planned.build_keys)
    if job.smoke_mode == "always":
        return keys
    old = planned.state.programs
    return {k for k in keys if k not in old or old[k].sha256 != built.programs.get(k)}


def smoke_stage(context: PushContext, session: AgentSession, planned: Planned, built: Built,
                pulled: Pulled) -> None:
    job, outcome = context.job, context.outcome
    keys = smoke_keys(job, planned, built)
    why_not = _why_not_smoked(job, planned)
    not_smoked = {k: why_not for k in planned.build_keys if k not in keys}
    left_out = {**planned.skipped, **not_smoked}
    if all(key in left_out for _, key in job.smoke.outline):  # nothing to run (numpy and the plan not needed)
        kernels = [KernelResult(case, key, False, "skipped", detail=left_out[key]) for case, key in job.smoke.outline]
    else:
        smoke = job.smoke.plan()
        run = smoke.requests(left_out)
        cases = smoke.requests(planned.skipped)  # all of this device's cases travel (once) in the blob
        reply = blob_request(context, session, planned.state, "smoke", {"cases": cases}, bytes(smoke.payload),
                             run=[c["id"] for c in run], cache_file=f"build/{CACHE_FILE}",
                             expected=pulled.expected({c["program_key"] for c in run}))
        kernels = check_cases(smoke, reply, left_out)
    status = "unchanged" if job.smoke_mode == "changed" else "skipped"
    outcome.kernels = [replace(k, built=True, smoke=status) if k.program_key in not_smoked and not k.built
                       else k for k in kernels]
    startup_stage(context, session, planned, pulled, keys)
    if job.mace_app:
        outcome.kernels = _loaded(outcome.startup, planned, keys, status, why_not)
    failed = [f"{k.name}: {k.detail}" for k in outcome.kernels if k.smoke == "failed"]
    failed += [f"model {m.name}: {m.detail}" for m in outcome.models if m.ok is False]
    if failed:
        raise SmokeMismatch("; ".join(failed))


def _loaded(startup: Startup | None, planned: Planned, keys: set[str], status: str,
            why_not: str) -> list[KernelResult]:
    """A MACE app's programs have no reference to compare with: each smoked one passes when the device
    created it from its pulled binary (the `startup` op), as MACE does at start."""
    figures = {p.key: p for p in startup.programs} if startup else {}
    results = []
    for key in sorted(planned.build_keys):
        name = key.split(" ", 1)[0]
        if key in planned.skipped:
            results.append(KernelResult(name, key, False, "skipped", detail=planned.skipped[key]))
        elif key not in keys:
            results.append(KernelResult(name, key, True, status, detail=why_not))
        elif (figure := figures.get(key)) is None or figure.error or figure.load_from_binary_ms is None:
            why = figure.error if figure is not None and figure.error else "not loaded"
            results.append(KernelResult(name, key, True, "failed", detail=f"load from its binary: {why}"))
        else:
            results.append(KernelResult(name, key, True, "passed",
                                        detail=f"loaded from its binary in {figure.load_from_binary_ms:.1f} ms"))
    return results


def _why_not_smoked(job: PushJob, planned: Planned) -> str:
    if job.smoke_mode == "never":
        return "not smoke-tested (--smoke never)"
    return f"binary unchanged since release {planned.state.current or '?'} (--smoke always runs it)"


def blob_request(context: PushContext, session: AgentSession, state: RemoteState, op: str,
                 fields: Mapping[str, Any], payload: bytes, **request: Any) -> Reply:
    """A smoke/startup/bench request whose stable part (case or model descriptions, then their input bytes)
    the device keeps by hash: sent only when the device does not hold it yet."""
    head = json.dumps(fields, sort_keys=True).encode()
    blob = head + payload
    sha = hashlib.sha256(blob).hexdigest()
    timeout_s = request.pop("timeout_s", context.device.timeouts.command)
    return session.request(op, b"" if sha in state.blobs else blob, blob=sha, blob_json=len(head),
                           opencl=context.device.opencl.as_request(), timeout_s=timeout_s, **request)


def bench_stage(context: PushContext, session: AgentSession, planned: Planned, pulled: Pulled,
                bench: BenchJob) -> None:
    """Every case of the programs this device runs, in batches whose replies stay small, then the models."""
    job, outcome = context.job, context.outcome
    cases = [c for c in bench.plan.cases if c.program_key in planned.build_keys]
    limit = bench.settings["max_repeats"]
    fields = dict(bench.settings, cache_file=f"build/{CACHE_FILE}", timeout_s=bench.timeout_s)
    for batch in batches(cases, limit):
        reply = blob_request(context, session, planned.state, "bench", {"cases": [c.request for c in batch]},
                             bytes(bench.plan.payload), expected=pulled.expected({c.program_key for c in batch}),
                             **fields)
        outcome.bench += parse_bench(reply, [c.id for c in batch], [], limit)
        outcome.create_ms.update(parse_create_ms(reply, planned.build_keys))
    runnable = [m for m in job.models if skipped_model(m, planned.skipped) is None]
    if runnable:
        models, payload = wire_models(runnable)
        reply = blob_request(context, session, planned.state, "bench", {"models": models, "cases": []}, payload,
                             expected=pulled.expected({k for m in runnable for k in m.program_keys}), **fields)
        outcome.bench += parse_bench(reply, [], [m.model.name for m in runnable], limit)


def startup_stage(context: PushContext, session: AgentSession, planned: Planned, pulled: Pulled,
                  keys: set[str]) -> None:
    """Start-up figures (the smoked programs from source vs from their binary, in a child of the agent
    whose driver cache is off) and the models' forward pass from the binaries, checked against numpy:
    each model whose programs were smoked or whose files changed."""
    job, outcome = context.job, context.outcome
    skips = [skipped_model(model, planned.skipped) for model in job.models]
    runnable = [model for model, skip in zip(job.models, skips, strict=True) if skip is None]
    models_changed = any(p.startswith("models/") for p in planned.plan.upload) and job.smoke_mode != "never"
    chosen = [m for m in runnable if models_changed or keys & set(m.program_keys)]
    chosen_names = {m.model.name for m in chosen}
    specs = [s for s in program_specs(job.library, planned.skipped, planned.build_keys) if s["key"] in keys]
    if not specs and not chosen:
        outcome.models = [skip or ModelResult(m.model.name, None, detail="not run: its programs are unchanged")
                          for m, skip in zip(job.models, skips, strict=True)]
        return
    models, payload = wire_models(runnable)
    needed = {s["key"] for s in specs} | {k for m in chosen for k in m.program_keys}
    reply = blob_request(context, session, planned.state, "startup", {"models": models}, payload,
                         run=[m.model.name for m in chosen], cache_file=f"build/{CACHE_FILE}",
                         expected=pulled.expected(needed), programs=specs)
    outcome.startup = parse_startup(reply, [s["key"] for s in specs])
    checked = iter(check_models(chosen, reply))
    outcome.models = [skip or (next(checked) if m.model.name in chosen_names else
                               ModelResult(m.model.name, None, detail="not run: its programs are unchanged"))
                      for m, skip in zip(job.models, skips, strict=True)]


def check_cases(plan: SmokePlan, reply: Reply, skipped: Mapping[str, str] | None = None) -> list[KernelResult]:
    """Each case's verdict from the agent's reply: device errors, output sizes, numpy comparison. Cases of
    the programs in `skipped` (key -> why) were not sent: they are skipped, not built, with the reason."""
    skipped = skipped or {}
    results_by_id = {Fields(record, "smoke reply case").text("id"): record
                     for record in Fields(reply.fields, "smoke reply").items("cases")}
    payload, offset = memoryview(reply.payload), 0
    verdicts = []
    for case in plan.cases:
        if case.skip_reason is not None:
            verdicts.append(KernelResult(case.id, case.program_key, True, "skipped", detail=case.skip_reason))
            continue
        if case.program_key in skipped:
            verdicts.append(KernelResult(case.id, case.program_key, False, "skipped", detail=skipped[case.program_key]))
            continue
        raw = results_by_id.get(case.id)
        if raw is None:
            verdicts.append(KernelResult(case.id, case.program_key, True, "failed", detail="no result from device"))
            continue
        record = Fields(raw, f"smoke reply case {case.id!r}")
        sizes = output_sizes(record, len(payload))
        if offset + sum(sizes) > len(payload):
            raise AgentError(f"smoke reply for {case.id}: output sizes exceed the payload", kind="bad_reply")
        chunk = payload[offset: offset + sum(sizes)]
        offset += sum(sizes)
        verdicts.append(_verdict(case, record, chunk, sizes))
    return verdicts


def _verdict(case: Any, record: Fields, chunk: memoryview, sizes: Sequence[int]) -> KernelResult:
    if not record.flag("ok"):
        error = visible(record.optional_text("error", MAX_ERROR) or "failed", 500)
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
