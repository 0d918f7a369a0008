"""`deploy push --mace-programs SRC --mace-kernels DIR`: a MACE app's programs built on each board.

The bad inputs are refused before any board is touched (exit 2, file:line, nothing written); a key whose
options do not compile fails that board with the driver's log. The real libmace loading what this writes is
tests/test_mace_runtime.py; here the programs are small ones of the test's own, laid out as MACE's are
(`<name>.cl` with MACE's `#include <common.h>` line).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.cache.mace import (
    PLATFORM_INFO_KEY,
    encode_legacy,
    encode_mace_pb,
    parse_cache,
)
from deployer.config.inventory import load_inventory
from deployer.config.mace_programs import MACE_BUILD_FLAGS, load_mace_programs
from deployer.errors import InputError
from deployer.remote.mace import mace_device_name
from deployer.sim.fleet import fleet_specs
from tests.conftest import Cli
from tests.test_faults import MakeFleet

COMMON = b"#define SCALE 2.0f\n"
SCALE = (b"#include <common.h>\n"
         b"__kernel void KERNEL_NAME(__global float *x) { x[get_global_id(0)] *= SCALE * FACTOR; }\n")
PLAIN = b"__kernel void KERNEL_NAME(__global float *x) { x[get_global_id(0)] += 1.0f; }\n"
GOOD = ["scale -DFACTOR=3.0f -DKERNEL_NAME=scale", "scale -DFACTOR=0.5f -DKERNEL_NAME=scale_half",
        "plain -DKERNEL_NAME=plain"]
NOT_COMPILING = "scale -DKERNEL_NAME=scale_nofactor"  # FACTOR undefined


def md5_tail(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()[-10:]


@pytest.fixture
def mace_kernels(tmp_path: Path) -> Path:
    folder = tmp_path / "cl"
    folder.mkdir()
    (folder / "common.h").write_bytes(COMMON)
    (folder / "scale.cl").write_bytes(SCALE)
    (folder / "plain.cl").write_bytes(PLAIN)
    return folder


@pytest.fixture
def offline_inventory(tmp_path: Path) -> Path:
    """A device nobody listens for: a bad-input push must stop before connecting to it."""
    path = tmp_path / "inventory.yml"
    path.write_text("devices:\n  - name: b1\n    host: 127.0.0.1\n    port: 9\n")
    return path


def keys_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text("# the app's programs\n\n" + "".join(line + "\n" for line in lines))
    return path


def test_key_list_and_cache_file_give_the_same_programs(tmp_path: Path, mace_kernels: Path) -> None:
    from_keys = load_mace_programs(keys_file(tmp_path, *GOOD), mace_kernels)
    hashes = {"scale": md5_tail(SCALE) + md5_tail(COMMON), "plain": md5_tail(PLAIN)}
    pairs = [(k, b"binary") for k in GOOD] + [("program_hash_ " + k, hashes[k.split()[0]].encode()) for k in GOOD]
    pairs.append((PLATFORM_INFO_KEY, b"Portable Computing Language, FULL_PROFILE, OpenCL 3.0 PoCL, v9.9.9-app"))
    for encoded in (encode_mace_pb(pairs), encode_legacy(pairs)):
        src = tmp_path / "mace_cl_compiled_program.bin"
        src.write_bytes(encoded)
        from_cache = load_mace_programs(src, mace_kernels)
        assert from_cache.source_kind == "cache" and from_keys.source_kind == "keys"
        assert sorted(from_cache.keys) == sorted(from_keys.keys) == sorted(GOOD)
        assert from_cache.mace_version == "v9.9.9-app" and from_keys.mace_version is None
    library = from_keys.library
    assert library.compile_options == MACE_BUILD_FLAGS
    scale = library.program("scale")
    assert scale is not None and scale.headers == ("common.h",) and len(scale.variants) == 2
    assert library.program_hash(scale) == hashes["scale"]  # MACE's rule: the .cl, then common.h it includes
    plain = library.program("plain")
    assert plain is not None and plain.headers == () and library.program_hash(plain) == hashes["plain"]


@pytest.mark.parametrize("case", ["junk", "text", "no_cl", "hash", "empty_cache", "no_kernels_dir", "bad_cache_key"])
def test_bad_input_is_refused_before_any_device(case: str, tmp_path: Path, mace_kernels: Path,
                                                offline_inventory: Path, cli: Cli) -> None:
    src = tmp_path / "programs.bin"
    kernels = mace_kernels
    if case == "junk":
        src.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
        words = [f"{src}: field '--mace-programs': neither a MACE cache file", "nor UTF-8 text",
                 "or a text file of program keys"]
    elif case == "text":
        src.write_text("# keys\nactivation -DUSE_RELU\nhello world\n")
        words = [f"{src}:3: field '--mace-programs': not a program key (got 'hello world')"]
    elif case == "no_cl":
        src = keys_file(tmp_path, GOOD[0], "softmax -DDATA_TYPE=float")
        words = [f"{src}:4: field '--mace-programs': key 'softmax -DDATA_TYPE=float': no softmax.cl in the "
                 f"--mace-kernels folder {kernels}"]
    elif case == "hash":
        ours = md5_tail(SCALE) + md5_tail(COMMON)
        src.write_bytes(encode_mace_pb([(GOOD[0], b"b"), ("program_hash_ " + GOOD[0], b"0123456789abcdefabcd")]))
        words = [f"program {GOOD[0]!r}", "'0123456789abcdefabcd'", repr(ours), "scale.cl and common.h",
                 "kernel folder the app's libmace was built from"]
    elif case == "empty_cache":
        src.write_bytes(encode_mace_pb([(PLATFORM_INFO_KEY, b"x, y, z, v")]))
        words = ["a MACE cache file that holds no compiled program"]
    elif case == "bad_cache_key":
        src.write_bytes(encode_mace_pb([("mace_run tuned 1 2 3", b"b")]))
        words = ["holds an entry that is not a program key: 'mace_run tuned 1 2 3'"]
    else:
        src = keys_file(tmp_path, GOOD[0])
        kernels = tmp_path / "absent"
        words = [f"{kernels}: field '--mace-kernels': not a folder"]
    cache = tmp_path / "cache"
    run = cli("push", "--fleet", offline_inventory, "--cache", cache, "--mace-programs", src,
              "--mace-kernels", kernels)
    assert run.code == 2, run.err
    assert "Traceback" not in run.err
    text = " ".join(run.err.split())
    for word in words:
        assert " ".join(word.split()) in text, run.err
    assert not cache.exists() or not any(cache.glob("b1/*"))


@pytest.mark.parametrize("given", ["--mace-programs", "--mace-kernels"])
def test_one_flag_without_the_other(given: str, tmp_path: Path, mace_kernels: Path, offline_inventory: Path,
                                    cli: Cli) -> None:
    value = keys_file(tmp_path, GOOD[0]) if given == "--mace-programs" else mace_kernels
    run = cli("push", "--fleet", offline_inventory, "--cache", tmp_path / "cache", given, value)
    other = "--mace-kernels" if given == "--mace-programs" else "--mace-programs"
    assert run.code == 2 and f"{given} needs {other}" in " ".join(run.err.split()), run.err


KEY_LINES = st.lists(st.one_of(
    st.sampled_from(GOOD + ["# comment", "", "plain", "scale  -DFACTOR=1.0f", "nothere -DX",
                            "scale -DKERNEL_NAME=s x"]),
    st.text(max_size=40)), max_size=6)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), KEY_LINES.map(lambda lines: "\n".join(lines).encode("utf-8", "replace")),
                      st.dictionaries(st.sampled_from(GOOD + ["program_hash_ " + GOOD[2], "x y"]),
                                      st.binary(max_size=20), max_size=4).map(lambda d: encode_mace_pb(d.items()))))
def test_any_source_file_is_programs_or_an_input_error(data: bytes, tmp_path: Path, mace_kernels: Path) -> None:
    """Whatever SRC holds, the loader returns programs whose files exist, or an InputError naming SRC."""
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    try:
        loaded = load_mace_programs(src, mace_kernels)
    except InputError as exc:
        assert exc.where is not None and exc.where.file == str(src) and exc.field == "--mace-programs"
        return
    assert loaded.keys and all((mace_kernels / program.source).is_file() for program in loaded.library.programs)


def test_load_refuses_what_push_refuses(tmp_path: Path, mace_kernels: Path) -> None:
    with pytest.raises(InputError) as caught:
        load_mace_programs(keys_file(tmp_path, "nothere -DX"), mace_kernels)
    assert caught.value.field == "--mace-programs" and caught.value.where is not None
    assert caught.value.where.line == 3


def test_app_programs_on_a_fleet(make_fleet: MakeFleet, cli: Cli, tmp_path: Path, mace_kernels: Path) -> None:
    """A key that does not compile fails each board with its driver's log; the good keys then build on
    both fingerprints, each is smoked by a load from its binary, and the cache holds MACE's entries."""
    fleet = make_fleet(fleet_specs(2, mix=True))
    cache = tmp_path / "cache"
    run = cli("push", "--fleet", fleet.inventory, "--cache", cache, "--json", "--mace-programs",
              keys_file(tmp_path, GOOD[0], NOT_COMPILING), "--mace-kernels", mace_kernels)
    assert run.code == 1, run.err
    for device in run.json()["devices"]:
        assert not device["ok"] and device["failed_stage"] == "compile"
        assert NOT_COMPILING in device["error"] and "undeclared identifier 'FACTOR'" in device["error"]
        assert "scale.cl:2:" in device["error"]  # the driver's log names the file and line
    run = cli("push", "--fleet", fleet.inventory, "--cache", cache, "--json", "--mace-version", "v7.7.7-app",
              "--mace-programs", keys_file(tmp_path, *GOOD), "--mace-kernels", mace_kernels)
    assert run.code == 0, run.err
    devices = run.json()["devices"]
    assert len({d["fingerprint"]["id"] for d in devices}) == 2
    for device in devices:
        kernels = {k["program_key"]: k for k in device["kernels"]}
        assert sorted(kernels) == sorted(GOOD)
        assert all(k["built"] and k["smoke"] == "passed" and "loaded from its binary" in k["detail"]
                   for k in kernels.values())
        written = parse_cache((cache / device["name"] / "mace_cl_compiled_program.bin").read_bytes())
        assert sorted(written.programs) == sorted(GOOD)
        assert written.hashes[GOOD[0]] == md5_tail(SCALE) + md5_tail(COMMON)
        assert written.hashes[GOOD[2]] == md5_tail(PLAIN)
        platform, dev = device["fingerprint"]["platform"], device["fingerprint"]["device"]
        assert written.platform_info == f"{platform['name']}, {platform['profile']}, {platform['version']}, v7.7.7-app"
        assert written.device_name == mace_device_name(dev["name"], dev["version"])
        assert written.format == "pb"
    # PoCL's CPU device, seen as it is (no shim): push says, per board, why MACE will not use the file
    for device in devices:
        warnings = device["warnings"]
        assert len(warnings) == 3 and all(w.startswith("MACE will not use this cache") for w in warnings)
        assert "runs only on GPU devices" in warnings[0] and "the name is empty" in warnings[1]
        assert "if the app's MaceVersion() is not 'v7.7.7-app'" in warnings[2]
    run = cli("push", "--fleet", fleet.inventory, "--cache", cache, "--mace-version", "v7.7.7-app",
              "--mace-programs", keys_file(tmp_path, *GOOD), "--mace-kernels", mace_kernels)
    assert run.code == 0 and "sim-02: warning: MACE will not use this cache: MACE runs only on GPU" in run.out
    run = cli("push", "--fleet", fleet.inventory, "--cache", cache, "--json", "--mace-format", "legacy",
              "--mace-programs", keys_file(tmp_path, *GOOD), "--mace-kernels", mace_kernels)
    assert run.code == 0, run.err
    for device in run.json()["devices"]:  # PoCL 3.1 says OpenCL 3.0, which MACE v1.0.x refuses
        assert any("MACE v1.0.x refuses OpenCL 3.0 devices" in w for w in device["warnings"]), device["warnings"]
    # collect says it too, per board, for the file an app left there
    run = cli("cache", "install", "--fleet", fleet.inventory, "--cache", cache, "--to", "~/app/cache.bin")
    assert run.code == 0, run.out
    run = cli("collect", "--fleet", fleet.inventory, "--cache", cache, "--path", "~/app/*.bin")
    assert run.code == 0, run.err
    assert "sim-01: warning: MACE will not use this cache: MACE v1.0.x refuses OpenCL 3.0 devices" in \
        " ".join(run.out.split())


def test_sim_up_with_an_opencl_library(cli: Cli, tmp_path: Path) -> None:
    """`deploy sim up --opencl-library` writes the library (absolute) and MACE's PoCL flag into the
    inventory; a library that does not load fails each board's fingerprint, naming it (the agent loads it)."""
    folder, library = tmp_path / "sim", tmp_path / "libOpenCL-absent.so"
    run = cli("sim", "up", "--devices", "1", "--dir", folder, "--opencl-library", library)
    try:
        assert run.code == 0, run.err
        (device,) = load_inventory(folder / "inventory.yml").devices
        assert device.opencl.library == str(library) and dict(device.env) == {"POCL_EXTRA_BUILD_FLAGS": "-w"}
        push = cli("push", "--fleet", folder / "inventory.yml", "--cache", tmp_path / "cache", "--json",
                   "--mace-programs", keys_file(tmp_path, GOOD[2]), "--mace-kernels", tmp_path)
        assert push.code == 2  # plain.cl is not in tmp_path: refused before the board
        (tmp_path / "plain.cl").write_bytes(PLAIN)
        push = cli("push", "--fleet", folder / "inventory.yml", "--cache", tmp_path / "cache", "--json",
                   "--mace-programs", keys_file(tmp_path, GOOD[2]), "--mace-kernels", tmp_path)
        (result,) = push.json()["devices"]
        assert push.code == 1 and "[no_loader]" in result["error"] and str(library) in result["error"], result
    finally:
        assert cli("sim", "down", "--dir", folder).code == 0
