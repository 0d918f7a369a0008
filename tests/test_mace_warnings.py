""""MACE will not use this cache": the warnings push and collect give per board, each with its reason, and
the verdict's reuse rules as MACE master has them (opencl_executor.cc). Pure: fingerprints in, lines out;
tests/test_mace_programs.py sees them on a real fleet, tests/test_mace_runtime.py against the real libmace."""

from __future__ import annotations

from typing import Any

import pytest

from deployer.cache.mace import (
    DEVICE_NAME_KEY,
    PLATFORM_INFO_KEY,
    WILL_NOT_USE,
    encode_mace_pb,
    mace_split_version,
    mace_verdict,
    mace_warnings,
    parse_cache,
)

POCL_VERSION = "OpenCL 3.0 PoCL 3.1+debian  Linux, None+Asserts, RELOC, SPIR, LLVM 15.0.6, SLEEF, DISTRO, POCL_DEBUG"


def fingerprint(device: str, device_version: str, platform_version: str, types: list[str] | None = None) -> dict[
        str, Any]:
    return {"platform": {"name": "Some Platform", "profile": "FULL_PROFILE", "version": platform_version},
            "device": {"name": device, "version": device_version, "type": types or ["GPU"]}}


MALI = fingerprint("Mali-G610", "OpenCL 3.0 v1.r40p0", "OpenCL 3.0 v1.r40p0")
MALI_20 = fingerprint("Mali-G52", "OpenCL 2.0 v1.r20p0", "OpenCL 2.0 v1.r20p0")
NVIDIA = fingerprint("NVIDIA GeForce RTX 3060", "OpenCL 3.0 CUDA", "OpenCL 3.0 CUDA 12.2.148")
POCL_CPU = fingerprint("pthread-haswell", "OpenCL 3.0 PoCL HSTR: pthread", POCL_VERSION, ["CPU"])
POCL_SHIM = fingerprint("PowerVR pthread-haswell", "OpenCL 3.0 PoCL HSTR: pthread", POCL_VERSION)


@pytest.mark.parametrize(("fp", "fmt", "reasons"), [
    (MALI, "pb", []),
    (MALI_20, "legacy", []),
    (MALI, "legacy", ["MACE v1.0.x refuses OpenCL 3.0 devices, and this one says 'OpenCL 3.0 v1.r40p0'"]),
    (NVIDIA, "pb", ["records a device name only for Adreno, Mali and PowerVR GPUs; on 'NVIDIA GeForce RTX 3060' "
                    "the name is empty, so MACE clears the cache at every start"]),
    (POCL_CPU, "pb", ["MACE runs only on GPU devices, and 'pthread-haswell' is a CPU device",
                      "on 'pthread-haswell' the name is empty",
                      "splits the platform entry on ',' and compares field 2 ('OpenCL 3.0 PoCL 3.1+debian  Linux') "
                      "with the platform version"]),
    (POCL_SHIM, "pb", ["if the app's MaceVersion() is not 'v1-app' or the driver changes"]),
], ids=["mali", "mali-opencl2-v1.0", "mali-opencl3-v1.0", "nvidia", "pocl-cpu", "pocl-through-the-shim"])
def test_warnings(fp: dict[str, Any], fmt: str, reasons: list[str]) -> None:
    warnings = mace_warnings(fp, mace_format=fmt, mace_version="v1-app")
    assert len(warnings) == len(reasons), warnings
    for warning, reason in zip(warnings, reasons, strict=True):
        assert warning.startswith(WILL_NOT_USE) and reason in warning, warning


def test_split_version_is_maces() -> None:
    assert mace_split_version("ARM Platform, FULL_PROFILE, OpenCL 3.0 v1.r40p0, v1.1.1") == "OpenCL 3.0 v1.r40p0"
    assert mace_split_version(f"Portable Computing Language, FULL_PROFILE, {POCL_VERSION}, v1") == \
        "OpenCL 3.0 PoCL 3.1+debian  Linux"
    assert mace_split_version("no commas") is None


def cache_for(fp: dict[str, Any], mace_version: str, device_name: str | None = None) -> bytes:
    platform = fp["platform"]
    info = f"{platform['name']}, {platform['profile']}, {platform['version']}, {mace_version}"
    return encode_mace_pb([(PLATFORM_INFO_KEY, info.encode()),
                           (DEVICE_NAME_KEY, (device_name or fp["device"]["name"]).encode()),
                           ("p -DX", b"binary"), ("program_hash_ p -DX", b"0123456789")])


@pytest.mark.parametrize(("fp", "written_by", "app", "policy", "warm", "words"), [
    (MALI, "v1", None, "same", True, "compatible"),  # the app that wrote it
    (MALI, "v1", "v1", "none", True, "compatible"),
    (MALI, "v1", "v2", "same", True, "compatible"),  # same GPU, platform version equal: REUSE_SAME_GPU keeps it
    (MALI, "v1", "v2", "none", False, "REUSE_NONE discards"),
    (POCL_SHIM, "v1", "v1", "same", True, "compatible"),
    (POCL_SHIM, "v1", "v2", "same", False, "field 2 of the entry split on ','"),  # commas: never compatible
    (POCL_SHIM, "v1", "v2", "none", False, "REUSE_NONE discards"),
], ids=["own", "own-none", "other-app-same", "other-app-none", "pocl-own", "pocl-other-app-same",
        "pocl-other-app-none"])
def test_verdict_follows_maces_reuse_rules(fp: dict[str, Any], written_by: str, app: str | None, policy: str,
                                          warm: bool, words: str) -> None:
    verdict = mace_verdict(parse_cache(cache_for(fp, written_by)), fp, mace_version=app, policy=policy)
    assert verdict.warm is warm and words in verdict.reason, verdict


def test_verdict_other_gpu_and_unnamed_gpu() -> None:
    other = mace_verdict(parse_cache(cache_for(MALI, "v1", device_name="Mali-G52")), MALI)
    assert not other.warm and "device-name entry 'Mali-G52'" in other.reason
    unnamed = mace_verdict(parse_cache(cache_for(NVIDIA, "v1", device_name="")), NVIDIA)
    assert not unnamed.warm and "empty on GPUs other than Adreno, Mali, PowerVR" in unnamed.reason
