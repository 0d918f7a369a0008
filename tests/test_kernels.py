"""The kernel library on real PoCL: every kernel and variant against numpy, source vs binary, ctypes vs pyopencl.

One module-scoped agent (run locally over pipes, as on a board) builds the whole library, pulls the MACE cache
file and smoke-tests every case from the binaries. pyopencl, in a child process, runs the same cases from
source and from the same binaries: all three must give the same bytes. A deliberately wrong variant
(`-DERR=e`, common.h's test hook) shows the stated tolerance is real: 2x the tolerance fails the device,
naming the kernel, the error and the tolerance; 0.5x passes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.cache.mace import parse_cache
from deployer.config.kernels import Library, load_library, unmet_requirement
from deployer.errors import InputError
from deployer.protocol.reply import Reply
from deployer.sim.fleet import DeviceSpec
from deployer.tasks.smoke import SmokePlan, compare, load_references, plan_smoke
from deployer.tasks.verify import check_cases
from tests.conftest import KERNELS, Cli
from tests.test_agent_main import MACE_VERSION, Agent, find_python36
from tests.test_faults import MakeFleet

POCL_FP16 = "cl_khr_fp16"


def program_specs(library: Library, skipped: dict[str, str]) -> list[dict[str, Any]]:
    """The build (and startup) request's programs, as the pipeline sends them."""
    return [{"key": p.key(v), "name": p.name, "source": f"kernels/{p.source}",
             "headers": [f"kernels/{h}" for h in p.headers], "options": list(v.options),
             "compile_options": list(library.compile_options)}
            for p in library.programs for v in p.variants if p.key(v) not in skipped]


@pytest.fixture(scope="module")
def local_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The local agent's environment: its own PoCL cache (it runs as root; the fleet's cache is deploysim's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OCL_ICD_VENDORS", "DEPLOYER_OPENCL_LIBRARY")}
    env.update(POCL_CACHE_DIR=str(tmp_path_factory.mktemp("pocl-cache")), POCL_DEVICES="pthread")
    return env


class Built:
    """A release on a local agent with a library built and pulled back."""

    agent: Agent
    library: Library
    fingerprint: dict[str, Any]
    skipped: dict[str, str]
    build: dict[str, Any]
    cache: bytes
    expected: dict[str, str]  # program key -> sha256 of its binary in the cache file

    def __init__(self, agent: Agent, library: Library, release: str, only: set[str] | None = None) -> None:
        """Put the library, build its programs (`only` these keys, if given), pull the cache file."""
        self.agent, self.library = agent, library
        agent.ok("begin", release=release)
        for name in library.files():
            data = (library.folder / name).read_bytes()
            agent.ok("put", data, path=f"kernels/{name}", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     mode=0o644)
        self.fingerprint = agent.ok("fingerprint", opencl={})[0]["fingerprint"]
        self.skipped = library.skipped(self.fingerprint)
        if only is not None:
            self.skipped.update({p.key(v): "not asked for" for p in library.programs for v in p.variants
                                 if p.key(v) not in only})
        self.build, _ = agent.ok("build", opencl={}, mace_version=MACE_VERSION,
                                 programs=program_specs(library, self.skipped), timeout_s=300)
        assert all(p["ok"] for p in self.build["programs"]), self.build["programs"]
        _, self.cache = agent.ok("get", path=self.build["cache_file"])
        programs = parse_cache(self.cache).programs
        self.expected = {key: hashlib.sha256(data).hexdigest() for key, data in programs.items()}

    def smoke(self, plan: SmokePlan) -> tuple[dict[str, Any], bytes]:
        return self.agent.ok("smoke", bytes(plan.payload), opencl={}, cache_file=self.build["cache_file"],
                             expected=self.expected, cases=plan.requests(self.skipped), timeout_s=300)


class Smoked:
    built: Built
    plan: SmokePlan
    reply: dict[str, Any]
    outputs: bytes


@pytest.fixture(scope="module")
def smoked(tmp_path_factory: pytest.TempPathFactory, local_env: dict[str, str]) -> Iterator[Smoked]:
    """The agent on the oldest Python it supports when this machine has it (images, half storage and all)."""
    agent = Agent.serve(tmp_path_factory.mktemp("board") / "rd", local_env, python=find_python36() or sys.executable)
    try:
        result = Smoked()
        library = load_library(KERNELS)
        result.built = Built(agent, library, "kernels")
        result.plan = plan_smoke(library, load_references(library))
        result.reply, result.outputs = result.built.smoke(result.plan)
        yield result
        agent.bye()
    finally:
        agent.kill()


# --------------------------------------------------------------------------------------------------
# every kernel and variant against numpy
# --------------------------------------------------------------------------------------------------

def test_every_kernel_and_variant_matches_numpy(smoked: Smoked) -> None:
    verdicts = check_cases(smoked.plan, Reply(smoked.reply, smoked.outputs), smoked.built.skipped)
    ran = [v for v in verdicts if v.smoke != "skipped"]
    assert ran and all(v.smoke == "passed" for v in ran), [v for v in ran if v.smoke != "passed"]
    assert {v.name for v in ran} >= {
        "matmul[f32]", "matmul[f16s]", "conv2d.conv2d_3x3[f32]", "conv2d.conv2d_1x1[f16s]",
        "depthwise_conv2d[f32]", "bias_act.bias_relu6[f32]", "pooling.max_pool2d[f16s]",
        "pooling.avg_pool2d[f32]", "softmax[f32]", "eltwise.eltwise_add[f16s]", "image.image_relu6[f32]"}
    # every case has a numpy reference and a real error figure
    assert all(v.max_abs_error is not None and math.isfinite(v.max_abs_error) for v in ran)


def test_half_storage_runs_everywhere_half_arithmetic_is_skipped_on_pocl(smoked: Smoked) -> None:
    """PoCL 3.1 lists no cl_khr_fp16: the f16 variants are skipped with the reason, never built, never failed."""
    fingerprint = smoked.built.fingerprint
    assert POCL_FP16 not in fingerprint["device"]["extensions"] and fingerprint["device"]["image_support"]
    verdicts = {v.name: v for v in check_cases(smoked.plan, Reply(smoked.reply, smoked.outputs),
                                                 smoked.built.skipped)}
    for name in ("relu[f16]", "matmul[f16]", "eltwise.eltwise_add[f16]"):
        assert verdicts[name].smoke == "skipped" and not verdicts[name].built
        assert POCL_FP16 in (verdicts[name].detail or "")
    assert all(key not in parse_cache(smoked.built.cache).programs for key in smoked.built.skipped)
    assert verdicts["matmul[f16s]"].smoke == "passed" and verdicts["image.image_relu6[f32]"].smoke == "passed"


def test_requirements_read_from_the_fingerprint() -> None:
    device = {"extensions": ["cl_khr_fp16", "cl_khr_fp64"], "image_support": False}
    assert unmet_requirement(["cl_khr_fp16"], {"device": device}) is None
    assert "image support" in (unmet_requirement(["images"], {"device": device}) or "")
    assert "cl_khr_int64" in (unmet_requirement(["cl_khr_int64"], {"device": device}) or "")
    assert unmet_requirement(["images"], {"device": {**device, "image_support": True}}) is None
    library = load_library(KERNELS)
    assert set(library.skipped({"device": {"extensions": [], "image_support": True}})) == {
        "relu -DDATA_TYPE=half -DFP16", "matmul -DDATA_TYPE=half -DFP16 -DTILE=16", "eltwise -DDATA_TYPE=half -DFP16"}
    assert library.skipped({"device": device}) == {"image -DDATA_TYPE=float": unmet_requirement(["images"],
                                                                                               {"device": device})}


def test_bad_requirement_names_its_line(kernels_copy: Path) -> None:
    manifest = kernels_copy / "kernels.yml"
    manifest.write_text(manifest.read_text().replace("requires: [images]", "requires: [imagez]"))
    line = next(i for i, t in enumerate(manifest.read_text().splitlines(), 1) if "imagez" in t)
    with pytest.raises(InputError, match=rf"kernels.yml:{line}: field 'programs.image.variants.f32.requires'"):
        load_library(kernels_copy)


@pytest.mark.skipif(shutil.which("clang-15") is None, reason="clang-15 is not installed")
def test_half_arithmetic_variants_compile_where_fp16_exists() -> None:
    """PoCL cannot build them here; clang, told the device has cl_khr_fp16, checks they are valid OpenCL C."""
    library = load_library(KERNELS)
    fp16 = [(p, v) for p in library.programs for v in p.variants if POCL_FP16 in v.requires]
    assert len(fp16) == 3
    for program, variant in fp16:
        check = subprocess.run(
            ["clang-15", "-x", "cl", "-cl-std=CL1.2", "-Xclang", "-finclude-default-header", "-target", "spir64",
             "-Xclang", "-cl-ext=+cl_khr_fp16", "-fsyntax-only", "-Werror", *variant.options, "-I", str(KERNELS),
             str(KERNELS / program.source)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, (program.key(variant), check.stderr)


# --------------------------------------------------------------------------------------------------
# the same bytes from source and from binary, through ctypes and through pyopencl
# --------------------------------------------------------------------------------------------------

PYOPENCL_RUNNER = textwrap.dedent("""
    import json, sys, numpy as np, pyopencl as cl
    from deployer.cache.mace import parse_cache
    job = json.load(open(sys.argv[1])); payload = open(sys.argv[2], "rb").read()
    binaries = parse_cache(open(job["cache"], "rb").read()).programs
    ctx = cl.Context([cl.get_platforms()[0].get_devices()[0]]); queue = cl.CommandQueue(ctx)
    mf = cl.mem_flags
    SCALARS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}

    def run(program, case):
        kernel = getattr(program, case["kernel"]); outputs, keep = [], []
        for index, arg in enumerate(case["args"]):
            if "image" in arg:
                pixels = np.frombuffer(payload, np.float32, arg["size"] // 4, arg["image"])
                value = cl.Image(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR,
                                 cl.ImageFormat(cl.channel_order.RGBA, cl.channel_type.FLOAT),
                                 shape=(arg["width"], arg["height"]),
                                 hostbuf=pixels.reshape(arg["height"], arg["width"], 4).copy())
            elif "in" in arg:
                data = payload[arg["in"]:arg["in"] + arg["size"]]
                value = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=data)
            elif "out" in arg:
                value = cl.Buffer(ctx, mf.WRITE_ONLY, arg["out"]); outputs.append((value, arg["out"]))
            elif "scalar" in arg:  # the raw bytes, whatever their type
                value = np.frombuffer(payload, SCALARS[arg["size"]], 1, arg["scalar"])[0]
            else:
                value = cl.LocalMemory(arg["local"])
            kernel.set_arg(index, value); keep.append(value)  # set_arg does not keep the object alive
        cl.enqueue_nd_range_kernel(queue, kernel, case["global"], case["local"])
        chunks = []
        for buffer, size in outputs:
            host = np.empty(size, np.uint8); cl.enqueue_copy(queue, host, buffer); chunks.append(host.tobytes())
        queue.finish()
        return b"".join(chunks)

    out = {"source": [], "binary": []}
    for key, spec in job["programs"].items():
        source = cl.Program(ctx, open(spec["source"], "rb").read().decode()).build(options=spec["options"])
        binary = cl.Program(ctx, ctx.devices, [binaries[key]]).build()
        for case in job["cases"]:
            if case["program_key"] == key:
                out["source"].append([case["id"], run(source, case).hex()])
                out["binary"].append([case["id"], run(binary, case).hex()])
    json.dump(out, sys.stdout)
""")


def test_source_binary_ctypes_and_pyopencl_give_the_same_bytes(smoked: Smoked, tmp_path: Path,
                                                                local_env: dict[str, str]) -> None:
    """Every case run by the agent (ctypes, from the pulled binary) and by pyopencl in a child process, once
    with each program built from source (same source, options and headers) and once from the same binary."""
    built, requests = smoked.built, smoked.plan.requests(smoked.built.skipped)
    (tmp_path / "cache.bin").write_bytes(built.cache)
    (tmp_path / "payload.bin").write_bytes(bytes(smoked.plan.payload))
    programs = {}
    for spec in program_specs(built.library, built.skipped):
        options = [*spec["options"], *spec["compile_options"], "-I", str(KERNELS)]
        programs[spec["key"]] = {"source": str(KERNELS / spec["source"].split("/", 1)[1]), "options": options}
    job = {"cache": str(tmp_path / "cache.bin"), "cases": requests, "programs": programs}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**local_env, "PYTHONPATH": str(KERNELS.parent)}
    run = subprocess.run([sys.executable, "-c", PYOPENCL_RUNNER, str(tmp_path / "job.json"),
                          str(tmp_path / "payload.bin")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    source, binary = dict(result["source"]), dict(result["binary"])
    agent, offset = {}, 0
    for record in smoked.reply["cases"]:
        size = sum(o["size"] for o in record["outputs"])
        agent[record["id"]] = smoked.outputs[offset: offset + size].hex()
        offset += size
    assert len(agent) == len(requests) == len(source) == len(binary) > 20
    for case in requests:
        name = case["id"]
        assert source[name] == binary[name], f"{name}: built from source and from binary differ"
        assert agent[name] == binary[name], f"{name}: the agent's ctypes path and pyopencl differ"


# --------------------------------------------------------------------------------------------------
# the tolerance is real: a variant erring by 2x its tolerance fails, by 0.5x passes
# --------------------------------------------------------------------------------------------------

def test_tolerance_check_is_relative_and_absolute() -> None:
    """|out - ref| <= tol * (1 + |ref|): exactly on the bound passes, just past it fails, large values scale."""
    library = load_library(KERNELS)
    plan = plan_smoke(library, load_references(library))
    case = next(c for c in plan.cases if c.id == "matmul[f32]")
    assert case.expected is not None
    want = case.expected["c"].astype(np.float64)
    tolerance = case.spec.tolerance_for("f32", "float32")
    assert tolerance is not None and 0 < tolerance < 1
    for factor, passes in ((0.5, True), (0.99, True), (1.01, False), (2.0, False)):
        got = want + factor * tolerance * (1 + np.abs(want))
        passed, worst, why = compare(case, {"c": got})
        assert passed is passes, (factor, why)
        assert worst == pytest.approx(float(np.max(factor * tolerance * (1 + np.abs(want)))))


def _broken_library(kernels_copy: Path) -> tuple[float, list[str]]:
    """A copy of the library with matmul built twice more with common.h's -DERR=e hook: e = 2x and 0.5x
    matmul's float32 tolerance. Only the saxpy and matmul programs are kept, to build little."""
    manifest = kernels_copy / "kernels.yml"
    document = yaml.safe_load(manifest.read_text())
    matmul = document["programs"]["matmul"]
    tolerance = float(matmul["kernels"][0]["tolerance"]["float32"])
    for name, factor in (("err2x", 2.0), ("err05x", 0.5)):
        matmul["variants"][name] = {"dtype": "float32", "options": ["-DDATA_TYPE=float", "-DTILE=16",
                                                                    f"-DERR={factor * tolerance!r}"]}
    document["programs"] = {k: document["programs"][k] for k in ("saxpy", "matmul")}
    manifest.write_text(yaml.safe_dump(document, sort_keys=False))
    return tolerance, ["matmul[err2x]", "matmul[err05x]"]


def test_variant_erring_by_twice_its_tolerance_fails_the_device(make_fleet: MakeFleet, cli: Cli,
                                                               tmp_path: Path, kernels_copy: Path) -> None:
    tolerance, (twice, half) = _broken_library(kernels_copy)
    fleet = make_fleet([DeviceSpec("sim-01")])
    run = cli("push", "--fleet", fleet.inventory, "--kernels", kernels_copy, "--cache", tmp_path / "cache", "--json")
    device = run.json()["devices"][0]
    assert run.code == 1 and device["failed_stage"] == "smoke"
    kernels = {k["name"]: k for k in device["kernels"]}
    assert kernels["matmul[f32]"]["smoke"] == "passed" and kernels[half]["smoke"] == "passed"
    assert kernels[twice]["smoke"] == "failed"
    # the injected error, in the tolerance's terms, is what the report sees
    assert kernels[half]["max_abs_error"] > 0.4 * tolerance
    error = kernels[twice]["max_abs_error"]
    assert f"max abs error {error:.3g}" in kernels[twice]["detail"]
    assert f"exceeds tolerance {tolerance:g} for float32" in kernels[twice]["detail"]
    assert device["error"].startswith(f"smoke: {twice}: output 'c': max abs error")
    assert half not in device["error"]
    assert not (tmp_path / "cache" / "sim-01" / "mace_cl_compiled_program.bin").exists()


@pytest.mark.parametrize("text", [
    "seed: !!int abc\nprograms: {}\n",
    "programs: " + "[" * 5000 + "]" * 5000 + "\n",
    "programs: !!python/object:os.system ls\n",
])
def test_manifest_that_yaml_cannot_construct_is_an_input_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "kernels.yml").write_text(text)
    with pytest.raises(InputError) as caught:
        load_library(tmp_path)
    assert str(caught.value).startswith(str(tmp_path / "kernels.yml"))


# ----- any kernels.yml is a library or an input error naming it (issue 21: every parser of outside input) -----

MANIFEST_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 1 << 40) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from(["saxpy", "saxpy.cl", "float16", "n", "x", "../etc/passwd", "-DX=1", "cl_khr_fp16"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into the parsed manifest (keys of mappings, indexes of lists)."""
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*path, key))


@pytest.fixture(scope="module")
def library_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("library") / "kernels"
    shutil.copytree(KERNELS, folder)
    return folder


@settings(max_examples=100, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.booleans(), MANIFEST_VALUES), min_size=1, max_size=4))
def test_any_edit_of_the_manifest_is_a_library_or_an_input_error(library_copy: Path,
                                                                   edits: list[tuple[int, bool, Any]]) -> None:
    """The real kernels.yml with values replaced or keys dropped anywhere: never a traceback, and an error
    names the manifest (numpy references run only at push time, not here)."""
    document = yaml.safe_load((KERNELS / "kernels.yml").read_text())
    for index, drop, value in edits:
        paths = list(_paths(document))[1:]
        if not paths:
            break
        *parents, last = paths[index % len(paths)]
        node = document
        for key in parents:
            node = node[key]
        if drop and isinstance(node, dict):
            del node[last]
        else:
            node[last] = value
    (library_copy / "kernels.yml").write_text(yaml.safe_dump(document))
    try:
        assert isinstance(load_library(library_copy), Library)
    except InputError as exc:
        assert "kernels.yml" in str(exc) and str(exc).isprintable()
