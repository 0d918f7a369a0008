"""The shell's no-op, the controller's side (docs/design.md section 11): an up-to-date board answers a push
from its shell, and no Python starts there.

The controller keeps, per device, what the last push left there: the manifest, the fingerprint and the cache
file in the local cache. A push whose plan made from those records (as if the board had answered `state`
with them) changes nothing offers a *token*: a hash of the records and of what this push would deploy. The
board's shell compares it with the line its agent wrote when a push last armed it (remote/noop.py), together
with `current`'s target and a probe of its driver; on a match it prints the release id and exits, and the
push reports the device from the records. A push that went through the agent and left the board as its
records say arms the board for the next one. The inventory's `env` is not in the token (the token goes on
a command line, and `env` may hold secrets): a salted digest of it stays in the local record, and a push
whose `env` differs offers nothing.

The push's side of it (`noop_offer`, `arm_stage`) is here too; tasks/push.py passes its `settle` in, so this
module needs nothing of push.py at run time.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployer.cache.store import CACHE_FILE, FINGERPRINT_FILE, MANIFEST_FILE, device_dir, read_json, write_json
from deployer.config.inventory import Device
from deployer.errors import AgentError, LocalStateError
from deployer.protocol.bundle import agent_bundle
from deployer.protocol.reply import Reply
from deployer.protocol.session import AgentSession
from deployer.tasks.plan import LocalFile, RemoteState, parse_state

if TYPE_CHECKING:  # push.py imports this module: its types only, for the annotations
    from deployer.tasks.push import Built, Planned, PushContext, PushJob

    Settle = Callable[[PushContext, RemoteState, dict[str, Any]], Planned]  # push.settle

RECORD_FILE = "noop.json"  # in the device's local folder: the token the board was armed with, the env digest


@dataclass(frozen=True, slots=True)
class Records:
    """What the local cache says the device holds: its manifest, fingerprint and cache file's sha256."""

    manifest: Mapping[str, Any]
    fingerprint: dict[str, Any]
    cache_sha256: str


def local_records(cache: Path, device: str) -> Records | None:
    """The device's records in the local cache; None when any is missing or unreadable."""
    try:
        folder = device_dir(cache, device)
        manifest, fingerprint = read_json(folder / MANIFEST_FILE), read_json(folder / FINGERPRINT_FILE)
        data = (folder / CACHE_FILE).read_bytes()
    except (OSError, LocalStateError):
        return None
    if not isinstance(manifest, dict) or not isinstance(fingerprint, dict) or not fingerprint.get("id"):
        return None
    return Records(manifest, fingerprint, hashlib.sha256(data).hexdigest())


def as_state(records: Records, files: tuple[LocalFile, ...], current: str) -> RemoteState:
    """The `state` the board would answer if it holds what the records say and this push's files, read by
    the same parser as the board's answer."""
    index = {f.remote: {"size": f.size, "sha256": f.sha256} for f in files}
    document = {"current": current, "files": index, "manifest": records.manifest,
                "fingerprint": records.fingerprint, "blobs": []}
    return parse_state(Reply({}, json.dumps(document).encode()))


def token(device: Device, files: tuple[LocalFile, ...], build_keys: Mapping[str, str], records: Records) -> str:
    """A hash of the records and of everything this push would deploy that they do not already name."""
    programs = sorted((str(p.get("key")), str(p.get("build_key")), str(p.get("sha256")))
                      for p in records.manifest.get("programs") or [] if isinstance(p, dict))
    parts = {"agent": agent_bundle().id, "opencl": device.opencl.as_request(),
             "files": sorted((f.remote, f.size, f.sha256, f.mode) for f in files),
             "build_keys": sorted(build_keys.items()), "programs": programs, "cache": records.cache_sha256,
             "mace": [records.manifest.get("mace_version"), records.manifest.get("mace_format")],
             "fingerprint": records.fingerprint.get("id")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _env_digest(env: Mapping[str, str], salt: str) -> str:
    return hashlib.sha256((salt + json.dumps(sorted(env.items()))).encode()).hexdigest()


def armed_token(cache: Path, device: Device) -> str | None:
    """The token this controller armed the device with, if the inventory's `env` is still the same."""
    try:
        record = read_json(device_dir(cache, device.name) / RECORD_FILE)
    except LocalStateError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("salt"), str):
        return None
    if record.get("env") != _env_digest(device.env, record["salt"]):
        return None
    value = record.get("token")
    return value if isinstance(value, str) else None


def forget(cache: Path, device: str) -> None:
    try:
        (device_dir(cache, device) / RECORD_FILE).unlink(missing_ok=True)
    except (OSError, LocalStateError):
        pass  # the board's own line decides; a stale record only costs one offer


def arm(session: AgentSession, cache: Path, device: Device, value: str, current: str) -> None:
    """Ask the board to store `value` for its current release, then keep it in the local record. A board
    that cannot arm (no `cksum`, the lock held, a driver changed meanwhile) goes on without it."""
    forget(cache, device.name)
    try:
        reply = session.request("noop", token=value, current=current, opencl=device.opencl.as_request())
    except AgentError:
        return  # only a slower next no-op: the push itself succeeded
    if reply.fields.get("armed") is not True:
        return
    salt = secrets.token_hex(16)
    try:
        write_json(device_dir(cache, device.name) / RECORD_FILE,
                   {"token": value, "salt": salt, "env": _env_digest(device.env, salt)})
    except LocalStateError:
        pass


# ----- the push: offered from the local records, armed after a push through the agent -----


@dataclass(frozen=True, slots=True)
class NoopOffer:
    token: str
    planned: Planned  # settled from the local records with current "?": `Planned.at` puts the board's answer in


def noop_allowed(job: PushJob) -> bool:
    """A push whose no-op runs nothing on the board: smoke `changed` or `never`, no check, bench or smoke step."""
    return not (job.check or job.smoke_only or job.bench is not None) and job.smoke_mode in ("changed", "never")


def _planned_from_records(context: PushContext, settle: Settle, records: Records, current: str) -> Planned | None:
    """The plan the records make, when it is a no-op whose cache file the local cache holds; else None."""
    planned = settle(context, as_state(records, context.job.files, current), records.fingerprint)
    if planned.plan.new_release or planned.state.cache_sha256 != records.cache_sha256:
        return None
    return planned


def noop_offer(context: PushContext, settle: Settle) -> NoopOffer | None:
    """The token to offer the board's shell: the one it was armed with, when the local records of the device
    still make a no-op of this push."""
    job, device = context.job, context.device
    armed = armed_token(job.cache, device) if noop_allowed(job) else None
    records = local_records(job.cache, device.name) if armed else None
    # current: "?" until the board answers (Planned.at puts its answer in)
    planned = _planned_from_records(context, settle, records, "?") if records else None
    if armed is None or records is None or planned is None:
        return None
    return NoopOffer(armed, planned) if token(device, job.files, planned.build_keys, records) == armed else None


def arm_stage(context: PushContext, settle: Settle, session: AgentSession, planned: Planned, built: Built) -> None:
    """After a push through the agent: arm the board when the local records now describe it (their plan is
    a no-op for this push, their cache file is the board's), so the next no-op is the shell's."""
    job, device, outcome = context.job, context.device, context.outcome
    records = local_records(job.cache, device.name)
    current = outcome.release
    replanned = _planned_from_records(context, settle, records, current) if records is not None and current else None
    if records is None or replanned is None or current is None or records.cache_sha256 != built.cache_sha256 \
            or records.fingerprint.get("id") != planned.fingerprint.get("id"):
        forget(job.cache, device.name)
        return
    arm(session, job.cache, device, token(device, job.files, replanned.build_keys, records), current)
