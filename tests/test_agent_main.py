"""The board-side agent, run locally as a subprocess over pipes (exactly what it does on a board).

One module-scoped session drives begin/put/fingerprint/build/get/smoke/commit on real PoCL; the other
tests start their own short sessions for the failure paths (bad paths, lock, EOF before commit, driver
crash, broken ICD setups, bootstrap). pyopencl is the oracle for the fingerprint, numpy for saxpy.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployer.protocol.bundle import agent_bundle
from deployer.remote.boot import BOOTSTRAP, LAUNCH
from deployer.remote.framing import read_message, write_message
from deployer.remote.layout import AGENT_VERSION
from deployer.remote.mace import (
    DEVICE_NAME_KEY,
    PLATFORM_INFO_KEY,
    decode_mace_pb,
    encode_mace_pb,
    mace_device_name,
    mace_platform_info,
    mace_program_hash,
    mace_program_key,
)

BUNDLE = agent_bundle()
MACE_VERSION = "v1.1.1-0-g8c75d39"

COMMON_H = b"#define SCALE(v) (v)\n"
SAXPY_CL = b"""#include "common.h"
__kernel void saxpy(const DATA_TYPE a, __global const DATA_TYPE *x, __global const DATA_TYPE *y,
                    __global DATA_TYPE *out) {
  const int i = get_global_id(0);
  out[i] = SCALE(a) * x[i] + y[i];
}
"""
BROKEN_CL = b"""__kernel void broken(__global float *y) {
  const int i = get_global_id(0);
  y[i] = bogus_identifier;
}
"""
SAXPY_OPTIONS = ["-DDATA_TYPE=float"]
SAXPY_KEY = mace_program_key("saxpy", SAXPY_OPTIONS)
BROKEN_KEY = mace_program_key("broken", [])
N = 256


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The agent's environment: one PoCL kernel cache for the module keeps repeated builds fast."""
    env = dict(os.environ)
    env["POCL_CACHE_DIR"] = str(tmp_path_factory.mktemp("pocl-cache"))
    for name in ("OCL_ICD_VENDORS", "DEPLOYER_OPENCL_LIBRARY", "POCL_DEVICES", "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    return env


@functools.cache
def stored_bundle() -> Path:
    """The agent bundle unpacked as a board keeps it (RD/agent/<id12>/deployer_remote/), once per test run."""
    root = Path(tempfile.mkdtemp(prefix="deployer-bundle-")) / BUNDLE.id12
    for path, data in BUNDLE.files:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    atexit.register(shutil.rmtree, root.parent, True)
    return root


class Agent:
    """One agent (`deployer_remote.main serve RD`, run from a stored bundle by LAUNCH, as on a board) spoken
    to over its stdin/stdout pipes."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.hello: dict[str, Any] = {}

    @classmethod
    def serve(cls, rd: Path, env: dict[str, str], python: str = sys.executable) -> Agent:
        agent = cls([python, "-c", LAUNCH, str(stored_bundle()), "deployer_remote.main", "serve", str(rd)], env)
        agent.hello, _ = read_message(agent.stdout)
        assert agent.hello["op"] == "hello", agent.hello
        return agent

    def send(self, obj: dict[str, Any], payload: bytes = b"") -> None:
        write_message(self.stdin, obj, payload)

    def recv(self) -> tuple[dict[str, Any], bytes]:
        return read_message(self.stdout)

    def call(self, op: str, payload: bytes = b"", **fields: Any) -> tuple[dict[str, Any], bytes]:
        self.send(dict(fields, op=op), payload)
        return self.recv()

    def ok(self, op: str, payload: bytes = b"", **fields: Any) -> tuple[dict[str, Any], bytes]:
        reply, data = self.call(op, payload, **fields)
        assert reply.get("ok") is True, reply
        return reply, data

    def fail(self, op: str, kind: str, payload: bytes = b"", **fields: Any) -> str:
        reply, _ = self.call(op, payload, **fields)
        assert reply.get("ok") is False and reply["error"]["kind"] == kind, reply
        return str(reply["error"]["message"])

    def put(self, path: str, data: bytes, **override: Any) -> tuple[dict[str, Any], bytes]:
        fields = {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "mode": 0o644}
        fields.update(override)
        return self.call("put", data, **fields)

    def end_input(self, timeout: float = 20) -> int:
        """Close stdin (what a killed controller looks like) and return the exit status."""
        self.stdin.close()
        return self.proc.wait(timeout)

    def bye(self) -> int:
        self.ok("bye")
        return self.end_input()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.stdin, self.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agents started by a test; any still running are killed afterwards."""
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.kill()


def saxpy_program() -> dict[str, Any]:
    return {"key": SAXPY_KEY, "name": "saxpy", "source": "kernels/saxpy.cl", "headers": ["kernels/common.h"],
            "options": SAXPY_OPTIONS, "compile_options": ["-cl-mad-enable"]}


def broken_program() -> dict[str, Any]:
    return {"key": BROKEN_KEY, "name": "broken", "source": "kernels/broken.cl", "headers": [],
            "options": [], "compile_options": []}


def saxpy_inputs() -> tuple[bytes, float, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    a = np.float32(1.5)
    x = rng.standard_normal(N, dtype=np.float32)
    y = rng.standard_normal(N, dtype=np.float32)
    return struct.pack("<f", a) + x.tobytes() + y.tobytes(), float(a), x, y


def saxpy_case(case_id: str, kernel: str = "saxpy") -> dict[str, Any]:
    return {"id": case_id, "program_key": SAXPY_KEY, "kernel": kernel,
            "args": [{"scalar": 0, "size": 4}, {"in": 4, "size": 4 * N}, {"in": 4 + 4 * N, "size": 4 * N},
                     {"out": 4 * N}],
            "global": [N], "local": None}


def start_release(agent: Agent, release: str) -> dict[str, Any]:
    """begin, then put the test kernels; returns the begin reply."""
    begin, _ = agent.ok("begin", release=release)
    for path, data in (("kernels/saxpy.cl", SAXPY_CL), ("kernels/common.h", COMMON_H),
                       ("kernels/broken.cl", BROKEN_CL)):
        reply, _ = agent.put(path, data)
        assert reply == {"ok": True, "path": path, "size": len(data)}, reply
    return begin


# --------------------------------------------------------------------------------------------------
# one whole session, shared by the tests that read it
# --------------------------------------------------------------------------------------------------

class Pushed:
    rd: Path
    hello: dict[str, Any]
    begin: dict[str, Any]
    fingerprint: dict[str, Any]
    build: dict[str, Any]
    cache: bytes
    manifest: dict[str, Any]
    smoke: dict[str, Any]
    smoke_out: bytes
    commit: dict[str, Any]
    exit_code: int


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, agent_env: dict[str, str]) -> Pushed:
    result = Pushed()
    result.rd = tmp_path_factory.mktemp("board") / "deployer"  # does not exist yet: the agent creates it
    agent = Agent.serve(result.rd, agent_env)
    try:
        result.hello = agent.hello
        result.begin = start_release(agent, "r1")
        result.fingerprint = agent.ok("fingerprint", opencl={})[0]["fingerprint"]
        result.build, _ = agent.ok("build", opencl={"device_type": "any"}, mace_version=MACE_VERSION,
                                   programs=[saxpy_program(), broken_program()], timeout_s=120)
        reply, result.cache = agent.ok("get", path=result.build["cache_file"])
        assert reply["size"] == len(result.cache)
        assert reply["sha256"] == hashlib.sha256(result.cache).hexdigest()
        reply, manifest = agent.ok("get", path=result.build["manifest_file"])
        result.manifest = json.loads(manifest)
        payload, _, _, _ = saxpy_inputs()
        expected = {SAXPY_KEY: hashlib.sha256(dict(decode_mace_pb(result.cache))[SAXPY_KEY]).hexdigest()}
        result.smoke, result.smoke_out = agent.ok(
            "smoke", payload, opencl={}, cache_file=result.build["cache_file"], expected=expected,
            cases=[saxpy_case("saxpy"), saxpy_case("no-such-kernel", kernel="nope"), saxpy_case("again")])
        result.commit, _ = agent.ok("commit", keep=3)
        result.exit_code = agent.bye()
    finally:
        agent.kill()
    return result


def test_hello_names_agent_and_python(pushed: Pushed) -> None:
    assert pushed.hello["agent_version"] == AGENT_VERSION
    assert pushed.hello["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert isinstance(pushed.hello["pid"], int)
    assert pushed.begin == {"ok": True, "release": "r1", "previous": None, "need": None}


def test_fingerprint_matches_pyopencl(pushed: Pushed) -> None:
    cl = pytest.importorskip("pyopencl")
    fp = pushed.fingerprint
    platform = cl.get_platforms()[fp["platform_index"]]
    device = platform.get_devices()[fp["device_index"]]
    assert fp["platform"]["name"] == platform.name
    assert fp["platform"]["version"] == platform.version
    assert fp["platform"]["vendor"] == platform.vendor
    assert fp["device"]["name"] == device.name
    assert fp["device"]["driver_version"] == device.driver_version
    assert fp["device"]["compute_units"] == device.max_compute_units
    assert fp["device"]["max_work_group_size"] == device.max_work_group_size
    assert fp["device"]["type"] == ["CPU"] and fp["cpu_only"] is True
    ident = "|".join([platform.name, platform.version, device.name, device.driver_version])
    assert fp["id"] == hashlib.sha256(ident.encode()).hexdigest()[:16]
    assert fp["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert set(fp) == {"platform", "device", "cpu_only", "platform_index", "device_index", "python", "id"}


def test_build_reports_each_program(pushed: Pushed) -> None:
    by_key = {p["key"]: p for p in pushed.build["programs"]}
    saxpy, broken = by_key[SAXPY_KEY], by_key[BROKEN_KEY]
    assert saxpy["ok"] is True and saxpy["binary_size"] > 0 and saxpy["build_ms"] > 0
    assert broken["ok"] is False and broken["sha256"] is None
    assert "kernels/broken.cl:3:" in broken["log"] and "bogus_identifier" in broken["log"], broken["log"]
    assert "CL_BUILD_PROGRAM_FAILURE (-11)" in broken["error"]
    assert pushed.build["cache_file"] == "build/mace_cl_compiled_program.bin"
    assert pushed.build["manifest_file"] == "build/manifest.json"
    assert pushed.build["cache_sha256"] == hashlib.sha256(pushed.cache).hexdigest()
    assert pushed.build["cache_size"] == len(pushed.cache)


def test_cache_file_holds_mace_entries(pushed: Pushed) -> None:
    pairs = decode_mace_pb(pushed.cache)
    keys = [k for k, _ in pairs]
    assert keys == sorted(keys, key=lambda k: k.encode())  # MACE's std::map order
    entries = dict(pairs)
    fp = pushed.fingerprint
    assert entries[PLATFORM_INFO_KEY] == (", ".join([fp["platform"]["name"], fp["platform"]["profile"],
                                                     fp["platform"]["version"], MACE_VERSION])).encode()
    assert entries[DEVICE_NAME_KEY] == b""  # neither Adreno, Mali nor PowerVR
    assert entries["program_hash_ " + SAXPY_KEY] == mace_program_hash(SAXPY_CL, [COMMON_H]).encode()
    assert entries[SAXPY_KEY].startswith(b"poclbin")
    saxpy = next(p for p in pushed.build["programs"] if p["key"] == SAXPY_KEY)
    assert hashlib.sha256(entries[SAXPY_KEY]).hexdigest() == saxpy["sha256"]
    assert BROKEN_KEY not in entries and "program_hash_ " + BROKEN_KEY not in entries


def test_manifest_and_logs_on_disk(pushed: Pushed) -> None:
    manifest = pushed.manifest
    assert manifest["schema"] == 1 and manifest["mace_version"] == MACE_VERSION
    assert manifest["fingerprint"] == pushed.fingerprint
    assert manifest["cache_sha256"] == hashlib.sha256(pushed.cache).hexdigest()
    (program,) = manifest["programs"]
    assert program["key"] == SAXPY_KEY and program["name"] == "saxpy" and program["options"] == SAXPY_OPTIONS
    assert program["source_sha256"] == hashlib.sha256(SAXPY_CL).hexdigest()
    assert program["program_hash"] == mace_program_hash(SAXPY_CL, [COMMON_H])
    logs = pushed.rd / "releases" / "r1" / "build" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["broken.log", "saxpy_-DDATA_TYPE=float.log"]
    assert "bogus_identifier" in (logs / "broken.log").read_text()
    leftovers = [p for p in (pushed.rd / "releases" / "r1").rglob(".*tmp-*")]
    assert leftovers == []


def test_smoke_runs_saxpy_like_numpy(pushed: Pushed) -> None:
    _, a, x, y = saxpy_inputs()
    cases = pushed.smoke["cases"]
    assert [c["id"] for c in cases] == ["saxpy", "no-such-kernel", "again"]
    assert cases[0]["ok"] and cases[2]["ok"] and cases[0]["outputs"] == [{"size": 4 * N}]
    assert cases[1]["ok"] is False and cases[1]["outputs"] == []
    assert cases[1]["error"] == "CL_INVALID_KERNEL_NAME (-46) in clCreateKernel"
    assert set(pushed.smoke["load_ms"]) == {SAXPY_KEY}
    assert len(pushed.smoke_out) == 2 * 4 * N
    want = np.float32(a) * x + y
    for chunk in (pushed.smoke_out[:4 * N], pushed.smoke_out[4 * N:]):
        np.testing.assert_allclose(np.frombuffer(chunk, dtype=np.float32), want, rtol=1e-6, atol=1e-6)


def test_commit_switches_current(pushed: Pushed) -> None:
    assert pushed.commit["current"] == "r1"
    current = pushed.rd / "current"
    assert current.is_symlink() and os.readlink(current) == "releases/r1"
    assert not (pushed.rd / ".lock").read_bytes()  # the lock file stays, empty; the flock is gone
    assert pushed.exit_code == 0
    assert [p.name for p in pushed.rd.iterdir() if p.name.startswith(".current.tmp")] == []


# --------------------------------------------------------------------------------------------------
# the MACE container
# --------------------------------------------------------------------------------------------------

def test_golden_mace_bytes() -> None:
    assert encode_mace_pb([("a", b"xy")]) == bytes.fromhex("0a070a01611202787923343785")
    assert encode_mace_pb([]) == b"\0\0\0\0"
    assert decode_mace_pb(b"\0\0\0\0") == []


def test_mace_rules() -> None:
    assert mace_program_key("conv", ["-DB", "-DA", "-DB"]) == "conv -DA -DB"
    assert mace_program_key("conv", ["", "-DA"]) == "conv  -DA"  # an empty option gives a double space
    assert mace_program_hash(b"src", [b"h"]) == (hashlib.md5(b"src").hexdigest()[-10:]
                                                 + hashlib.md5(b"h").hexdigest()[-10:])
    assert mace_device_name("QUALCOMM Adreno(TM)", "OpenCL 2.0 Adreno(TM) 640") == "Adreno(TM) 640"
    assert mace_device_name("Mali-G52", "OpenCL 2.0 v1.r16p0") == "Mali-G52"
    assert mace_device_name("PowerVR Rogue GE8320", "OpenCL 1.2") == "PowerVR Rogue GE8320"
    assert mace_device_name("pthread-skylake", "OpenCL 3.0 PoCL") == ""
    info = mace_platform_info("P", "FULL_PROFILE", "OpenCL 3.0", "v1")
    assert info == "P, FULL_PROFILE, OpenCL 3.0, v1"


@pytest.mark.parametrize("pairs", [
    [],
    [("a", b"")],
    [("b", b"\x00" * 300), ("a", bytes(range(256))), ("program_hash_ k -DX", b"0123456789")],
    [("ключ", b"v" * 70000)],
])
def test_mace_round_trip(pairs: list[tuple[str, bytes]]) -> None:
    assert decode_mace_pb(encode_mace_pb(pairs)) == sorted(pairs, key=lambda kv: kv[0].encode())


def test_decoder_reads_uint32_lists() -> None:
    kv = b"\x0a\x01k" + b"\x18\x05" + b"\x18\xac\x02"  # key "k", uint32s [5, 300], one varint each
    body = b"\x0a" + bytes([len(kv)]) + kv
    data = body + struct.pack("<I", zlib.crc32(body))
    assert decode_mace_pb(data) == [("k", struct.pack("<2I", 5, 300))]


def test_decoder_rejects_damage(pushed: Pushed) -> None:
    with pytest.raises(ValueError, match="crc mismatch"):
        decode_mace_pb(pushed.cache[: len(pushed.cache) // 2])  # truncated cache file
    with pytest.raises(ValueError, match="crc mismatch"):
        decode_mace_pb(pushed.cache + b"junk")
    for cut in range(len(encode_mace_pb([("key", b"value")]))):
        with pytest.raises(ValueError):
            decode_mace_pb(encode_mace_pb([("key", b"value")])[:cut])


@pytest.mark.parametrize("body, reason", [
    (b"\x12\x00", "top-level"),                      # field 2 at the top
    (b"\x0a\x05\x0a\x01a", "past the end"),          # pair longer than the data
    (b"\x0a\x03\x12\x01x", "without a key"),         # no key
    (b"\x0a\x06\x0a\x01a\x0a\x01b", "repeated"),     # two keys
    (b"\x0a\x04\x0a\x02\xff\xfe", "not UTF-8"),
    (b"\x0a\x03\x0a\x01a\x20", "unexpected"),        # field 4 inside a pair
    (b"\x0a\x01", "past the end"),                   # length missing
    (b"\x0a\x0a\x0a\x01a\x18\xff\xff\xff\xff\xff\x01", "uint32"),  # value over 32 bits
])
def test_decoder_rejects_malformed(body: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_mace_pb(body + struct.pack("<I", zlib.crc32(body)))


# --------------------------------------------------------------------------------------------------
# framing and requests
# --------------------------------------------------------------------------------------------------

def test_bad_requests_get_replies_not_tracebacks(tmp_path: Path, agent_env: dict[str, str],
                                                 agents: list[Agent]) -> None:
    agent = Agent.serve(tmp_path / "rd", agent_env)
    agents.append(agent)
    agent.stdin.write(b"this is not json\n")
    agent.stdin.flush()
    reply, _ = agent.recv()
    assert reply["error"]["kind"] == "bad_request"
    agent.stdin.write(b"[1, 2]\n")
    agent.stdin.flush()
    assert agent.recv()[0]["error"]["kind"] == "bad_request"
    agent.stdin.write(b'{"op": "' + b"x" * (1 << 20) + b'"}\n')  # over the 1 MiB line limit
    agent.stdin.flush()
    assert "longer than" in agent.recv()[0]["error"]["message"]
    assert "unknown op" in agent.fail("frobnicate", "bad_request")
    assert "missing field 'release'" in agent.fail("begin", "bad_request")
    assert agent.fail("begin", "bad_request", release="../up") != ""
    assert "send begin first" in agent.fail("put", "bad_request", b"x", path="a", size=1,
                                            sha256=hashlib.sha256(b"x").hexdigest())
    assert "nothing is deployed" in agent.fail("get", "no_release", path="x")
    assert agent.bye() == 0
    assert b"Traceback" not in agent.proc.stderr.read()  # type: ignore[union-attr]


def test_put_refuses_paths_outside_the_release(tmp_path: Path, agent_env: dict[str, str],
                                               agents: list[Agent], tmp_path_factory: pytest.TempPathFactory
                                               ) -> None:
    rd = tmp_path / "rd"
    agent = Agent.serve(rd, agent_env)
    agents.append(agent)
    agent.ok("begin", release="p1")
    outside = tmp_path_factory.mktemp("outside")
    for path in ("../x", "/etc/x", "a/../../x", "a//b", "./x", str(outside / "x")):
        reply, _ = agent.put(path, b"data")
        assert reply["error"]["kind"] == "bad_request", (path, reply)
    (rd / "releases" / "p1" / "link").symlink_to(outside)  # a symlink that leads out
    reply, _ = agent.put("link/x", b"data")
    assert reply["error"]["kind"] == "bad_request" and "outside" in reply["error"]["message"]
    assert list(outside.iterdir()) == []
    # a wrong checksum leaves nothing behind, a right one writes the file with its mode
    reply, _ = agent.put("models/m.bin", b"data", sha256="0" * 64)
    assert reply["error"]["kind"] == "checksum"
    assert list((rd / "releases" / "p1" / "models").iterdir()) == []
    agent.ok("put", b"data", path="models/m.bin", size=4, sha256=hashlib.sha256(b"data").hexdigest(),
             mode=0o600)
    written = rd / "releases" / "p1" / "models" / "m.bin"
    assert written.read_bytes() == b"data" and written.stat().st_mode & 0o777 == 0o600
    reply, data = agent.ok("get", path="models/m.bin")
    assert data == b"data" and reply["size"] == 4
    assert agent.fail("get", "bad_request", path="../../etc/passwd")
    message = agent.fail("put", "io", b"data", path="models/m.bin/under-a-file", size=4,
                         sha256=hashlib.sha256(b"data").hexdigest())
    assert message.startswith("models/m.bin/under-a-file: ")  # the OS message and the path
    assert agent.bye() == 0


def test_eof_before_commit_drops_the_release(tmp_path: Path, agent_env: dict[str, str],
                                             agents: list[Agent]) -> None:
    rd = tmp_path / "rd"
    first = Agent.serve(rd, agent_env)
    agents.append(first)
    first.ok("begin", release="keep")
    first.ok("commit", keep=3)
    assert first.bye() == 0
    second = Agent.serve(rd, agent_env)
    agents.append(second)
    assert second.ok("begin", release="dropped")[0]["previous"] == "keep"
    reply, _ = second.put("models/m.bin", b"x" * 1000)
    assert reply["ok"]
    second.send({"op": "put", "path": "models/n.bin", "size": 10, "sha256": "0" * 64, "payload_size": 10})
    second.stdin.write(b"abc")  # the controller dies in the middle of a payload
    assert second.end_input() != 0
    assert not (rd / "releases" / "dropped").exists()
    assert os.readlink(rd / "current") == "releases/keep"
    third = Agent.serve(rd, agent_env)  # the lock went with the process
    agents.append(third)
    third.ok("begin", release="next")
    assert third.end_input() != 0


def test_lock_refuses_a_second_writer(tmp_path: Path, agent_env: dict[str, str], agents: list[Agent]) -> None:
    rd = tmp_path / "rd"
    first, second = Agent.serve(rd, agent_env), Agent.serve(rd, agent_env)
    agents.extend([first, second])
    first.ok("begin", release="a")
    message = second.fail("begin", "locked", release="b")
    assert message == "another deploy is writing this device (lock %s)" % (rd / ".lock")
    assert not (rd / "releases" / "b").exists()
    first.ok("commit", keep=3)  # commit releases the lock
    second.ok("begin", release="b")
    assert second.fail("begin", "bad_request", release="c")  # one release per session
    assert first.bye() == 0 and second.bye() == 0
    assert not (rd / "releases" / "b").exists()  # bye without commit drops it too


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10).stdout
    return [int(line) for line in found.split()]


def test_a_vanished_controller_stops_a_build_at_once(tmp_path: Path, agent_env: dict[str, str],
                                                     agents: list[Agent]) -> None:
    """The controller gone mid-compile (killed, Ctrl-C, link cut): the agent kills its OpenCL child, drops the
    release and the lock within a second or two, rather than finishing a compile nobody waits for while a
    re-run finds the device locked."""
    rd = tmp_path / "rd"
    agent = Agent.serve(rd, agent_env)
    agents.append(agent)
    agent.ok("begin", release="slow")
    heavy = "__kernel void heavy(__global float *x) {\n  float a = x[get_global_id(0)];\n" + "".join(
        f"  a = a * {1 + i * 1e-6:.7f}f + sin(a * {i % 7 + 1}.0f);\n" for i in range(200)) + \
        "  x[get_global_id(0)] = a;\n}\n"
    agent.put("kernels/heavy.cl", heavy.encode())
    programs = [{"key": f"heavy -DV={i}", "name": "heavy", "source": "kernels/heavy.cl", "headers": [],
                 "options": [f"-DV={i}"], "compile_options": []} for i in range(60)]  # a minute of compiling
    agent.send({"op": "build", "opencl": {}, "mace_version": MACE_VERSION, "programs": programs})
    end = time.monotonic() + 20
    while not _children(agent.proc.pid) and time.monotonic() < end:
        time.sleep(0.05)
    children = _children(agent.proc.pid)
    assert children, "the build's OpenCL child never started"
    time.sleep(1.0)  # well inside the compile
    assert _children(agent.proc.pid) == children and agent.proc.poll() is None
    start = time.monotonic()
    agent.stdin.close()  # what the agent sees when sshd closes a dead controller's channel
    assert agent.proc.wait(15) == 1  # a begun release was dropped
    assert time.monotonic() - start < 3.0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    assert not (rd / "releases" / "slow").exists()
    with open(rd / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free at once for the next push


def _given_build(agent: Agent, release: str, binary: bytes, **given: Any) -> dict[str, Any]:
    """A build of saxpy on a fresh release with `binary` given as another device's build of it."""
    start_release(agent, release)
    entry = {"key": SAXPY_KEY, "sha256": hashlib.sha256(binary).hexdigest(), "size": len(binary), "from": "sim-01"}
    reply, _ = agent.call("build", binary, opencl={}, mace_version=MACE_VERSION, programs=[saxpy_program()],
                          given=[dict(entry, **given)], timeout_s=120)
    return reply


def test_a_given_binary_this_driver_loads_enters_the_cache_file_as_given(
        pushed: Pushed, tmp_path: Path, agent_env: dict[str, str], agents: list[Agent]) -> None:
    binary = dict(decode_mace_pb(pushed.cache))[SAXPY_KEY]
    agent = Agent.serve(tmp_path / "rd", agent_env)
    agents.append(agent)
    reply = _given_build(agent, "g1", binary)
    assert reply["ok"] is True, reply
    (record,) = reply["programs"]
    assert record["given"] == "loaded" and record["ok"] is True, record
    assert record["sha256"] == hashlib.sha256(binary).hexdigest() and "sim-01" in record["log"]
    _, cache = agent.ok("get", path=reply["cache_file"])
    assert dict(decode_mace_pb(cache))[SAXPY_KEY] == binary  # the builder's bytes, as they came
    _, manifest = agent.ok("get", path=reply["manifest_file"])
    assert [p["sha256"] for p in json.loads(manifest)["programs"]] == [record["sha256"]]
    assert agent.ok("bye")[0]["dropped"] == "g1"  # nothing committed: the release is dropped


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_a_given_binary_the_driver_refuses_is_compiled_here_instead(
        pushed: Pushed, tmp_path: Path, agent_env: dict[str, str], agents: list[Agent], damage: str) -> None:
    """A builder's binary this driver will not load (junk; or truncated, on which PoCL crashes: the child dies,
    and the build runs again without it): the program is compiled from source and the record says so."""
    good = dict(decode_mace_pb(pushed.cache))[SAXPY_KEY]
    binary = b"not a binary at all" * 8 if damage == "junk" else good[: len(good) // 3]
    agent = Agent.serve(tmp_path / "rd", agent_env)
    agents.append(agent)
    reply = _given_build(agent, "g2", binary)
    assert reply["ok"] is True, reply
    (record,) = reply["programs"]
    assert record["ok"] is True and record["given"].startswith("refused: "), record
    assert record["sha256"] != hashlib.sha256(binary).hexdigest()
    _, cache = agent.ok("get", path=reply["cache_file"])
    assert dict(decode_mace_pb(cache))[SAXPY_KEY].startswith(b"poclbin")


def test_given_binaries_are_checked_before_any_driver_runs(
        pushed: Pushed, tmp_path: Path, agent_env: dict[str, str], agents: list[Agent]) -> None:
    binary = dict(decode_mace_pb(pushed.cache))[SAXPY_KEY]
    agent = Agent.serve(tmp_path / "rd", agent_env)
    agents.append(agent)
    reply = _given_build(agent, "g3", binary, sha256="0" * 64)
    assert reply["ok"] is False and reply["error"]["kind"] == "checksum", reply
    agent.call("bye")
    agent = Agent.serve(tmp_path / "rd2", agent_env)
    agents.append(agent)
    reply = _given_build(agent, "g4", binary, key=BROKEN_KEY)  # not one of the programs: no source to fall back on
    assert reply["ok"] is False and reply["error"]["kind"] == "bad_request", reply


def test_commit_prunes_old_releases(tmp_path: Path, agent_env: dict[str, str], agents: list[Agent]) -> None:
    rd = tmp_path / "rd"
    agent = Agent.serve(rd, agent_env)
    agents.append(agent)
    pruned = []
    for release in ("2026-01", "2026-02", "2026-03", "2026-04"):
        agent.ok("begin", release=release)
        pruned.append(agent.ok("commit", keep=2)[0]["pruned"])
    assert pruned == [[], [], ["2026-01"], ["2026-02"]]
    assert sorted(p.name for p in (rd / "releases").iterdir()) == ["2026-03", "2026-04"]
    assert os.readlink(rd / "current") == "releases/2026-04"
    assert agent.fail("begin", "bad_request", release="2026-04")  # ids are never reused
    assert agent.bye() == 0


def test_requests_checked_before_any_driver_runs(tmp_path: Path, agent_env: dict[str, str],
                                                 agents: list[Agent]) -> None:
    agent = Agent.serve(tmp_path / "rd", agent_env)
    agents.append(agent)
    start_release(agent, "q1")
    wrong_key = dict(saxpy_program(), key="saxpy")
    message = agent.fail("build", "bad_request", opencl={}, mace_version="v", programs=[wrong_key])
    assert "not MACE's key" in message
    escaping = dict(saxpy_program(), source="../saxpy.cl")
    assert agent.fail("build", "bad_request", opencl={}, mace_version="v", programs=[escaping])
    message = agent.fail("smoke", "bad_request", b"\0" * 8, opencl={}, cache_file="build/none.bin",
                         expected={}, cases=[saxpy_case("s")])
    assert "not in 'expected'" in message
    message = agent.fail("smoke", "bad_request", b"\0" * 8, opencl={}, cache_file="build/none.bin",
                         expected={SAXPY_KEY: "0" * 64}, cases=[saxpy_case("s")])
    assert "outside the 8-byte payload" in message
    assert agent.bye() == 0


def test_selection_by_name_and_index(tmp_path: Path, agent_env: dict[str, str], agents: list[Agent]) -> None:
    env = dict(agent_env, POCL_DEVICES="basic pthread")  # two CPU devices on one platform
    agent = Agent.serve(tmp_path / "rd", env)
    agents.append(agent)
    first = agent.ok("fingerprint", opencl={})[0]["fingerprint"]
    assert (first["device_index"], first["device"]["name"][:6]) == (0, "basic-")
    chosen = agent.ok("fingerprint", opencl={"platform": "PORTABLE", "device": "pthread",
                                             "device_type": "cpu"})[0]["fingerprint"]
    assert (chosen["platform_index"], chosen["device_index"]) == (0, 1)
    assert chosen["device"]["name"].startswith("pthread-") and chosen["id"] != first["id"]
    assert agent.ok("fingerprint", opencl={"platform": 0, "device": 1})[0]["fingerprint"] == chosen
    assert agent.bye() == 0


# --------------------------------------------------------------------------------------------------
# OpenCL failures
# --------------------------------------------------------------------------------------------------

def _cache_with_saxpy(pushed: Pushed, program: bytes) -> bytes:
    entries = dict(decode_mace_pb(pushed.cache))
    entries[SAXPY_KEY] = program
    return encode_mace_pb(sorted(entries.items()))


def test_flipped_byte_is_binary_mismatch(pushed: Pushed, tmp_path: Path, agent_env: dict[str, str],
                                         agents: list[Agent]) -> None:
    good = dict(decode_mace_pb(pushed.cache))[SAXPY_KEY]
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    agent = Agent.serve(tmp_path / "rd", agent_env)
    agents.append(agent)
    agent.ok("begin", release="m1")
    agent.put("build/cache.bin", _cache_with_saxpy(pushed, bytes(bad)))
    payload, _, _, _ = saxpy_inputs()
    message = agent.fail("smoke", "binary_mismatch", payload, opencl={}, cache_file="build/cache.bin",
                         expected={SAXPY_KEY: hashlib.sha256(good).hexdigest()}, cases=[saxpy_case("s")])
    assert SAXPY_KEY in message
    agent.put("build/short.bin", pushed.cache[:-10])
    message = agent.fail("smoke", "binary_mismatch", payload, opencl={}, cache_file="build/short.bin",
                         expected={SAXPY_KEY: hashlib.sha256(good).hexdigest()}, cases=[])
    assert "crc mismatch" in message
    assert agent.bye() == 0


def test_driver_segfault_is_driver_crash(pushed: Pushed, tmp_path: Path, agent_env: dict[str, str],
                                         agents: list[Agent]) -> None:
    good = dict(decode_mace_pb(pushed.cache))[SAXPY_KEY]
    corrupt = good[:100] + b"\xab" * 400  # PoCL 3.1 segfaults in clCreateProgramWithBinary on this
    agent = Agent.serve(tmp_path / "rd", agent_env)
    agents.append(agent)
    agent.ok("begin", release="c1")
    agent.put("build/cache.bin", _cache_with_saxpy(pushed, corrupt))
    payload, _, _, _ = saxpy_inputs()
    message = agent.fail("smoke", "driver_crash", payload, opencl={}, cache_file="build/cache.bin",
                         expected={SAXPY_KEY: hashlib.sha256(corrupt).hexdigest()}, cases=[saxpy_case("s")])
    assert message.startswith("OpenCL driver crashed (SIGSEGV) during smoke"), message
    fingerprint = agent.ok("fingerprint", opencl={})[0]["fingerprint"]  # the agent still serves
    assert fingerprint["id"] == pushed.fingerprint["id"]
    assert agent.bye() == 0


def test_child_past_its_timeout_is_killed(tmp_path: Path, agent_env: dict[str, str],
                                          agents: list[Agent]) -> None:
    agent = Agent.serve(tmp_path / "rd", agent_env)
    agents.append(agent)
    message = agent.fail("fingerprint", "timeout", opencl={}, timeout_s=0.001)
    assert "did not finish within 0.001 s" in message
    assert agent.bye() == 0


@pytest.mark.parametrize("setup, kind, words", [
    ("broken_icd", "icd_missing_library", ["broken.icd", "libdeployer-missing.so"]),
    ("empty_icd_dir", "no_platform", ["no .icd file in"]),
    ("no_loader", "no_loader", ["libOpenCL-absent.so.1"]),
    ("library_absent", "no_loader", ["/opt/vendor/libOpenCL-absent.so"]),
    ("gpu_only", "no_device", ["only a CPU device (pthread", "set opencl.device_type: any"]),
    ("no_match", "no_match", ["no platform matches", "Portable Computing Language"]),
    ("no_device_index", "no_match", ["no device matches", "pthread"]),
])
def test_opencl_setup_errors(setup: str, kind: str, words: list[str], tmp_path: Path,
                             agent_env: dict[str, str], agents: list[Agent]) -> None:
    env, opencl = dict(agent_env), dict[str, Any]()
    vendors = tmp_path / "vendors"
    vendors.mkdir()
    if setup == "broken_icd":
        (vendors / "broken.icd").write_text("libdeployer-missing.so\n")
        env["OCL_ICD_VENDORS"] = str(vendors)
    elif setup == "empty_icd_dir":
        env["OCL_ICD_VENDORS"] = str(vendors)
    elif setup == "no_loader":
        env["DEPLOYER_OPENCL_LIBRARY"] = "libOpenCL-absent.so.1"
    elif setup == "library_absent":  # the inventory's opencl.library wins over the environment
        env["DEPLOYER_OPENCL_LIBRARY"] = "libOpenCL.so.1"
        opencl = {"library": "/opt/vendor/libOpenCL-absent.so"}
    elif setup == "gpu_only":
        opencl = {"device_type": "gpu"}
    elif setup == "no_match":
        opencl = {"platform": "nvidia"}
    else:
        opencl = {"device": 7}
    agent = Agent.serve(tmp_path / "rd", env)
    agents.append(agent)
    message = agent.fail("fingerprint", kind, opencl=opencl)
    for word in words:
        assert word in message, message
    assert agent.fail("fingerprint", "bad_request", opencl={"device_type": "fpga"})
    assert "opencl.library" in agent.fail("fingerprint", "bad_request", opencl={"library": "lib/libOpenCL.so"})
    assert agent.bye() == 0


def test_opencl_library_is_the_one_loaded(tmp_path: Path, agent_env: dict[str, str], agents: list[Agent]) -> None:
    """`opencl.library` names the library the child loads: the ICD loader by its absolute path gives the same
    fingerprint as the default (an absent one fails: test_opencl_setup_errors)."""
    agent = Agent.serve(tmp_path / "rd", agent_env)
    agents.append(agent)
    default, _ = agent.ok("fingerprint", opencl={})
    path = next(p for p in ("/usr/lib/x86_64-linux-gnu/libOpenCL.so.1", "/usr/lib/aarch64-linux-gnu/libOpenCL.so.1")
                if os.path.exists(p))
    named, _ = agent.ok("fingerprint", opencl={"library": path})
    assert named["fingerprint"]["id"] == default["fingerprint"]["id"]
    assert agent.bye() == 0


# --------------------------------------------------------------------------------------------------
# bootstrap, and the oldest supported Python
# --------------------------------------------------------------------------------------------------

def bootstrap(rd: Path, env: dict[str, str], python: str = sys.executable) -> Agent:
    """The bootstrap, as the second remote command runs it; it has asked for the bundle."""
    agent = Agent([python, "-c", BOOTSTRAP, str(rd), BUNDLE.id12], env)
    assert agent.stdout.readline() == b'{"op":"need_agent"}\n'
    return agent


def test_bootstrap_receives_and_runs_the_agent(tmp_path: Path, agent_env: dict[str, str],
                                               agents: list[Agent]) -> None:
    rd = tmp_path / "rd"
    agent = bootstrap(rd, agent_env)
    agents.append(agent)
    agent.send(*BUNDLE.message())
    hello, _ = agent.recv()
    assert hello["op"] == "hello" and hello["agent"] == BUNDLE.id
    stored = rd / "agent" / BUNDLE.id12
    assert sorted(p.name for p in (rd / "agent").iterdir()) == [BUNDLE.id12]  # no temp folder left
    for path, data in BUNDLE.files:
        assert (stored / path).read_bytes() == data
    assert list((stored / "deployer_remote" / "__pycache__").glob("session.*.pyc"))  # run by import
    assert agent.bye() == 0


@pytest.mark.parametrize("damage", ["bytes", "path", "order"])
def test_bootstrap_refuses_a_wrong_bundle(tmp_path: Path, agent_env: dict[str, str], agents: list[Agent],
                                          damage: str) -> None:
    rd = tmp_path / "rd"
    agent = bootstrap(rd, agent_env)
    agents.append(agent)
    header, payload = BUNDLE.message()
    index = list(header["files"])  # type: ignore[call-overload]
    if damage == "bytes":
        payload = payload[:-1] + b"#"
    elif damage == "path":
        index[0] = ["deployer_remote/../../evil.py", index[0][1]]
    else:
        index = index[::-1]
    try:
        agent.send(dict(header, files=index), payload)
    except BrokenPipeError:
        pass  # a bad index is refused before the bytes are read
    reply, _ = agent.recv()
    assert reply["ok"] is False and reply["error"]["kind"] == ("checksum" if damage == "bytes" else "bad_request")
    assert agent.proc.wait(10) == 1
    assert not (rd / "agent").exists() or list((rd / "agent").iterdir()) == []
    assert not (tmp_path / "evil.py").exists()


def test_bootstrap_uses_a_bundle_another_controller_stored_first(tmp_path: Path, agent_env: dict[str, str],
                                                                 agents: list[Agent]) -> None:
    """Two controllers bootstrapping one board at once: the second rename finds the folder there and runs it."""
    rd = tmp_path / "rd"
    agent = bootstrap(rd, agent_env)
    agents.append(agent)
    shutil.copytree(stored_bundle(), rd / "agent" / BUNDLE.id12)  # stored meanwhile by the other one
    agent.send(*BUNDLE.message())
    hello, _ = agent.recv()
    assert hello["op"] == "hello" and hello["agent"] == BUNDLE.id
    assert sorted(p.name for p in (rd / "agent").iterdir()) == [BUNDLE.id12]
    assert agent.bye() == 0


def test_truncated_bytecode_of_any_module_is_dropped(tmp_path: Path, agent_env: dict[str, str],
                                                     agents: list[Agent]) -> None:
    """A full disk can leave a truncated .pyc (Python does not check its short write): LAUNCH drops every
    __pycache__ of the bundle and imports without writing bytecode, whichever module it was."""
    root = tmp_path / BUNDLE.id12
    shutil.copytree(stored_bundle(), root)
    warm = Agent([sys.executable, "-c", LAUNCH, str(root), "deployer_remote.main", "serve", str(tmp_path / "rd")],
                 agent_env)
    agents.append(warm)
    warm.recv()
    assert warm.bye() == 0
    cached = list((root / "deployer_remote" / "__pycache__").glob("*.pyc"))
    assert {p.name.split(".")[0] for p in cached} >= {"session", "framing", "bundle"}
    for pyc in cached:
        pyc.write_bytes(pyc.read_bytes()[:20])  # header intact, marshal data cut short
    agent = Agent([sys.executable, "-c", LAUNCH, str(root), "deployer_remote.main", "serve", str(tmp_path / "rd")],
                  agent_env)
    agents.append(agent)
    hello, _ = agent.recv()
    assert hello["op"] == "hello" and hello["agent"] == BUNDLE.id
    assert not (root / "deployer_remote" / "__pycache__").exists()
    assert agent.bye() == 0


def test_commit_prunes_old_bundles(tmp_path: Path, agent_env: dict[str, str], agents: list[Agent]) -> None:
    """As releases are: the running bundle and the two used last stay; older bundles, the one-file agents of
    earlier versions (and their bytecode) and a killed bootstrap's stale temp folder go."""
    rd = tmp_path / "rd"
    agent_dir = rd / "agent"
    now = time.time()
    olds = [f"{n:012x}" for n in range(4)]  # used 4, 3, 2 and 1 hours ago
    for age, name in zip((4, 3, 2, 1), olds, strict=True):
        (agent_dir / name / "deployer_remote").mkdir(parents=True)
        os.utime(agent_dir / name, (now - age * 3600, now - age * 3600))
    legacy = agent_dir / "agent_0123456789ab.py"
    legacy.write_text("# the one-file agent\n")
    os.utime(legacy, (now - 9000, now - 9000))
    (agent_dir / "__pycache__").mkdir()
    stale, fresh = agent_dir / ".tmp-aaaaaaaaaaaa-1", agent_dir / ".tmp-bbbbbbbbbbbb-2"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (now - 3600, now - 3600))
    agent = Agent.serve(rd, agent_env)  # runs from a bundle outside RD: every folder here is another's
    agents.append(agent)
    start_release(agent, "p1")
    agent.ok("commit", keep=1)
    assert agent.bye() == 0
    assert sorted(p.name for p in agent_dir.iterdir()) == sorted([olds[2], olds[3], fresh.name])


def find_python36() -> str | None:
    """A working Python 3.6 (the oldest the agent supports): on PATH, or one pyenv installed."""
    candidates = [shutil.which("python3.6") or ""]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.6*/bin/python3.6"))
    for python in filter(None, candidates):
        try:
            probe = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True, timeout=20)
        except OSError:
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 6)":
            return python
    return None


def test_runs_on_python_36(tmp_path: Path, agent_env: dict[str, str], agents: list[Agent]) -> None:
    python = find_python36()
    if python is None:
        pytest.skip("no python3.6 on this machine")
    agent = bootstrap(tmp_path / "rd", agent_env, python)  # the bootstrap on 3.6 too
    agents.append(agent)
    agent.send(*BUNDLE.message())
    agent.hello, _ = agent.recv()
    assert agent.hello["python"].startswith("3.6.")
    start_release(agent, "py36")
    build, _ = agent.ok("build", opencl={}, mace_version=MACE_VERSION, programs=[saxpy_program()])
    assert build["programs"][0]["ok"]
    _, cache = agent.ok("get", path=build["cache_file"])
    binary = dict(decode_mace_pb(cache))[SAXPY_KEY]
    payload, a, x, y = saxpy_inputs()
    smoke, out = agent.ok("smoke", payload, opencl={}, cache_file=build["cache_file"],
                          expected={SAXPY_KEY: hashlib.sha256(binary).hexdigest()}, cases=[saxpy_case("s")])
    assert smoke["cases"][0]["ok"]
    np.testing.assert_allclose(np.frombuffer(out, dtype=np.float32), np.float32(a) * x + y,
                               rtol=1e-6, atol=1e-6)
    agent.ok("commit", keep=1)
    assert agent.bye() == 0


def test_sigterm_drops_an_uncommitted_release(tmp_path: Path, agent_env: dict[str, str],
                                              agents: list[Agent]) -> None:
    rd = tmp_path / "rd"
    agent = Agent.serve(rd, agent_env)
    agents.append(agent)
    agent.ok("begin", release="t1")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) != 0
    assert not (rd / "releases" / "t1").exists()
