"""`deploy push` end to end on the shared simulated fleet (real sshd, real PoCL builds)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from deployer.cache.mace import DEFAULT_MACE_VERSION, encode_mace_pb, mace_program_key, parse_cache
from deployer.config.kernels import load_library
from deployer.protocol.bundle import agent_bundle
from deployer.sim.fleet import Fleet
from tests.conftest import KERNELS, Cli, Pushed

PROTO = Path(__file__).parent / "mace.proto"


def test_every_device_passes(pushed: Pushed) -> None:
    report = pushed.report
    assert pushed.run.code == 0, [(d["name"], d["error"]) for d in report["devices"] if not d["ok"]]
    assert report["schema_version"] == 1 and report["ok"] is True
    assert [d["name"] for d in report["devices"]] == ["sim-01", "sim-02", "sim-03"]
    for device in report["devices"]:
        assert device["ok"] is True and device["error"] is None
        ran = [k for k in device["kernels"] if k["smoke"] != "skipped"]
        assert {k["smoke"] for k in ran} == {"passed"}
        assert all(k["built"] and k["max_abs_error"] is not None for k in ran)
        skipped = [k for k in device["kernels"] if k["smoke"] == "skipped"]  # PoCL has no cl_khr_fp16
        assert skipped and all(not k["built"] and "cl_khr_fp16" in k["detail"] for k in skipped)
        stages = {"connect", "state", "upload", "compile", "pull", "smoke", "commit"}  # fingerprint: if not cached
        assert set(device["stages"]) >= stages
        assert Path(device["cache_file"]) == pushed.cache / device["name"] / "mace_cl_compiled_program.bin"


def test_json_kernels_name_every_kernel_of_the_library(pushed: Pushed) -> None:
    names = {k["name"] for k in pushed.report["devices"][0]["kernels"]}
    assert names == {
        "saxpy[f32]", "relu[f32]", "relu[f16]", "matmul[f32]", "matmul[f16s]", "matmul[f16]",
        "conv2d.conv2d_3x3[f32]", "conv2d.conv2d_1x1[f32]", "conv2d.conv2d_3x3[f16s]", "conv2d.conv2d_1x1[f16s]",
        "depthwise_conv2d[f32]", "depthwise_conv2d[f16s]",
        "bias_act.bias_add[f32]", "bias_act.bias_relu[f32]", "bias_act.bias_relu6[f32]",
        "bias_act.bias_add[f16s]", "bias_act.bias_relu[f16s]", "bias_act.bias_relu6[f16s]",
        "pooling.max_pool2d[f32]", "pooling.avg_pool2d[f32]", "pooling.max_pool2d[f16s]", "pooling.avg_pool2d[f16s]",
        "softmax[f32]", "eltwise.eltwise_add[f32]", "eltwise.eltwise_add[f16s]", "eltwise.eltwise_add[f16]",
        "image.image_relu6[f32]",
    }


def test_mixed_fleet_has_two_fingerprints(pushed: Pushed) -> None:
    fingerprints = {d["name"]: d["fingerprint"] for d in pushed.report["devices"]}
    assert fingerprints["sim-01"]["id"] == fingerprints["sim-03"]["id"]
    assert fingerprints["sim-01"]["id"] != fingerprints["sim-02"]["id"]
    first = fingerprints["sim-01"]
    assert first["platform"]["name"] == "Portable Computing Language"
    assert first["device"]["driver_version"] and first["device"]["compute_units"] >= 1
    assert first["cpu_only"] is True
    assert "basic" in fingerprints["sim-02"]["device"]["name"]


def test_cache_file_follows_mace_rules(pushed: Pushed) -> None:
    library = load_library(KERNELS)
    fingerprints = {d["name"]: d["fingerprint"] for d in pushed.report["devices"]}
    for name in ("sim-01", "sim-02"):
        data = (pushed.cache / name / "mace_cl_compiled_program.bin").read_bytes()
        assert int.from_bytes(data[-4:], "little") == zlib.crc32(data[:-4])
        cache = parse_cache(data)
        skipped = library.skipped(fingerprints[name])  # variants the device cannot build are not in it
        for program in library.programs:
            for variant in program.variants:
                key = mace_program_key(program.name, list(variant.options))
                assert key == program.name + "".join(" " + o for o in sorted(variant.options))
                if key in skipped:
                    assert key not in cache.programs
                    continue
                assert cache.programs[key].startswith(b"poclbin")
                assert cache.hashes[key] == library.program_hash(program)
        assert cache.platform_info is not None
        assert cache.platform_info.startswith("Portable Computing Language, FULL_PROFILE, OpenCL")
        assert cache.platform_info.endswith(", " + DEFAULT_MACE_VERSION)
        assert cache.device_name == ""  # MACE's rule: neither Adreno, Mali nor PowerVR


def test_program_hash_covers_included_header(pushed: Pushed) -> None:
    cache = parse_cache((pushed.cache / "sim-01" / "mace_cl_compiled_program.bin").read_bytes())
    source = (KERNELS / "saxpy.cl").read_bytes()
    header = (KERNELS / "common.h").read_bytes()
    want = hashlib.md5(source).hexdigest()[-10:] + hashlib.md5(header).hexdigest()[-10:]
    assert cache.hashes["saxpy -DDATA_TYPE=float"] == want


def protoc_decode(data: bytes) -> str:
    """`protoc --decode=mace.PairContainer` of a cache file, its 4-byte CRC trailer stripped."""
    return subprocess.run(
        ["protoc", f"--proto_path={PROTO.parent}", "--decode=mace.PairContainer", PROTO.name],
        input=data[:-4], capture_output=True, check=True,
    ).stdout.decode("utf-8", "replace")


def test_every_cache_file_decodes_with_protoc(pushed: Pushed) -> None:
    written = sorted(pushed.cache.glob("*/mace_cl_compiled_program.bin"))
    assert [p.parent.name for p in written] == ["sim-01", "sim-02", "sim-03"]
    for path in written:
        data = path.read_bytes()
        decoded = protoc_decode(data)
        assert decoded.count("pairs {") == len(parse_cache(data).programs) * 2 + 2, path
        assert 'key: "mace_opencl_precompiled_platform_info_key"' in decoded
        assert 'key: "program_hash_ matmul -DDATA_TYPE=float -DTILE=16"' in decoded


def test_golden_pair_decodes_with_protoc() -> None:
    decoded = protoc_decode(encode_mace_pb([("a", b"xy")]))
    assert decoded.split() == ["pairs", "{", "key:", '"a"', "bytes_value:", '"xy"', "}"]


def test_golden_bytes_of_the_format_note() -> None:
    assert encode_mace_pb([("a", b"xy")]) == bytes.fromhex("0a070a016112027879" + "23343785")
    assert encode_mace_pb([]) == b"\0\0\0\0"


def test_local_cache_has_manifest_and_logs(pushed: Pushed) -> None:
    import json

    root = pushed.cache / "sim-02"
    manifest = json.loads((root / "manifest.json").read_text())
    data = (root / "mace_cl_compiled_program.bin").read_bytes()
    assert manifest["cache_sha256"] == hashlib.sha256(data).hexdigest()
    programs = parse_cache(data).programs
    for program in manifest["programs"]:
        assert hashlib.sha256(programs[program["key"]]).hexdigest() == program["sha256"]
        assert len(programs[program["key"]]) == program["binary_size"]
    assert sorted(p.name for p in (root / "logs").iterdir())
    assert not list(root.rglob(".*.tmp-*"))


def test_remote_layout(pushed: Pushed) -> None:
    home = Path(pushed.fleet.device("sim-01").folder) / "home" / ".deployer"
    current = home / "current"
    assert current.is_symlink() and os.readlink(current).startswith("releases/")
    release = current.resolve()
    assert {p.name for p in (release / "kernels").iterdir()} >= {"saxpy.cl", "common.h", "matmul.cl"}
    assert (release / "models" / "tiny.bin").stat().st_size == 4096
    assert (release / "build" / "mace_cl_compiled_program.bin").exists()
    bundle = agent_bundle()
    assert [p.name for p in (home / "agent").iterdir()] == [bundle.id12]  # one bundle, no temp folder
    assert sorted(p.name for p in (home / "agent" / bundle.id12 / "deployer_remote").glob("*.py")) == \
        sorted(path.split("/")[1] for path, _ in bundle.files)
    cached = (home / "agent" / bundle.id12 / "deployer_remote" / "__pycache__").glob("*.pyc")
    assert {p.name.split(".")[0] for p in cached} >= {"main", "session", "build"}  # imported: bytecode is kept


def test_pulled_binary_runs_under_pyopencl(pushed: Pushed) -> None:
    """The oracle: pyopencl, in a child process, runs saxpy from the pulled bytes and agrees with numpy."""
    script = textwrap.dedent("""
        import sys, numpy as np, pyopencl as cl
        from deployer.cache.mace import parse_cache
        binary = parse_cache(open(sys.argv[1], "rb").read()).programs["saxpy -DDATA_TYPE=float"]
        ctx = cl.Context([cl.get_platforms()[0].get_devices()[0]])
        prog = cl.Program(ctx, ctx.devices, [binary]).build()
        q = cl.CommandQueue(ctx)
        x = np.arange(1024, dtype=np.float32); y = np.ones(1024, dtype=np.float32)
        mf = cl.mem_flags
        bx = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=x)
        by = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=y)
        out = cl.Buffer(ctx, mf.WRITE_ONLY, x.nbytes)
        prog.saxpy(q, (1024,), None, np.float32(3), bx, by, out, np.int32(1024))
        got = np.empty_like(x); cl.enqueue_copy(q, got, out); q.finish()
        assert np.array_equal(got, 3 * x + y), got[:4]
        print("ok")
    """)
    env = dict(os.environ, POCL_DEVICES="pthread")
    cache_file = pushed.cache / "sim-01" / "mace_cl_compiled_program.bin"
    result = subprocess.run([sys.executable, "-c", script, str(cache_file)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_human_summary_table(fleet: Fleet, cli: Cli, tmp_path: Path) -> None:
    run = cli("push", "--fleet", fleet.inventory, "--kernels", KERNELS, "--cache", tmp_path / "c", "--limit", "sim-01")
    assert run.code == 0, run.err
    assert "sim-01" in run.out and "passed" in run.out and "1/1 device(s) passed" in run.out
    assert "sim-02" not in run.out
    assert "sim-01 state" in run.err and "sim-01 passed" in run.err  # progress goes to stderr


@pytest.mark.parametrize("limit", ["nothing-*", "sim-09"])
def test_limit_matching_nothing_is_an_input_error(fleet: Fleet, cli: Cli, limit: str) -> None:
    run = cli("push", "--fleet", fleet.inventory, "--limit", limit)
    assert run.code == 2 and "matches no device" in run.err and "Traceback" not in run.err
