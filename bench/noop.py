#!/usr/bin/env python3
"""The parts of bench/push.py that issue 18 changes, runnable in minutes: the no-op against the `ssh true`
floor, the controller's CPU per device, and a cold push with build sharing on and off.

    PYTHONPATH=. .venv/bin/python bench/noop.py noop --devices 8 --rtt-ms 0 --reps 3
    PYTHONPATH=. .venv/bin/python bench/noop.py noop --devices 32 --rtt-ms 40 --reps 3
    PYTHONPATH=. .venv/bin/python bench/noop.py cold --devices 8 --shell # the shell baseline, sharing off, on

`noop`: the fleet is primed by one push of the library's first program (saxpy: see `saxpy_only`), then the floor
(`ssh true` to every device at once, fresh connections, bench/push.py's `write_floor`) and the no-op re-push
alternate `--reps` times, each a fresh process reaped by bench/push/spawn.py (wall, peak RSS, CPU seconds of
the process and every child it reaped: for the floor that is the N ssh clients) and the boards' CPU seconds
(see `account`). Medians are printed with the ratio no-op / floor, and the controller's CPU seconds per
device (CPU / N): run it at two N for the slope.

`cold`: the repo's kernel library and the 16 MiB model, drivers' caches off (POCL_KERNEL_CACHE=0), the
devices' `~/.deployer` and the local cache removed before each run; with `--shell`, bench/push.py's shell
baseline first (rsync, one ControlMaster connection per device, bench/push/compile.py); then deploy once with
the inventory as the sim
writes it, once with `share_builds: true`, then (sharing on) once more with `relu.cl` changed: its program
must be compiled once for the fleet. Board CPU seconds: each device's cgroup v1 `cpuacct` usage (its sshd,
sessions, agents and OpenCL children: see `account`), summed over the fleet; `origins` counts
the JSON's `origin` words (compiled, shared, from, reused) over devices and programs.

The controller is pinned to CPU 0 and the fleet to CPU 1, as in bench/push.py. Figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from push import (  # noqa: E402  (bench/push.py, beside this file)
    PYTHON,
    REPO,
    clear_devices,
    close_masters,
    deploy_argv,
    env_with_repo,
    hosts,
    make_payload,
    measure,
    remote_compile_s,
    start_fleet,
    write_floor,
    write_shell,
)

CPUACCT = Path("/sys/fs/cgroup/cpuacct")  # cgroup v1


def account(fleet: Any) -> list[Path]:
    """One cgroup v1 `cpuacct` group per device, holding its server and everything in its namespace: the
    processes it starts later (each session, the agent, the OpenCL children) inherit it, so the group's
    `cpuacct.usage` is the board's CPU, the compiles included. The proxies in front stay out."""
    from deployer.sim.fleet import namespace_pids
    groups = []
    for device in fleet.devices:
        group = CPUACCT / f"bench-noop-{os.getpid()}-{device.spec.name}"
        group.mkdir(exist_ok=True)
        for pid in [device.pid, *namespace_pids(device.pid)]:
            try:
                (group / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                pass  # ended meanwhile
        groups.append(group)
    return groups


def board_cpu_s(groups: list[Path]) -> float:
    """CPU seconds the boards spent so far (nanoseconds in `cpuacct.usage`), summed over the fleet."""
    return sum(int((g / "cpuacct.usage").read_text()) for g in groups) / 1e9


def release(groups: list[Path]) -> None:
    """After the fleet stopped: its groups are empty, and go."""
    for group in groups:
        try:
            group.rmdir()
        except OSError:
            pass


def start_primed_fleet(folder: Path, count: int, rtt_ms: int, pocl_cache: Path) -> Any:
    """bench/push.py's fleet (pinned to CPU 1, a proxy in front of each device), with one PoCL kernel cache
    shared by the devices: the priming push compiles each program once, not once per device. The no-op
    measured after it compiles nothing either way."""
    from deployer.sim import fleet as sim
    pocl_cache.mkdir(exist_ok=True)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})
    try:
        return sim.start_fleet(folder, sim.fleet_specs(count), rtt_ms=rtt_ms, proxy=True, pocl_cache=pocl_cache)
    finally:
        os.sched_setaffinity(0, before)


def saxpy_only(work: Path) -> Path:
    """The library cut to its first program: priming 32 boards with all 16 programs is 512 compiles on the one
    fleet core (past the 300 s request limit here), and a no-op's cost hardly depends on how many programs
    the release holds (its state reply grows by one manifest entry per program)."""
    folder = work / "saxpy-lib"
    shutil.copytree(REPO / "kernels", folder)
    manifest = (folder / "kernels.yml").read_text()
    (folder / "kernels.yml").write_text(manifest[: manifest.index("\n  relu:")] + "\n")
    return folder


def inventory(fleet: Any, work: Path, *, share: bool, cache_off: bool) -> Path:
    import yaml
    data = yaml.safe_load(fleet.inventory.read_text())
    if cache_off:
        data["defaults"]["env"] = {"POCL_KERNEL_CACHE": "0"}
    if share:
        data["defaults"]["share_builds"] = True
    path = work / f"inventory-{'share' if share else 'plain'}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_warm_floor(fleet: Any, work: Path) -> Path:
    """The floor through OpenSSH's ControlMaster: `ssh true` to every device at once on a connection kept open
    (ControlPersist) by the priming run."""
    control = work / "ctl"
    control.mkdir(exist_ok=True)
    return write_floor(fleet, work, ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}/%p",
                                     "-o", "ControlPersist=600"], name="floor-warm.sh")


def persisted(inventory: Path) -> Path:
    """The inventory with `ssh.persist`: deploy's connection master keeps each connection open."""
    import yaml
    data = yaml.safe_load(inventory.read_text())
    data["defaults"].setdefault("ssh", {})["persist"] = 600
    path = inventory.with_name(inventory.stem + "-persist.yml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process that is not ours to reap (a master), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ssh_master_pids(control: Path) -> list[int]:
    pids = []
    for sock in sorted(control.iterdir()):
        check = subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "check", "x"],
                               capture_output=True, text=True, timeout=15)
        found = re.search(r"pid=(\d+)", check.stderr)
        if found:
            pids.append(int(found.group(1)))
    return pids


def _deploy_master(env: dict[str, str]) -> tuple[Path, str]:
    os.environ["DEPLOY_MUX_DIR"] = env["DEPLOY_MUX_DIR"]
    from deployer.connect import muxwire
    digest = muxwire.code_digest()
    return muxwire.socket_path(digest), digest


def deploy_master_pids(env: dict[str, str]) -> list[int]:
    from deployer.connect import mux
    answer = mux.hello(*_deploy_master(env))
    return [int(answer["pid"])] if answer else []


def stop_deploy_master(env: dict[str, str]) -> None:
    from deployer.connect import mux
    mux.stop_master(*_deploy_master(env))


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def run_noop(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from deployer.sim import fleet as sim
    folder, logs = work / "fleet", work / "logs"
    logs.mkdir()
    fleet = start_primed_fleet(folder, args.devices, args.rtt_ms, work / "pocl")
    groups = account(fleet)
    try:
        env = env_with_repo()
        floor = write_floor(fleet, work)
        inv = inventory(fleet, work, share=False, cache_off=False)
        argv = [PYTHON, "-m", "deployer", "push", "--fleet", str(inv), "--kernels", str(saxpy_only(work)),
                "--cache", str(work / "cache"), "--forks", str(args.devices), "--smoke", "never", "--json"]
        primed = measure(fleet, argv, logs, "prime", env=env)
        if primed["rc"] != 0:
            raise SystemExit(f"priming push failed: {(logs / 'prime.err').read_text()[-800:]}")
        commands = {"floor": ["bash", str(floor)], "noop": argv}
        masters: dict[str, Any] = {}
        if args.warm:  # connections kept open: OpenSSH's ControlMaster, deploy's connection master (ssh.persist)
            env = {**env, "DEPLOY_MUX_DIR": str(work / "mux")}
            commands["floor-warm"] = ["bash", str(write_warm_floor(fleet, work))]
            at = argv.index("--fleet") + 1
            commands["noop-warm"] = [*argv[:at], str(persisted(inv)), *argv[at + 1:]]
            for label in ("floor-warm", "noop-warm"):  # the masters start here, outside the measured runs
                if measure(fleet, commands[label], logs, f"{label}-prime", env=env)["rc"] != 0:
                    raise SystemExit(f"priming {label} failed: {(logs / f'{label}-prime.err').read_text()[-800:]}")
            masters = {"floor-warm": lambda: ssh_master_pids(work / "ctl"),
                       "noop-warm": lambda: deploy_master_pids(env)}
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in commands}
        try:
            for rep in range(args.reps):
                for label, command in commands.items():
                    before, pids = board_cpu_s(groups), masters[label]() if label in masters else []
                    master_before = sum(proc_cpu_s(pid) for pid in pids)
                    runs[label].append(measure(fleet, command, logs, f"{label}-{rep}", env=env))
                    r = runs[label][-1]
                    r["board_cpu_s"] = round(board_cpu_s(groups) - before, 3)
                    r["master_cpu_s"] = round(sum(proc_cpu_s(pid) for pid in pids) - master_before, 3)
                    r["cpu_s"] = round(r["cpu_s"] + r["master_cpu_s"], 4)  # the run's and its master's
                    print(f"  {label}-{rep}: {r['wall_s']:.3f} s cpu={r['cpu_s']:.3f} s (master "
                          f"{r['master_cpu_s']:.3f}) board={r['board_cpu_s']:.3f} s rss={r['rss_mib']} MiB "
                          f"rc={r['rc']} conns/dev={max(d['connections'] for d in r['devices'].values())} "
                          f"cmds/dev={max(d['commands'] for d in r['devices'].values())}", flush=True)
        finally:
            if args.warm:
                close_masters(work / "ctl")
                stop_deploy_master(env)
    finally:
        sim.stop_fleet(folder)
        release(groups)
    table = {}
    for label, results in runs.items():
        table[label] = {"wall_s": med([r["wall_s"] for r in results]), "cpu_s": med([r["cpu_s"] for r in results]),
                        "cpu_per_device_s": round(med([r["cpu_s"] for r in results]) / args.devices, 4),
                        "board_cpu_s": med([r["board_cpu_s"] for r in results]),
                        "master_cpu_s": med([r.get("master_cpu_s", 0.0) for r in results]),
                        "rss_mib": max(r["rss_mib"] for r in results), "rc": [r["rc"] for r in results]}
    table["noop"]["x_floor"] = round(table["noop"]["wall_s"] / table["floor"]["wall_s"], 2)
    if "noop-warm" in table:  # against the fresh-connection floor (the issue's), and against a warm ControlMaster
        table["noop-warm"]["x_floor"] = round(table["noop-warm"]["wall_s"] / table["floor"]["wall_s"], 2)
        table["noop-warm"]["x_floor_warm"] = round(table["noop-warm"]["wall_s"] / table["floor-warm"]["wall_s"], 2)
    return {"devices": args.devices, "rtt_ms": args.rtt_ms, "table": table, "runs": runs}


def run_cold(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from deployer.sim import fleet as sim
    folder, logs = work / "fleet", work / "logs"
    logs.mkdir()
    payload = make_payload(work)
    fleet = start_fleet(folder, args.devices, args.rtt_ms, 0)
    groups = account(fleet)
    table: dict[str, Any] = {}
    try:
        env = env_with_repo()
        if args.shell:  # bench/push.py's shell baseline, cold, in the same run: the target's denominator
            clear_devices(fleet, deployer=False)
            control = Path(tempfile.mkdtemp(prefix="bench-ctl-", dir="/tmp"))
            argv = ["bash", str(write_shell(fleet, work)), str(work), str(control),
                    *[a for n, p in hosts(fleet) for a in (n, str(p))]]
            before = board_cpu_s(groups)
            result = measure(fleet, argv, logs, "shell", env=env, after=lambda: close_masters(control))
            table["shell"] = {"wall_s": result["wall_s"], "rc": result["rc"], "compile_s": remote_compile_s(fleet),
                              "board_cpu_s": round(board_cpu_s(groups) - before, 2), "rss_mib": result["rss_mib"]}
            shutil.rmtree(control, ignore_errors=True)
            print(f"  shell: {table['shell']}", flush=True)
        for share in (False, True) if args.mode == "both" else (args.mode == "on",):
            for device in fleet.devices:
                shutil.rmtree(Path(device.folder) / "home" / ".deployer", ignore_errors=True)
            shutil.rmtree(work / "deploy-cache", ignore_errors=True)
            inv = inventory(fleet, work, share=share, cache_off=True)
            argv = deploy_argv(inv, work, payload["model"], args.devices)
            label = "share-on" if share else "share-off"
            before = board_cpu_s(groups)
            started = time.perf_counter()
            result = measure(fleet, argv, logs, label, env=env)
            board = board_cpu_s(groups) - before
            report = json.loads((logs / f"{label}.out").read_text() or "{}")
            origins: dict[str, int] = {}
            for device in report.get("devices", []):
                for origin in (device.get("origin") or {}).values():
                    word = str(origin).split(" ")[0]
                    origins[word] = origins.get(word, 0) + 1
            table[label] = {"wall_s": result["wall_s"], "rc": result["rc"], "board_cpu_s": round(board, 2),
                            "controller_cpu_s": result["cpu_s"], "rss_mib": result["rss_mib"], "origins": origins,
                            "elapsed_s": round(time.perf_counter() - started, 2)}
            print(f"  {label}: {table[label]}", flush=True)
        if "share-on" in table:  # one kernel changed, sharing on: that program is compiled once for the fleet
            relu = work / "deploy-kernels" / "relu.cl"
            relu.write_bytes(relu.read_bytes() + b"// bench: changed\n")
            before = board_cpu_s(groups)
            result = measure(fleet, argv, logs, "share-on-changed", env=env)
            board = board_cpu_s(groups) - before
            report = json.loads((logs / "share-on-changed.out").read_text() or "{}")
            origins = {}
            for device in report.get("devices", []):
                for origin in (device.get("origin") or {}).values():
                    word = str(origin).split(" ")[0]
                    origins[word] = origins.get(word, 0) + 1
            table["share-on-changed"] = {"wall_s": result["wall_s"], "rc": result["rc"], "board_cpu_s": round(board, 2),
                                         "origins": origins}
            print(f"  share-on-changed: {table['share-on-changed']}", flush=True)
    finally:
        sim.stop_fleet(folder)
        release(groups)
    if "share-on" in table and "shell" in table:
        table["share-on"]["x_shell"] = round(table["share-on"]["wall_s"] / table["shell"]["wall_s"], 3)
    if "share-on" in table and "share-off" in table:
        table["share-on"]["x_share_off"] = round(table["share-on"]["wall_s"] / table["share-off"]["wall_s"], 3)
        table["share-on"]["board_cpu_x_share_off"] = round(
            table["share-on"]["board_cpu_s"] / max(table["share-off"]["board_cpu_s"], 1e-9), 3)
    return {"devices": args.devices, "rtt_ms": args.rtt_ms, "table": table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("noop", "cold"))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rtt-ms", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mode", choices=("both", "on", "off"), default="both", help="cold: sharing off, on, both")
    parser.add_argument("--shell", action="store_true", help="cold: bench/push.py's shell baseline first (rsync)")
    parser.add_argument("--warm", action="store_true",
                        help="noop: also with connections kept open (ControlMaster; deploy's ssh.persist)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/noop.py needs root (the simulated fleet does)")
    os.sched_setaffinity(0, {0})
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.what}-", dir="/tmp"))
    result = run_noop(args, work) if args.what == "noop" else run_cold(args, work)
    result.pop("runs", None)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work / "payload", ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    shutil.rmtree(work / "deploy-cache", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
