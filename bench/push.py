#!/usr/bin/env python3
"""`deploy push` against the OpenSSH floor, a shell baseline, Ansible and pyinfra, on the simulated fleet.

    PYTHONPATH=. .venv/bin/python bench/push.py [--devices 8] [--scenarios rtt0,rtt40,rate8000] [--reps 3]
    bash bench/push32.sh          # N = 32 at RTT 40 ms: floor, deploy cold (once), no-op; RSS

Every contender does the same work: the 16 MiB model (random bytes, fixed seed) and the kernel sources go
to each device, every program variant of the library is compiled there (the contenders run
bench/push/compile.py, ctypes like deploy's agent; deploy runs its own agent), and the binaries come back.
The controller is pinned to CPU 0 and the fleet (sshd, its sessions, the proxies) to CPU 1. Every measured
command is a fresh process reaped with os.wait4 (peak RSS); connections and remote commands are counted
in each sshd's VERBOSE log, bytes at the proxy in front of each device (a 0 ms one at RTT 0). Drivers'
kernel caches are off (POCL_KERNEL_CACHE=0) and never shared between devices. bench/README.md has the
method, the figures and what they mean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_BIN = REPO / "bench" / ".venv" / "bin"
PYTHON = sys.executable
MODEL_SIZE = 16 << 20
SEED = 20261124
REMOTE = "/home/deploysim/bench"  # the contenders' folder on each device (deploy uses ~/.deployer)
SCENARIOS = {"rtt0": (0, 0), "rtt40": (40, 0), "rate8000": (0, 8000)}  # name: (rtt_ms, rate_kbit)
TOOLS = ("floor", "shell", "ansible", "pyinfra", "deploy", "share")  # share: deploy with share_builds on
RUN_TIMEOUT_S = 900
SSH_OPTS = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "KexAlgorithms=curve25519-sha256",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes"]


def env_with_repo(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), LC_ALL="C.UTF-8", **extra)
    env.pop("SSH_AUTH_SOCK", None)  # only the fleet's key is offered, by every tool
    # Python as installed runs from bytecode: PYTHONDONTWRITEBYTECODE (set on some CI machines) would make every
    # measured start compile deployer's modules again (~0.3 s of CPU here), a cost no user pays
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "deployer")], check=True, env=env)
    return env


# ---------------------------------------------------------------- the fleet and the payload

def start_fleet(folder: Path, count: int, rtt_ms: int, rate_kbit: int, *, mix: bool = False) -> Any:
    """Start the fleet with this process pinned to CPU 1 for the while: every sshd, session and proxy
    inherits that CPU. (Not from a pinned child process: the servers would outlive their parent, and
    stop_fleet, which cannot reap another's zombies, would wait 5 s on each before its SIGKILL.)"""
    from deployer.sim import fleet as sim
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})
    try:
        fleet = sim.start_fleet(folder, sim.fleet_specs(count, mix=mix), rtt_ms=rtt_ms, rate_kbit=rate_kbit,
                                proxy=True)
    finally:
        os.sched_setaffinity(0, before)
    for device in fleet.devices:  # check the pinning took: the server and its proxy
        for pid in filter(None, [device.pid, device.proxy_pid]):
            if os.sched_getaffinity(pid) != {1}:
                raise SystemExit(f"{device.spec.name}: pid {pid} is not pinned to CPU 1")
    return fleet


def make_payload(work: Path) -> dict[str, Any]:
    """W/payload (what the contenders copy) and W/deploy-kernels (deploy's --kernels, with kernels.yml)."""
    from deployer.config.kernels import load_library
    payload = work / "payload"
    (payload / "models").mkdir(parents=True)
    model = payload / "models" / "bench16.bin"
    model.write_bytes(random.Random(SEED).randbytes(MODEL_SIZE))
    library = load_library(REPO / "kernels")
    (payload / "kernels").mkdir()
    for name in library.files():
        shutil.copy2(REPO / "kernels" / name, payload / "kernels" / name)
    programs = [{"name": f"{p.name}-{v.name}", "source": p.source, "options": list(v.options),
                 "requires": [r for r in v.requires if r.startswith("cl_")]}  # images: PoCL has them
                for p in library.programs for v in p.variants]
    (payload / "kernels" / "programs.json").write_text(json.dumps(
        {"programs": programs, "compile_options": list(library.compile_options)}, indent=1))
    shutil.copy2(REPO / "bench" / "push" / "compile.py", payload / "compile.py")
    shutil.copytree(REPO / "kernels", work / "deploy-kernels")
    built = [p["name"] for p in programs if not p["requires"]]  # PoCL 3.1 here has no cl_khr_fp16
    return {"model": model, "built": built, "payload": payload}


def clear_devices(fleet: Any, *, deployer: bool) -> None:
    """Fresh device homes for a cold run (the contenders' folder, or deploy's remote dir), and a fresh local
    side too: rsync, Ansible's fetch and pyinfra's files.get all skip a file whose local copy matches."""
    work = fleet.folder.parent
    for name in ("deploy-cache",) if deployer else ("shell-out", "ansible-out", "pyinfra-out"):
        shutil.rmtree(work / name, ignore_errors=True)
    for device in fleet.devices:
        home = Path(device.folder) / "home"
        for sub in ([".deployer"] if deployer else ["bench", ".ansible"]):
            shutil.rmtree(home / sub, ignore_errors=True)


# ---------------------------------------------------------------- counting

def counters(fleet: Any) -> dict[str, dict[str, Any]]:
    from deployer.sim import fleet as sim
    out = {}
    for device in fleet.devices:
        stats = sim.proxy_stats(device)
        out[device.spec.name] = {"log": os.path.getsize(device.log), "c2s": stats["client_to_server_bytes"],
                                 "s2c": stats["server_to_client_bytes"], "proxy_conns": stats["connections"]}
    return out


def per_device(fleet: Any, before: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    time.sleep(0.7)  # the proxy saves its counters every 0.5 s while they change
    after = counters(fleet)
    out = {}
    for device in fleet.devices:
        b, a = before[device.spec.name], after[device.spec.name]
        with open(device.log, "rb") as log:
            log.seek(b["log"])
            text = log.read(a["log"] - b["log"]).decode("utf-8", "replace")
        out[device.spec.name] = {
            "connections": text.count("Accepted publickey"),
            "commands": text.count("Starting session: command"),
            "subsystems": text.count("Starting session: subsystem"),
            "sent": a["c2s"] - b["c2s"], "received": a["s2c"] - b["s2c"],
        }
    return out


def measure(fleet: Any, argv: list[str], logs: Path, label: str, *, env: dict[str, str],
            after: Any = None) -> dict[str, Any]:
    """Run one measured command as a fresh process (its own session), reaped with wait4 by spawn.py."""
    before = counters(fleet)
    spawn = [PYTHON, str(REPO / "bench" / "push" / "spawn.py"), str(RUN_TIMEOUT_S), str(logs / f"{label}.out"),
             str(logs / f"{label}.err"), "--", *argv]
    launched = subprocess.run(spawn, env=env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60)
    figures = json.loads(launched.stdout)
    rc, wall = figures["rc"], figures["wall_s"]
    if after is not None:
        after()
    devices = per_device(fleet, before)
    if rc != 0:
        tail = (logs / f"{label}.err").read_text(errors="replace")[-600:]
        print(f"  !! {label}: exit {rc}: {tail}", file=sys.stderr)
    return {"label": label, "wall_s": round(wall, 3), "rc": rc, "rss_mib": round(figures["maxrss_kib"] / 1024, 1),
            "launcher_rss_mib": round(figures["launcher_rss_kib"] / 1024, 1),
            "cpu_s": figures.get("cpu_s"),  # user + system of the command and every child it reaped
            "devices": devices}


def remote_compile_s(fleet: Any) -> float | None:
    """The slowest device's compile step, as compile.py wrote it (read from the device's home)."""
    seconds = []
    for device in fleet.devices:
        path = Path(device.folder) / "home" / "bench" / "compile.txt"
        match = re.search(r"compile_s ([0-9.]+)", path.read_text()) if path.exists() else None
        if match:
            seconds.append(float(match.group(1)))
    return max(seconds) if len(seconds) == len(fleet.devices) else None


# ---------------------------------------------------------------- the contenders

def hosts(fleet: Any) -> list[tuple[str, int]]:
    return [(d.spec.name, d.port) for d in fleet.devices]


def ssh_base(fleet: Any) -> list[str]:
    return ["ssh", *SSH_OPTS, "-o", f"UserKnownHostsFile={fleet.known_hosts}", "-i", str(fleet.folder / "client_key")]


def write_floor(fleet: Any, work: Path, options: Sequence[str] = (), name: str = "floor.sh") -> Path:
    """`ssh true` to every device at once (`options`: more ssh options, e.g. a ControlMaster's)."""
    ssh = " ".join([*ssh_base(fleet), *options])
    lines = ["#!/bin/bash", "pids=()"]
    lines += [f"{ssh} -p {port} deploysim@127.0.0.1 true & pids+=($!)" for _, port in hosts(fleet)]
    lines += ["rc=0", 'for p in "${pids[@]}"; do wait "$p" || rc=1; done', "exit $rc"]
    path = work / name
    path.write_text("\n".join(lines) + "\n")
    return path


SHELL_SCRIPT = r"""#!/bin/bash
# The shell baseline, as a competent user writes it: per device in parallel, one ControlMaster connection
# (ControlPersist), rsync of the model and kernels, one ssh running the compile, rsync of the binaries back.
set -u
W=$1; CTL=$2; shift 2
SSH="ssh @SSH@ -o ControlMaster=auto -o ControlPath=$CTL/%p -o ControlPersist=60"
one() {
    local name=$1 port=$2
    rsync -a -e "$SSH -p $port" "$W/payload/" "deploysim@127.0.0.1:bench/" || return 1
    $SSH -p "$port" deploysim@127.0.0.1 \
        'cd bench && POCL_KERNEL_CACHE=0 python3 compile.py kernels out > compile.txt' || return 1
    mkdir -p "$W/shell-out/$name"
    rsync -a -e "$SSH -p $port" "deploysim@127.0.0.1:bench/out/" "$W/shell-out/$name/" || return 1
}
pids=()
while [ $# -gt 0 ]; do one "$1" "$2" & pids+=($!); shift 2; done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""


def write_shell(fleet: Any, work: Path) -> Path:
    path = work / "shell.sh"
    path.write_text(SHELL_SCRIPT.replace("@SSH@", " ".join(ssh_base(fleet)[1:])))
    return path


def close_masters(control_dir: Path) -> None:
    for sock in sorted(control_dir.iterdir()) if control_dir.exists() else []:
        subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                       capture_output=True, timeout=15)


def write_ansible(fleet: Any, work: Path, built: list[str]) -> Path:
    folder = work / "ansible"
    folder.mkdir(exist_ok=True)
    key, known = fleet.folder / "client_key", fleet.known_hosts
    (folder / "hosts.ini").write_text("[sim]\n" + "".join(
        f"{name} ansible_host=127.0.0.1 ansible_port={port} ansible_user=deploysim "
        f"ansible_ssh_private_key_file={key}\n" for name, port in hosts(fleet)))
    ssh_args = " ".join([*SSH_OPTS, "-o", f"UserKnownHostsFile={known}", "-o", "ControlMaster=auto",
                         "-o", "ControlPersist=60s"])
    (folder / "ansible.cfg").write_text(
        f"[defaults]\ninventory = {folder / 'hosts.ini'}\nforks = {len(fleet.devices)}\nhost_key_checking = True\n"
        "interpreter_python = /usr/bin/python3\nretry_files_enabled = False\n"
        f"[ssh_connection]\npipelining = True\nssh_args = {ssh_args}\n")
    (folder / "site.yml").write_text(f"""- hosts: sim
  gather_facts: false
  tasks:
    - name: model and kernels
      ansible.builtin.copy: {{src: "{work}/payload/", dest: "{REMOTE}/"}}
    - name: compile on the device
      ansible.builtin.shell: cd {REMOTE} && POCL_KERNEL_CACHE=0 python3 compile.py kernels out > compile.txt
    - name: binaries back
      ansible.builtin.fetch:
        src: "{REMOTE}/out/{{{{ item }}}}.bin"
        dest: "{work}/ansible-out/{{{{ inventory_hostname }}}}/"
        flat: true
      loop: {json.dumps(built)}
""")
    return folder


def write_pyinfra(fleet: Any, work: Path, built: list[str]) -> Path:
    folder = work / "pyinfra"
    folder.mkdir(exist_ok=True)
    data = {"ssh_hostname": "127.0.0.1", "ssh_user": "deploysim", "ssh_key": str(fleet.folder / "client_key"),
            "ssh_known_hosts_file": str(fleet.known_hosts), "ssh_strict_host_key_checking": "yes",
            "ssh_allow_agent": False, "ssh_look_for_keys": False}
    inventory = [(name, {**data, "ssh_port": port}) for name, port in hosts(fleet)]
    (folder / "inventory.py").write_text(f"sim = {inventory!r}\n")
    (folder / "deploy.py").write_text(f"""import os
from pyinfra import host
from pyinfra.operations import files, server

files.sync(name="model and kernels", src="{work}/payload", dest="{REMOTE}")
server.shell(name="compile on the device",
             commands=["cd {REMOTE} && POCL_KERNEL_CACHE=0 python3 compile.py kernels out > compile.txt"])
out = os.path.join("{work}/pyinfra-out", host.name)
os.makedirs(out, exist_ok=True)
for name in {built!r}:
    files.get(name="binary " + name, src="{REMOTE}/out/" + name + ".bin", dest=os.path.join(out, name + ".bin"))
""")
    return folder


def deploy_inventory(fleet: Any, work: Path, *, share: bool = False) -> Path:
    import yaml
    inventory = yaml.safe_load(fleet.inventory.read_text())
    inventory["defaults"]["env"] = {"POCL_KERNEL_CACHE": "0"}  # every compile cold, as for the others
    # No request limit below the bench's own, as the others have none: at N = 32 one board's 16 builds take
    # ~390 s on the fleet's one core, past the sim inventory's 300 s (and deploy failed there, not slower).
    inventory["defaults"].setdefault("timeouts", {})["command"] = RUN_TIMEOUT_S
    if share:  # one compile per program per fingerprint, its binary given to the others (docs/inventory.md)
        inventory["defaults"]["share_builds"] = True
    path = work / f"deploy-inventory{'-share' if share else ''}.yml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def deploy_argv(inventory: Path, work: Path, model: Path, count: int, smoke: str = "never") -> list[str]:
    return [PYTHON, "-m", "deployer", "push", "--fleet", str(inventory), "--model", str(model),
            "--kernels", str(work / "deploy-kernels"), "--cache", str(work / "deploy-cache"),
            "--forks", str(count), "--smoke", smoke, "--json"]


def deploy_figures(result: dict[str, Any], logs: Path) -> None:
    """Fold deploy's --json into the result: compile (slowest device), what it rebuilt, its own byte counts."""
    try:
        report = json.loads((logs / f"{result['label']}.out").read_text())
    except (OSError, ValueError):
        return
    devices = report.get("devices", [])
    compiles = [d["stages"].get("compile", 0.0) for d in devices if d.get("stages")]
    result["compile_s"] = round(max(compiles), 3) if compiles else 0.0
    result["stages_max"] = {k: round(max(d["stages"].get(k, 0.0) for d in devices), 3)
                            for k in sorted({k for d in devices for k in d.get("stages", {})})}
    result["rebuild"] = sorted({k for d in devices for k in (d.get("plan") or {}).get("rebuild", [])})
    result["rebuilt_per_device"] = [len((d.get("plan") or {}).get("rebuild", [])) for d in devices]
    result["ok"] = report.get("ok")
    result["bytes_sent_json"] = [d.get("bytes_sent") for d in devices]
    words = [how.split(" ")[0] for d in devices for how in (d.get("origin") or {}).values()]
    result["origins"] = {w: words.count(w) for w in sorted(set(words))}  # compiled, shared, from, reused
    result["shell_noop"] = sum(bool(d.get("shell_noop")) for d in devices)


# ---------------------------------------------------------------- one scenario

def run_scenario(name: str, count: int, reps: int, tools: list[str], work: Path, payload: dict[str, Any],
                 *, cold_reps: int, default_smoke: bool, mix: bool = False) -> dict[str, Any]:
    from deployer.sim import fleet as sim
    rtt_ms, rate_kbit = SCENARIOS[name]
    folder = work / f"fleet-{name}-{count}"
    logs = work / "logs" / f"{name}-{count}"
    logs.mkdir(parents=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    try:
        fleet = start_fleet(folder, count, rtt_ms, rate_kbit, mix=mix)
        print(f"[{name} N={count}{' mix' if mix else ''}] fleet up in {time.monotonic() - started:.1f} s", flush=True)
        env = env_with_repo()
        floor = write_floor(fleet, work)
        shell, ansible = write_shell(fleet, work), write_ansible(fleet, work, payload["built"])
        pyinfra, inventory = write_pyinfra(fleet, work, payload["built"]), deploy_inventory(fleet, work)
        relu = work / "deploy-kernels" / "relu.cl"
        relu_original = relu.read_bytes()

        def record(tool: str, result: dict[str, Any]) -> None:
            runs.setdefault(tool, []).append(result)
            print(f"  {result['label']}: {result['wall_s']:.2f} s rc={result['rc']} "
                  f"compile={result.get('compile_s')} rss={result['rss_mib']} MiB", flush=True)

        for rep in range(reps):
            if "floor" in tools:
                record("floor", measure(fleet, ["bash", str(floor)], logs, f"floor-{rep}", env=env))
            cold = rep < cold_reps
            if "shell" in tools and cold:
                clear_devices(fleet, deployer=False)
                control = Path(tempfile.mkdtemp(prefix="bench-ctl-", dir="/tmp"))
                args = [a for n, p in hosts(fleet) for a in (n, str(p))]
                result = measure(fleet, ["bash", str(shell), str(work), str(control), *args], logs,
                                 f"shell-{rep}", env=env, after=lambda control=control: close_masters(control))
                result["compile_s"] = remote_compile_s(fleet)
                shutil.rmtree(control, ignore_errors=True)
                record("shell", result)
            if "ansible" in tools and cold:
                clear_devices(fleet, deployer=False)
                control = Path(tempfile.mkdtemp(prefix="bench-actl-", dir="/tmp"))
                aenv = env_with_repo(ANSIBLE_CONFIG=str(ansible / "ansible.cfg"),
                                     ANSIBLE_SSH_CONTROL_PATH_DIR=str(control), ANSIBLE_LOCAL_TEMP=str(work / "atmp"))
                result = measure(fleet, [str(BENCH_BIN / "ansible-playbook"), str(ansible / "site.yml")], logs,
                                 f"ansible-{rep}", env=aenv, after=lambda control=control: close_masters(control))
                result["compile_s"] = remote_compile_s(fleet)
                shutil.rmtree(control, ignore_errors=True)
                record("ansible", result)
            if "pyinfra" in tools and cold:
                clear_devices(fleet, deployer=False)
                argv = [str(BENCH_BIN / "pyinfra"), "-y", "--parallel", str(count),
                        str(pyinfra / "inventory.py"), str(pyinfra / "deploy.py")]
                result = measure(fleet, argv, logs, f"pyinfra-{rep}", env=env)
                result["compile_s"] = remote_compile_s(fleet)
                record("pyinfra", result)
            if "share" in tools and cold:
                argv = deploy_argv(deploy_inventory(fleet, work, share=True), work, payload["model"], count)
                clear_devices(fleet, deployer=True)
                relu.write_bytes(relu_original)
                result = measure(fleet, argv, logs, f"deploy-share-cold-{rep}", env=env)
                deploy_figures(result, logs)
                record("deploy_share_cold", result)
                relu.write_bytes(relu.read_bytes() + f"// bench: changed {rep}\n".encode())
                result = measure(fleet, argv, logs, f"deploy-share-changed-{rep}", env=env)
                deploy_figures(result, logs)
                result["changed_file_bytes"] = relu.stat().st_size
                record("deploy_share_changed", result)
            if "deploy" in tools:
                argv = deploy_argv(inventory, work, payload["model"], count)
                if cold:
                    clear_devices(fleet, deployer=True)
                    relu.write_bytes(relu_original)
                    result = measure(fleet, argv, logs, f"deploy-cold-{rep}", env=env)
                    deploy_figures(result, logs)
                    record("deploy_cold", result)
                result = measure(fleet, argv, logs, f"deploy-noop-{rep}", env=env)
                deploy_figures(result, logs)
                record("deploy_noop", result)
                if cold:
                    relu.write_bytes(relu.read_bytes() + f"// bench: changed {rep}\n".encode())
                    result = measure(fleet, argv, logs, f"deploy-changed-{rep}", env=env)
                    deploy_figures(result, logs)
                    result["changed_file_bytes"] = relu.stat().st_size
                    record("deploy_changed", result)
        if default_smoke and "deploy" in tools:
            clear_devices(fleet, deployer=True)
            argv = deploy_argv(inventory, work, payload["model"], count, smoke="changed")
            result = measure(fleet, argv, logs, "deploy-cold-default", env=env)
            deploy_figures(result, logs)
            record("deploy_cold_default_smoke", result)
    finally:
        sim.stop_fleet(folder)
    return {"scenario": name, "devices": count, "rtt_ms": rtt_ms, "rate_kbit": rate_kbit, "mix": mix, "runs": runs,
            "elapsed_s": round(time.monotonic() - started, 1)}


# ---------------------------------------------------------------- deploy --help

def help_figures() -> dict[str, Any]:
    """`deploy --help` wall (fresh process, best of 5) and what `-X importtime` says it imports."""
    env = env_with_repo()
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([PYTHON, "-m", "deployer", "--help"], env=env, cwd=REPO, capture_output=True, check=True,
                       timeout=60)
        walls.append(time.perf_counter() - start)
    trace = subprocess.run([PYTHON, "-X", "importtime", "-m", "deployer", "--help"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60).stderr.splitlines()
    rows = []  # (depth, module, cumulative us)
    for line in trace:
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            rows.append((len(match.group(3)), match.group(4), int(match.group(2))))
    heavy = {}
    for i, (depth, module, cumulative) in enumerate(rows):
        top = module.split(".")[0]
        if top in ("paramiko", "numpy", "pyopencl") and top not in heavy:
            # importtime prints a module's imports before it, deeper: its importer is the next shallower row.
            chain = [m for d, m, _ in rows[i + 1:] if d < depth]
            importer = next((m for d, m, _ in rows[i + 1:] if d < depth), None)
            outer = max((c for d, m, c in rows if m == top), default=cumulative)
            heavy[top] = {"importer": importer, "top_level": chain[-1] if chain else None,
                          "cumulative_ms": round(outer / 1000, 1)}
    return {"best_s": round(min(walls), 3), "all_s": [round(w, 3) for w in walls], "heavy_imports": heavy}


# ---------------------------------------------------------------- summary

def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarize(scenario: dict[str, Any]) -> dict[str, dict[str, Any]]:
    table = {}
    for tool, runs in scenario["runs"].items():
        good = [r for r in runs if r["rc"] == 0] or runs
        def per_dev(key: str, fn: Any, good: list[dict[str, Any]] = good) -> float | None:
            return median([fn([d[key] for d in r["devices"].values()]) for r in good])
        compiles = [r.get("compile_s") for r in good]
        table[tool] = {
            "runs": len(runs), "failed": sum(r["rc"] != 0 for r in runs),
            "wall_s": median([r["wall_s"] for r in good]),
            "compile_s": median(compiles),
            "wall_minus_compile_s": median([r["wall_s"] - (r.get("compile_s") or 0.0) for r in good]),
            "connections_max": per_dev("connections", max), "commands_max": per_dev("commands", max),
            "subsystems_max": per_dev("subsystems", max),
            "sent_per_device": per_dev("sent", statistics.mean),
            "received_per_device": per_dev("received", statistics.mean),
            "sent_max": per_dev("sent", max),
            "rss_mib": median([r["rss_mib"] for r in good]),
        }
        if tool.startswith("deploy"):
            table[tool]["origins"] = good[-1].get("origins")
            table[tool]["shell_noop"] = good[-1].get("shell_noop")
            table[tool]["rebuild"] = good[-1].get("rebuild")
            table[tool]["stages_max"] = good[-1].get("stages_max")
            if "changed_file_bytes" in good[-1]:
                table[tool]["changed_file_bytes"] = good[-1]["changed_file_bytes"]
    floor = table.get("floor", {}).get("wall_s")
    shell = table.get("shell", {})
    for row in table.values():
        row["x_floor"] = round(row["wall_s"] / floor, 2) if floor and row["wall_s"] else None
        if shell.get("wall_s"):
            row["x_shell"] = round(row["wall_s"] / shell["wall_s"], 2)
            row["x_shell_no_compile"] = round(row["wall_minus_compile_s"] / shell["wall_minus_compile_s"], 2)
    return table


def fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(name: str, count: int, table: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"\n### {name}, N = {count}\n",
             "| tool | wall s | compile s | wall - compile s | x floor | x shell | x shell, no compile | "
             "conns/dev | cmds (+subsys)/dev | sent KiB/dev | recv KiB/dev | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for tool, r in table.items():
        fail = f" ({r['failed']}/{r['runs']} failed)" if r["failed"] else ""
        lines.append(
            f"| {tool}{fail} | {fmt(r['wall_s'])} | {fmt(r['compile_s'])} | {fmt(r['wall_minus_compile_s'])} | "
            f"{fmt(r['x_floor'])} | {fmt(r.get('x_shell'))} | {fmt(r.get('x_shell_no_compile'))} | "
            f"{fmt(r['connections_max'], 'g')} | {fmt(r['commands_max'], 'g')} (+{fmt(r['subsystems_max'], 'g')}) | "
            f"{fmt(r['sent_per_device'] and r['sent_per_device'] / 1024, '.1f')} | "
            f"{fmt(r['received_per_device'] and r['received_per_device'] / 1024, '.1f')} | "
            f"{fmt(r['rss_mib'], '.1f')} |")
    print("\n".join(lines), flush=True)
    return lines


def check(targets: list[dict[str, Any]], what: str, ok: bool | None, figures: str) -> None:
    verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
    targets.append({"target": what, "verdict": verdict, "figures": figures})
    print(f"{verdict:4}  {what}: {figures}", flush=True)


def check_targets(results: list[dict[str, Any]], help_: dict[str, Any] | None) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    print("\n## Targets", flush=True)
    for s in results:
        t, tag = s["table"], f"{s['scenario']} N={s['devices']}"
        noop, floor = t.get("deploy_noop"), t.get("floor")
        if noop:
            check(targets, f"no-op: 1 connection, <= 2 remote commands per device ({tag})",
                  noop["connections_max"] == 1 and noop["commands_max"] <= 2,
                  f"{noop['connections_max']:g} connection(s), {noop['commands_max']:g} command(s)")
            limit = {("rtt40", 32): 1.0, ("rtt0", 8): 1.5}.get((s["scenario"], s["devices"]))
            if limit and floor:
                check(targets, f"no-op wall <= {limit}x floor ({tag})", noop["x_floor"] <= limit,
                      f"{noop['wall_s']:.2f} s vs floor {floor['wall_s']:.2f} s = {noop['x_floor']:.2f}x")
        cold = t.get("deploy_cold")
        for tool, limit in (("shell", 1.0), ("pyinfra", 0.5), ("ansible", 0.1)):
            other = t.get(tool)
            if cold and other and other["wall_minus_compile_s"]:
                ratio = cold["wall_minus_compile_s"] / other["wall_minus_compile_s"]
                check(targets, f"cold push, compile excluded, <= {limit}x {tool} ({tag})", ratio <= limit,
                      f"{cold['wall_minus_compile_s']:.2f} s vs {other['wall_minus_compile_s']:.2f} s = {ratio:.2f}x "
                      f"(with compile: {cold['wall_s']:.2f} vs {other['wall_s']:.2f} s)")
        shared, shell = t.get("deploy_share_cold"), t.get("shell")
        if shared and s.get("mix"):
            origins = shared.get("origins") or {}
            check(targets, f"two fingerprints, share_builds on: each program compiled once per fingerprint ({tag})",
                  origins.get("compiled") == 2 * 16, f"origins {origins} (16 programs, 2 fingerprints)")
        if shared and shell and s["devices"] == 8 and not s.get("mix"):
            check(targets, f"cold push with compile, share_builds on, <= 0.25x shell ({tag})",
                  shared["wall_s"] <= 0.25 * shell["wall_s"],
                  f"{shared['wall_s']:.2f} s vs {shell['wall_s']:.2f} s = {shared['wall_s'] / shell['wall_s']:.3f}x "
                  f"(origins {shared.get('origins')})")
        changed = t.get("deploy_changed")
        if changed and floor:
            allowed = 2 * changed["changed_file_bytes"] + 4096 + floor["sent_max"]
            check(targets, f"one kernel changed: sent <= 2x file + 4 KiB + floor's, per device ({tag})",
                  changed["sent_max"] <= allowed,
                  f"{changed['sent_max']:.0f} B sent (worst device) vs allowed {allowed:.0f} B (file "
                  f"{changed['changed_file_bytes']} B, floor {floor['sent_max']:.0f} B)")
            rebuild = changed.get("rebuild") or []
            check(targets, f"one kernel changed: only that kernel recompiled ({tag})",
                  bool(rebuild) and all(k.startswith("relu ") for k in rebuild), f"rebuilt {rebuild}")
        if s["devices"] >= 32:
            rss = max(r["rss_mib"] for k, r in t.items() if k.startswith("deploy"))
            check(targets, f"controller peak RSS <= 250 MiB ({tag})", rss <= 250, f"{rss:.1f} MiB (deploy, worst run)")
    if help_:
        check(targets, "deploy --help < 0.3 s", help_["best_s"] < 0.3, f"best of 5: {help_['best_s']:.3f} s")
        heavy = help_["heavy_imports"]
        check(targets, "deploy --help imports no paramiko, numpy, pyopencl", not heavy,
              "none" if not heavy else "; ".join(f"{m}: {v['cumulative_ms']} ms, imported by {v['importer']} "
                                                 f"(from {v['top_level']})" for m, v in heavy.items()))
    return targets


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + ("+dirty" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--scenarios", default="rtt0,rtt40,rate8000")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cold-reps", type=int, default=None, help="Reps of the cold runs (default: --reps).")
    parser.add_argument("--default-smoke", action="store_true", help="Also one cold deploy with --smoke changed.")
    parser.add_argument("--no-help-check", action="store_true")
    parser.add_argument("--mix", action="store_true",
                        help="A fleet of two fingerprints (every second device on PoCL's basic device).")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--append", action="store_true", help="Keep the scenarios already in --out (a run in parts).")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/push.py needs root (the simulated fleet does)")
    os.sched_setaffinity(0, {0})  # the controller, and every command it starts, on CPU 0
    tools = args.tools.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-push-", dir="/tmp"))
    today = datetime.date.today().isoformat()
    suffix = f"-n{args.devices}" if args.devices != 8 else ""
    out = args.out or REPO / "bench" / "results" / f"push-{today}{suffix}.json"
    results = json.loads(out.read_text())["scenarios"] if args.append and out.exists() else []
    try:
        payload = make_payload(work)
        help_ = None if args.no_help_check else help_figures()
        if help_ is None and args.append and out.exists():
            help_ = json.loads(out.read_text()).get("help")
        if help_:
            print(f"deploy --help: {help_}", flush=True)
        for name in args.scenarios.split(","):
            scenario = run_scenario(name, args.devices, args.reps, tools, work, payload,
                                    cold_reps=args.reps if args.cold_reps is None else args.cold_reps,
                                    default_smoke=args.default_smoke, mix=args.mix)
            scenario["mix"] = args.mix
            scenario["table"] = summarize(scenario)
            results.append(scenario)
            print_table(name, args.devices, scenario["table"])
            out.parent.mkdir(parents=True, exist_ok=True)
            record = {"date": today, "commit": git_commit(), "argv": sys.argv, "cpus": os.cpu_count(),
                      "controller_cpu": 0, "fleet_cpu": 1, "help": help_, "scenarios": results}
            out.write_text(json.dumps(record, indent=1))  # after each scenario: partial results survive
        record["targets"] = check_targets(results, help_)
        out.write_text(json.dumps(record, indent=1))
        print(f"\nresults: {out}\nlogs: {work / 'logs'}", flush=True)
    finally:
        shutil.rmtree(work / "payload", ignore_errors=True)  # the 16 MiB model; logs stay for reading
        for name in ("shell-out", "ansible-out", "pyinfra-out", "deploy-cache"):
            shutil.rmtree(work / name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
