"""What the bundle layout costs at agent start: the time from starting the agent to its `hello`, and the bytes
of a first upload, for this checkout's bundle against the one-file agent of the last commit that had it
(the baseline, measured in the same run, interleaved).

    .venv/bin/python bench/agent_start.py [--runs 40] [--python /usr/bin/python3]

Both run as on a board: stored in a folder, started with their own LAUNCH (by import, bytecode cached after
a first warm-up run), in a fresh process each time; the figure is the median wall time to the hello line,
then `bye`. Pinned to one CPU so the two see the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deployer.protocol.bundle import agent_bundle  # noqa: E402
from deployer.remote.boot import LAUNCH  # noqa: E402

ONE_FILE_AGENT = "01cd476c82e8f4e87f23dce595b37ee80bb9b4ad"


def one_file_agent(folder: Path) -> tuple[list[str], int]:
    """The previous agent stored as it was on a board; its LAUNCH argv and its upload size."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ONE_FILE_AGENT}:deployer/agent_main.py"],
                            capture_output=True, check=True).stdout
    sha12 = hashlib.sha256(source).hexdigest()[:12]
    (folder / f"agent_{sha12}.py").write_bytes(source)
    namespace: dict[str, object] = {}
    launch_start = source.index(b'LAUNCH = """')
    exec(source[launch_start:source.index(b'"""\n', launch_start + 12) + 4].decode(), namespace)
    return ["-c", str(namespace["LAUNCH"]), str(folder), f"agent_{sha12}"], len(source)


def bundle_agent(folder: Path) -> tuple[list[str], int]:
    bundle = agent_bundle()
    root = folder / bundle.id12
    for path, data in bundle.files:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    header, payload = bundle.message()
    return ["-c", LAUNCH, str(root), "deployer_remote.main"], len(json.dumps(header)) + len(payload)


def time_to_hello(python: str, argv: list[str], rd: Path) -> float:
    start = time.perf_counter()
    agent = subprocess.Popen([python, *argv, "serve", str(rd)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert agent.stdout is not None and agent.stdin is not None
    hello = agent.stdout.readline()
    elapsed = time.perf_counter() - start
    assert b'"hello"' in hello, hello + agent.stderr.read() if agent.stderr else hello
    agent.stdin.write(b'{"op":"bye"}\n')
    agent.stdin.close()
    agent.wait(10)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--python", default="/usr/bin/python3", help="the board's interpreter")
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory(prefix="bench-agent-start-") as tmp:
        work = Path(tmp)
        (work / "old").mkdir()
        (work / "new").mkdir()
        agents = {"one-file agent (baseline)": one_file_agent(work / "old"), "bundle": bundle_agent(work / "new")}
        times: dict[str, list[float]] = {name: [] for name in agents}
        for argv, _ in agents.values():
            time_to_hello(args.python, argv, work / "rd")  # writes the bytecode
        for _ in range(args.runs):
            for name, (argv, _) in agents.items():
                times[name].append(time_to_hello(args.python, argv, work / "rd"))
    base = statistics.median(times["one-file agent (baseline)"])
    print(f"python {args.python}, {args.runs} runs each, interleaved, CPU 0")
    print("| agent | first upload | start to hello, median | p90 | x baseline |")
    print("|---|---|---|---|---|")
    for name, (_, size) in agents.items():
        runs = sorted(times[name])
        median = statistics.median(runs)
        p90 = runs[int(len(runs) * 0.9)]
        print(f"| {name} | {size / 1024:.1f} KiB | {median * 1000:.1f} ms | {p90 * 1000:.1f} ms "
              f"| {median / base:.2f} |")


if __name__ == "__main__":
    main()
