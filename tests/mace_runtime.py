"""A real MACE runtime for the tests: libmace built from ../shared/third_party by scripts/build_mace.sh, the
project's probe (tests/mace/probe.cc) and the OpenCL shim (tests/mace/shim.c) that shows PoCL to MACE as a
PowerVR GPU.

`built_mace()` builds once per run (the script returns at once when its folder is up to date) and skips the
calling tests with the reason when the sources are absent or the build fails, unless DEPLOYER_REQUIRE_MACE=1
(`.ci/run` sets it): then either is a failure. `run_probe` runs the probe as an app on a board would start:
under that board's driver configuration, with its cache at a path, and returns what MACE said.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from deployer.sim.fleet import MACE_POCL_ENV

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "scripts" / "build_mace.sh"
BUILD_DIR = Path(os.environ.get("DEPLOYER_MACE_BUILD", REPO / ".build" / "mace"))
MISSING_SOURCES = 4  # build_mace.sh's exit code when ../shared/third_party/mace is absent
# The app's driver configuration is the sim boards' (deployer.sim.fleet.MACE_POCL_ENV says why).
MACE_DRIVER_ENV = dict(MACE_POCL_ENV)


@dataclass(frozen=True)
class Mace:
    folder: Path

    @property
    def probe(self) -> Path:
        return self.folder / "probe"

    @property
    def shim(self) -> Path:
        return self.folder / "shim" / "libOpenCL.so"

    @property
    def kernels(self) -> Path:
        """MACE's OpenCL kernel folder of the copy this libmace was built from (its program hashes)."""
        return self.folder / "src" / "mace" / "mace" / "ops" / "opencl" / "cl"


@cache
def _build() -> tuple[Mace | None, str]:
    try:
        result = subprocess.run(["bash", str(BUILD_SCRIPT), str(BUILD_DIR)], capture_output=True, text=True,
                                timeout=1700)
    except subprocess.TimeoutExpired:
        return None, "scripts/build_mace.sh did not finish within 1700 s"
    if result.returncode == 0:
        return Mace(BUILD_DIR), ""
    tail = "\n".join(result.stderr.strip().splitlines()[-15:])
    if result.returncode == MISSING_SOURCES:
        return None, f"no MACE sources (../shared/third_party/mace): {tail}"
    return None, f"scripts/build_mace.sh failed (exit {result.returncode}): {tail}"


def built_mace() -> Mace:
    mace, why = _build()
    if mace is None:
        if os.environ.get("DEPLOYER_REQUIRE_MACE") == "1":
            pytest.fail(f"DEPLOYER_REQUIRE_MACE=1 and {why}", pytrace=False)
        pytest.skip(why)
    return mace


def app_with_kernels(mace: Mace, kernels: Path, dest: Path) -> Mace:
    """The probe as an app whose libmace embeds the kernel sources of `kernels` (a changed copy of
    `mace.kernels`): `Mace` whose `probe` is `dest`, all else shared."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT), "--app-kernels", str(kernels), str(dest), str(mace.folder)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return AppMace(mace.folder, dest)


@dataclass(frozen=True)
class AppMace(Mace):
    app_probe: Path

    @property
    def probe(self) -> Path:
        return self.app_probe


@dataclass(frozen=True)
class ProbeRun:
    """The probe's JSON line and MACE's log (stderr)."""

    code: int
    report: dict[str, Any]
    log: str

    def programs(self, origin: str) -> list[str]:
        """Program keys MACE logged as taken from `origin`: cache, precompiled, source, cache_failed."""
        return list(self.report[origin])

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.report.get("ok") is True


def probe_env(mace: Mace, pocl_device: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an app on a simulated board of that PoCL device, seeing it through the shim."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCL_", "OPENCL_SHIM_", "MACE_"))}
    env.update(MACE_DRIVER_ENV)
    env["POCL_DEVICES"] = pocl_device
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(mace.shim.parent), os.environ.get("LD_LIBRARY_PATH")]))
    env.update(extra or {})
    return env


def run_probe(mace: Mace, cache_file: Path, *, pocl_device: str = "pthread", policy: str = "same",
              binary: Path | None = None, net: str = "full", env: Mapping[str, str] | None = None) -> ProbeRun:
    argv = [str(mace.probe), "--cache", str(cache_file), "--policy", policy, "--net", net]
    if binary is not None:
        argv += ["--binary", str(binary)]
    result = subprocess.run(argv, capture_output=True, text=True, env=probe_env(mace, pocl_device, env), timeout=300)
    # MACE writes its log with printf: lines after the report (its destructors) reach stdout too.
    line = next((x for x in result.stdout.splitlines() if x.startswith('{"ok"')), "")
    try:
        report = json.loads(line)
    except ValueError:
        raise AssertionError(f"the probe said no JSON (exit {result.returncode}): {result.stdout[-500:]} "
                             f"{result.stderr[-2000:]}") from None
    return ProbeRun(result.returncode, report, result.stderr + result.stdout)
