"""Validate deployer on a real GPU driver (NVIDIA OpenCL) beside PoCL, on one machine.

Run by bench/gpu_validate.sh on the accelerator machine. Through the `local` transport (the same agent
and protocol as over SSH) for each driver: fingerprint, compile the whole kernel library, write the MACE
cache, smoke-test every kernel and the tiny model from the binaries, and take start-up figures with the
drivers' own kernel caches off. Then it hands each driver the other's cache (the staleness check refuses
it; the driver itself, given the bytes, refuses them cleanly), and times a 2048^3 GEMM against the launch
overhead of an empty kernel. Writes one JSON per driver and a summary to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DRIVERS = {"nvidia": "NVIDIA", "pocl": "Portable Computing Language"}


def deploy(*args: str) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "deployer", *args], capture_output=True, text=True, cwd=REPO)
    return result.returncode, result.stdout, result.stderr


def write_inventory(work: Path, vendors: str) -> Path:
    import yaml

    devices = [{"name": name, "host": "local", "remote_dir": str(work / "remote" / name),
                "opencl": {"platform": platform},
                # the drivers' own caches off: every build below is a real build
                "env": {"OCL_ICD_VENDORS": vendors, "CUDA_CACHE_DISABLE": "1", "POCL_KERNEL_CACHE": "0"}}
               for name, platform in DRIVERS.items()]
    path = work / "local.yml"
    path.write_text(yaml.safe_dump({"devices": devices}, sort_keys=False))
    return path


def driver_slug(device: dict[str, Any]) -> str:
    fingerprint = device.get("fingerprint") or {}
    platform = (fingerprint.get("platform") or {}).get("name", device["name"])
    driver = (fingerprint.get("device") or {}).get("driver_version", "unknown")
    vendor = "nvidia" if "NVIDIA" in platform else "pocl" if "Portable" in platform else device["name"]
    return f"{vendor}-{driver}".replace(" ", "_").replace("/", "_").replace("+", "_")


def cross_feed(inventory: Path, cache: Path, work: Path) -> list[dict[str, Any]]:
    """Each driver given the other's cache file: refused by the fingerprint check (cache install), and
    refused by the driver itself when the bytes reach it anyway (smoke on the foreign file)."""
    from deployer.cache.mace import parse_cache
    from deployer.config.inventory import load_inventory
    from deployer.config.kernels import load_library
    from deployer.protocol.session import open_session
    from deployer.tasks.push import check_cases
    from deployer.tasks.smoke import load_references, plan_smoke

    devices = {d.name: d for d in load_inventory(inventory).devices}
    library = load_library(REPO / "kernels")
    plan = plan_smoke(library, load_references(library))
    results = []
    for target, source in (("nvidia", "pocl"), ("pocl", "nvidia")):
        swapped = work / f"swapped-{target}"
        (swapped / target).mkdir(parents=True, exist_ok=True)
        for name in ("mace_cl_compiled_program.bin", "manifest.json", "fingerprints.jsonl"):
            (swapped / target / name).write_bytes((cache / source / name).read_bytes())
        code, out, err = deploy("cache", "install", "--fleet", str(inventory), "--limit", target, "--cache",
                                str(swapped), "--to", str(work / f"app-{target}" / "mace_cl_compiled_program.bin"))
        data = (cache / source / "mace_cl_compiled_program.bin").read_bytes()
        programs = parse_cache(data).programs
        expected = {k: hashlib.sha256(v).hexdigest() for k, v in programs.items()}
        cases = [c for c in plan.requests() if c["program_key"] in expected][:3]
        with open_session(devices[target]) as session:
            session.request("begin", release=f"foreign-{int(time.time())}")
            session.request("put", data, path="build/foreign.bin", size=len(data),
                            sha256=hashlib.sha256(data).hexdigest(), mode=0o644)
            try:
                reply = session.request("smoke", bytes(plan.payload), opencl={"platform": DRIVERS[target]},
                                        cache_file="build/foreign.bin", expected=expected, cases=cases,
                                        timeout_s=300)
                verdicts = [(k.name, k.smoke, k.detail) for k in check_cases(plan, reply) if k.name in
                            {c["id"] for c in cases}]
                driver = {"load_errors": reply.fields.get("load_errors"), "cases": verdicts}
            except Exception as exc:  # the report records what happened, whatever it was
                driver = {"error": str(exc)}
        results.append({"target": target, "cache_from": source, "install_exit": code,
                        "install_says": out.strip() or err.strip(), "driver_given_bytes": driver})
    return results


def gemm_timing(platform_name: str, size: int) -> dict[str, Any]:
    """Kernel time of the library's tiled GEMM at size^3 vs the launch overhead of an empty kernel."""
    import numpy as np
    import pyopencl as cl

    platform = next(p for p in cl.get_platforms() if platform_name in p.name)
    device = platform.get_devices()[0]
    ctx = cl.Context([device])
    queue = cl.CommandQueue(ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
    source = (REPO / "kernels" / "matmul.cl").read_text()
    program = cl.Program(ctx, source + "\n__kernel void empty(void) {}\n").build(
        options=["-DDATA_TYPE=float", "-DTILE=16", f"-I{REPO / 'kernels'}"])
    rng = np.random.default_rng(1)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    mf = cl.mem_flags
    da = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=a)
    db = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=b)
    dc = cl.Buffer(ctx, mf.WRITE_ONLY, a.nbytes)
    n = np.int32(size)

    def run_gemm() -> float:
        event = program.matmul(queue, (size, size), (16, 16), da, db, dc, n, n, n)
        event.wait()
        return (event.profile.end - event.profile.start) * 1e-9

    def run_empty() -> float:
        start = time.perf_counter()
        program.empty(queue, (1,), None).wait()
        return time.perf_counter() - start

    run_gemm(), run_empty()  # warm-up
    gemm = min(run_gemm() for _ in range(5))
    empty = sorted(run_empty() for _ in range(50))[25]
    c = np.empty_like(a)
    cl.enqueue_copy(queue, c, dc)
    error = float(np.abs(c[:64, :64] - (a[:64] @ b[:, :64])).max())
    return {"device": device.name, "size": size, "kernel_ms": gemm * 1e3, "launch_overhead_ms": empty * 1e3,
            "ratio": gemm / empty, "gflops": 2 * size**3 / gemm / 1e9, "max_abs_error_64x64": error}


def _binary_kinds(cache_file: Path) -> dict[str, int]:
    """How many programs of each binary kind (poclbin, PTX, ELF, opaque) the driver produced."""
    from deployer.cache.mace import binary_kind, parse_cache

    if not cache_file.exists():
        return {}
    kinds: dict[str, int] = {}
    for binary in parse_cache(cache_file.read_bytes()).programs.values():
        kinds[binary_kind(binary)] = kinds.get(binary_kind(binary), 0) + 1
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-validate"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    inventory = write_inventory(args.work, os.environ["OCL_ICD_VENDORS"])
    cache = args.work / "cache"
    start = time.perf_counter()
    code, out, err = deploy("push", "--fleet", str(inventory), "--cache", str(cache), "--json",
                            "--model", str(REPO / "models" / "tiny_cnn.npz"))
    wall = time.perf_counter() - start
    print(err[-3000:], file=sys.stderr)
    report = json.loads(out)
    summary: dict[str, Any] = {"push_exit": code, "push_wall_s": wall, "drivers": {}}
    for device in report["devices"]:
        slug = driver_slug(device)
        (args.out / f"{slug}.json").write_text(json.dumps(device, indent=1))
        cache_file = cache / device["name"] / "mace_cl_compiled_program.bin"
        summary["drivers"][slug] = {
            "ok": device["ok"], "error": device["error"], "fingerprint_id": (device["fingerprint"] or {}).get("id"),
            "cache_bytes": cache_file.stat().st_size if cache_file.exists() else None,
            "binary_kinds": _binary_kinds(cache_file),
            "smoke": {k["name"]: k["smoke"] for k in device["kernels"]},
            "models": device.get("models"), "startup": device.get("startup"), "stages": device["stages"],
        }
    if all(d["ok"] for d in report["devices"]):
        summary["cross_feed"] = cross_feed(inventory, cache, args.work)
    for name, platform in DRIVERS.items():
        size = 2048 if name == "nvidia" else 512
        try:
            summary[f"gemm_{name}"] = gemm_timing(platform, size)
        except Exception as exc:  # recorded, not fatal: the rest of the report still counts
            summary[f"gemm_{name}"] = {"error": repr(exc)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str)[:12000])
    return code


if __name__ == "__main__":
    sys.exit(main())
