"""MACE's OpenCL cache file on the controller side: reading what devices and apps wrote.

The encoder and the key/hash rules live in `agent_main` (the agent writes the file on the device) and are
re-used here, so both sides follow one definition. Format and MACE's rules: docs/mace.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# MACE compares the whole platform string, MaceVersion() included: DEFAULT_MACE_VERSION must match the
# app's libmace (re-exported here).
from deployer import DEFAULT_MACE_VERSION
from deployer.remote.mace import (
    DEVICE_NAME_KEY,
    PLATFORM_INFO_KEY,
    decode_any,
    decode_mace_legacy,
    decode_mace_pb,
    encode_mace_legacy,
    encode_mace_pb,
    mace_device_name,
    mace_platform_info,
    mace_program_hash,
    mace_program_key,
)

PROGRAM_HASH_PREFIX = "program_hash_ "

__all__ = [
    "DEFAULT_MACE_VERSION", "DEVICE_NAME_KEY", "PLATFORM_INFO_KEY", "MaceCache", "decode_mace_pb",
    "encode_mace_pb", "mace_program_hash", "mace_program_key", "parse_cache", "decode_any", "encode_legacy",
    "decode_legacy", "binary_kind", "mace_verdict", "Verdict", "mace_warnings", "mace_split_version", "POLICIES",
    "WILL_NOT_USE", "mace_device_name",
]


FORMATS = ("pb", "legacy")


@dataclass(frozen=True, slots=True)
class MaceCache:
    programs: dict[str, bytes]
    hashes: dict[str, str]
    platform_info: str | None
    device_name: str | None
    format: str = "pb"


encode_legacy, decode_legacy = encode_mace_legacy, decode_mace_legacy


def parse_cache(data: bytes, *, fmt: str | None = None) -> MaceCache:
    """Split a cache file into programs and MACE's bookkeeping entries (ValueError if malformed)."""
    if fmt is None:
        fmt, pairs = decode_any(data)
    else:
        pairs = decode_mace_pb(data) if fmt == "pb" else decode_legacy(data)
    programs: dict[str, bytes] = {}
    hashes: dict[str, str] = {}
    platform = device = None
    for key, value in pairs:
        if key == PLATFORM_INFO_KEY:
            platform = value.decode("utf-8", "replace")
        elif key == DEVICE_NAME_KEY:
            device = value.decode("utf-8", "replace")
        elif key.startswith(PROGRAM_HASH_PREFIX):
            hashes.setdefault(key[len(PROGRAM_HASH_PREFIX):], value.decode("ascii", "replace"))
        else:
            programs.setdefault(key, value)  # MACE: the first pair of a key wins
    return MaceCache(programs, hashes, platform, device, fmt)


def binary_kind(binary: bytes) -> str:
    """What a driver put in CL_PROGRAM_BINARIES, as far as its first bytes tell."""
    if binary.startswith(b"poclbin"):
        return "poclbin"
    if binary.startswith(b"\x7fELF"):
        return "ELF"
    head = binary[:4096]
    if b".target" in head and (b".version" in head or head.lstrip().startswith(b"//")):
        return "PTX"
    return "opaque"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Would MACE start warm with this file on this device? (format note, section 5)."""

    warm: bool
    reason: str
    drift: bool  # the device's driver changed since the file was written (as far as the file tells)
    drift_reason: str

    def to_json(self) -> dict[str, Any]:
        return {"mace": "warm" if self.warm else "cold", "reason": self.reason,
                "drift": self.drift, "drift_reason": self.drift_reason}


def _split_platform_info(info: str, name: str, profile: str) -> tuple[str, str] | None:
    """(CL_PLATFORM_VERSION, MaceVersion) of a platform entry written for this platform name and
    profile; None if it names another platform. The version may itself contain ', '."""
    prefix = f"{name}, {profile}, "
    if not info.startswith(prefix) or ", " not in info[len(prefix):]:
        return None
    version, mace_version = info[len(prefix):].rsplit(", ", 1)
    return version, mace_version


def _adreno_compatible(cached: str, current: str) -> bool:
    """MACE's REUSE_SAME_GPU rule on Adreno: the same `Remote Branch:`, or a driver `Date:` not older."""
    def token(text: str, label: str) -> str | None:
        match = re.search(label + r"\s*([^\s,]+)", text)
        return match.group(1) if match else None

    branch = token(cached, "Remote Branch:")
    if branch is not None and branch == token(current, "Remote Branch:"):
        return True
    cached_date, current_date = token(cached, "Date:"), token(current, "Date:")
    return cached_date is not None and current_date is not None and current_date >= cached_date


def mace_split_version(platform_info: str) -> str | None:
    """What MACE's REUSE_SAME_GPU rule reads as the platform version of a platform entry (`IsCacheCompatible`):
    field 2 of the entry split on ',', stripped; None without 3 fields. A version with commas in it (PoCL's)
    is cut at its first comma, so it never equals the device's CL_PLATFORM_VERSION."""
    parts = platform_info.split(",")
    return parts[2].strip() if len(parts) >= 3 else None


POLICIES = ("same", "none")  # MACE's OpenCLCacheReusePolicy: REUSE_SAME_GPU (the default), REUSE_NONE


def mace_verdict(cache: MaceCache, fingerprint: Mapping[str, Any], *, mace_version: str | None = None,
                 policy: str = "same") -> Verdict:
    """MACE's own rules (v1.1+ for pb files, v1.0 for legacy ones) for an app whose MaceVersion() is
    `mace_version` (None: the one the file names, i.e. the app that wrote it) under reuse `policy`."""
    platform, device = fingerprint.get("platform", {}), fingerprint.get("device", {})
    name, profile, version = (str(platform.get(k, "")) for k in ("name", "profile", "version"))
    parts = _split_platform_info(cache.platform_info, name, profile) if cache.platform_info else None
    drift = parts is not None and parts[0] != version
    drift_reason = (f"written under platform version {parts[0]!r}, the device now has {version!r}"
                    if parts is not None and drift else "")
    if cache.platform_info is not None and parts is None:
        drift, drift_reason = True, f"written for another platform: {cache.platform_info!r}"
    if not cache.programs:
        return Verdict(False, "no compiled programs in the file", drift, drift_reason)
    if cache.platform_info is None:
        return Verdict(True, "no platform entry: MACE keeps the file without any check", drift, drift_reason)
    app_version = mace_version if mace_version is not None else cache.platform_info.rsplit(", ", 1)[-1]
    current = mace_platform_info(name, profile, version, app_version)
    if cache.format == "legacy":
        warm = cache.platform_info == current
        why = "same platform string (v1.0 keeps the file only then)" if warm else \
            "platform string differs: MACE v1.0 discards the whole cache"
        return Verdict(warm, why, drift, drift_reason)
    return _v11_verdict(cache, device, version, current, policy, drift, drift_reason)


def _v11_verdict(cache: MaceCache, device: Mapping[str, Any], version: str, current: str, policy: str,
                 drift: bool, drift_reason: str) -> Verdict:
    device_name = str(device.get("name", ""))
    current_name = mace_device_name(device_name, str(device.get("version", "")))
    cached_name = cache.device_name or ""
    if not cached_name or not current_name or cached_name != current_name:
        why = (f"device-name entry {cached_name!r} vs this GPU's {current_name!r}: MACE discards the whole "
               "cache (it needs both, equal; they are empty on GPUs other than Adreno, Mali, PowerVR)")
        return Verdict(False, why, drift, drift_reason)
    assert cache.platform_info is not None
    if cache.platform_info != current:
        if policy == "none":
            return Verdict(False, f"platform entry {cache.platform_info!r} is not this device's {current!r}: "
                                  "REUSE_NONE discards the cache", drift, drift_reason)
        cached_version = mace_split_version(cache.platform_info) or ""
        adreno = device_name == "QUALCOMM Adreno(TM)"
        compatible = _adreno_compatible(cached_version, version) if adreno else \
            bool(version) and cached_version == version
        if not compatible:
            return Verdict(False, f"platform entry differs and REUSE_SAME_GPU finds it incompatible: it compares "
                                  f"field 2 of the entry split on ',' ({cached_version!r}) with the platform "
                                  f"version {version!r}: MACE discards the cache", drift, drift_reason)
    missing = sorted(k for k in cache.programs if k not in cache.hashes)
    if missing:
        return Verdict(False, f"no program_hash_ entry for {len(missing)} program(s), e.g. {missing[0]!r}: "
                              "MACE rebuilds them", drift, drift_reason)
    return Verdict(True, "device name and platform compatible; programs are used if their program_hash_ "
                         "entries match the app's libmace", drift, drift_reason)


WILL_NOT_USE = "MACE will not use this cache"


def mace_warnings(fingerprint: Mapping[str, Any], *, mace_format: str, mace_version: str) -> list[str]:
    """Why MACE will not use a cache file written for this device (by us, or by an app of `mace_version`),
    whatever the file holds: each a line starting "MACE will not use this cache"."""
    platform, device = fingerprint.get("platform", {}), fingerprint.get("device", {})
    name, profile, version = (str(platform.get(k, "")) for k in ("name", "profile", "version"))
    device_name, device_version = str(device.get("name", "")), str(device.get("version", ""))
    warnings = []
    if "GPU" not in device.get("type", ["GPU"]):
        warnings.append(f"{WILL_NOT_USE}: MACE runs only on GPU devices, and {device_name!r} is a "
                        f"{'/'.join(device.get('type', []))} device (MACE finds no GPU there)")
    if mace_format == "legacy":
        words = device_version.split(" ")
        if len(words) > 1 and words[1] == "3.0":
            warnings.append(f"{WILL_NOT_USE}: MACE v1.0.x refuses OpenCL 3.0 devices, and this one says "
                            f"{device_version!r}")
        return warnings
    if not mace_device_name(device_name, device_version):
        warnings.append(f"{WILL_NOT_USE}: MACE v1.1+ records a device name only for Adreno, Mali and PowerVR "
                        f"GPUs; on {device_name!r} the name is empty, so MACE clears the cache at every start "
                        "(the file still serves as MACE's precompiled binary: SetOpenCLBinaryPaths)")
    field = mace_split_version(mace_platform_info(name, profile, version, mace_version))
    if field != version:
        warnings.append(f"{WILL_NOT_USE} if the app's MaceVersion() is not {mace_version!r} or the driver "
                        f"changes: MACE's REUSE_SAME_GPU rule splits the platform entry on ',' and compares "
                        f"field 2 ({field!r}) with the platform version {version!r}, which never matches")
    return warnings
