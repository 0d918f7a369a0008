"""MACE start-up with and without deploy's cache, on the real libmace (scripts/build_mace.sh) and PoCL.

    PYTHONPATH=. .venv/bin/python bench/mace_startup.py [--repeats 7]      # as root (a sim board)

One simulated board behind the MACE test shim (`deploy sim up --opencl-library`). The app is the project's
probe (tests/mace/probe.cc: 5 programs). It runs once cold to name its programs; `deploy push
--mace-programs` builds them on the board and pulls the cache. Then, repeated and interleaved, the app
starts cold (no cache file) and warm (a fresh copy of the cache deploy pulled): MACE's Init plus its first
Run, where MACE builds or loads its programs, as the probe times them (steady clock, in process). PoCL's own
kernel cache is off in both (POCL_KERNEL_CACHE=0), as on a board without it. Per program, the figures of
deploy's own `startup` op on the board (that program from source vs from its binary, same driver).
Prints a Markdown table and a JSON line; the README quotes them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from deployer.cli.main import main as deploy
from deployer.sim.fleet import DeviceSpec, start_fleet
from tests.mace_runtime import BUILD_DIR, BUILD_SCRIPT, Mace, run_probe

NO_DRIVER_CACHE = {"POCL_KERNEL_CACHE": "0"}


def push(inventory: Path, cache: Path, src: Path, kernels: Path) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = deploy(["push", "--fleet", str(inventory), "--cache", str(cache), "--json", "--smoke", "always",
                       "--mace-programs", str(src), "--mace-kernels", str(kernels)])
    report: dict[str, Any] = json.loads(out.getvalue())
    if code != 0:
        raise SystemExit(f"deploy push failed: {json.dumps(report)[:2000]}")
    return report


def start_ms(mace: Mace, cache_file: Path, expect: str, keys: list[str]) -> float:
    run = run_probe(mace, cache_file, env=NO_DRIVER_CACHE)
    if not run.ok or sorted(run.programs(expect)) != sorted(keys):
        raise SystemExit(f"the probe did not start {expect!r}: {run.report}")
    return float(run.report["init_ms"]) + float(run.report["run_ms"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    subprocess.run(["bash", str(BUILD_SCRIPT), str(BUILD_DIR)], check=True, stdout=subprocess.DEVNULL)
    mace = Mace(BUILD_DIR)
    work = Path(tempfile.mkdtemp(prefix="mace-startup-"))
    fleet = start_fleet(work / "fleet", [DeviceSpec("sim-01")], opencl_library=str(mace.shim))
    try:
        inventory = yaml.safe_load(fleet.inventory.read_text())
        inventory["defaults"]["env"].update(NO_DRIVER_CACHE)
        fleet.inventory.write_text(yaml.safe_dump(inventory, sort_keys=False))
        src = work / "app.bin"
        keys = run_probe(mace, src, env=NO_DRIVER_CACHE).programs("source")
        report = push(fleet.inventory, work / "cache", src, mace.kernels)
        pushed = work / "cache" / "sim-01" / "mace_cl_compiled_program.bin"
        cold, warm = [], []
        for i in range(args.repeats):
            cold.append(start_ms(mace, work / f"none-{i}.bin", "source", keys))
            warm.append(start_ms(mace, Path(shutil.copyfile(pushed, work / f"warm-{i}.bin")), "cache", keys))
        programs = report["devices"][0]["startup"]["programs"]
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| | cold (no cache) | with deploy's cache | ratio |\n|---|---|---|---|\n"
          f"| MACE Init + first Run, {len(keys)} programs, median of {args.repeats} | {statistics.median(cold):.0f} ms "
          f"| {statistics.median(warm):.0f} ms | {statistics.median(cold) / statistics.median(warm):.1f}x |")
    print("\n| program (deploy's startup op on the board) | from source | from its binary |\n|---|---|---|")
    for p in programs:
        print(f"| `{p['key'].split(' -D')[0]} ...{p['key'][-24:]}` | {p['build_from_source_ms']:.0f} ms "
              f"| {p['load_from_binary_ms']:.1f} ms |")
    print(json.dumps({"cold_ms": cold, "warm_ms": warm, "programs": programs}))


if __name__ == "__main__":
    main()
