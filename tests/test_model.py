"""The tiny CNN (models/): its files, its numpy forward pass, and its forward pass on devices from the binaries.

The agent runs locally over pipes for the start-up figures and a deliberately wrong kernel; the CLI pushes
the model to a pthread and a basic PoCL device of the shared fleet for the end-to-end JSON contract.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.cli.push import _print_summary
from deployer.config.kernels import Library, load_library
from deployer.config.models import load_model, load_models
from deployer.errors import AgentError, InputError
from deployer.protocol.reply import Reply
from deployer.sim.fleet import Fleet
from deployer.tasks.models import ModelPlan, ModelResult, check_models, forward, plan_model, wire_models
from deployer.tasks.push import DeviceOutcome, FleetResult
from deployer.tasks.smoke import ProgramStartup, Startup, parse_startup
from tests.conftest import KERNELS, REPO, Cli
from tests.test_agent_main import Agent
from tests.test_kernels import Built, program_specs

MODELS = REPO / "models"
GRAPH = MODELS / "tiny_cnn.json"
WEIGHTS = MODELS / "tiny_cnn.npz"
BROKEN_ERR = 1.0e-2  # common.h's -DERR hook on the f32 conv2d program: every conv output off by 1e-2 * (1 + |v|)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)


# --------------------------------------------------------------------------------------------------
# the files and the numpy forward pass
# --------------------------------------------------------------------------------------------------

def test_generator_rewrites_the_committed_files_byte_for_byte(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(MODELS / "make_tiny_cnn.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for path in (GRAPH, WEIGHTS):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path.name} differs from its generator"
        assert path.stat().st_size < 200_000


def _conv_at(x: np.ndarray, w: np.ndarray, b: np.ndarray, o: int, y: int, z: int, stride: int, pad: int) -> float:
    """One output element of a convolution, by its definition."""
    total = float(b[o])
    for c in range(w.shape[1]):
        for i in range(w.shape[2]):
            for j in range(w.shape[3]):
                yy, zz = y * stride - pad + i, z * stride - pad + j
                if 0 <= yy < x.shape[1] and 0 <= zz < x.shape[2]:
                    total += float(w[o, c, i, j]) * float(x[c, yy, zz])
    return total


def test_numpy_forward_pass() -> None:
    model = load_model(GRAPH)
    beside = load_model(WEIGHTS)  # the .npz finds its graph beside it
    assert model is not None and beside is not None and beside.graph == model.graph
    x = model.input()
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and np.array_equal(x, model.input())
    values = forward(model, x)
    probs = values["probs"]
    assert probs.shape == (10,) and probs.sum() == pytest.approx(1.0) and 0.2 < probs.max() < 0.99
    w, b = model.weights["conv1.weight"], model.weights["conv1.bias"]
    rng = np.random.default_rng(1)
    for o, y, z in zip(rng.integers(0, 8, 6), (0, 31, 5, 17, 0, 31), (0, 31, 31, 3, 12, 0), strict=True):
        assert values["conv1"][o, y, z] == pytest.approx(max(0.0, _conv_at(x, w, b, o, y, z, 1, 1)), abs=1e-9)
    dw, dwb = model.weights["dw.weight"], model.weights["dw.bias"]
    for c, y, z in ((0, 0, 0), (7, 15, 15), (3, 8, 0)):
        one = _conv_at(values["pool1"][c:c + 1], dw[c:c + 1], dwb[c:c + 1], 0, y, z, 1, 1)
        assert values["dw"][c, y, z] == pytest.approx(min(max(0.0, one), 6.0), abs=1e-9)
    assert values["pool1"][2, 3, 4] == values["conv1"][2, 6:8, 8:10].max()
    fc = values["pool2"].reshape(-1) @ model.weights["fc.weight"] + model.weights["fc.bias"]
    assert values["fc"] == pytest.approx(fc)


def test_lowering_uses_the_library_f32_programs() -> None:
    model = load_model(GRAPH)
    assert model is not None
    plan = plan_model(model, load_library(KERNELS))
    assert set(plan.program_keys) == {
        "conv2d -DDATA_TYPE=float", "bias_act -DDATA_TYPE=float", "pooling -DDATA_TYPE=float",
        "depthwise_conv2d -DDATA_TYPE=float", "eltwise -DDATA_TYPE=float", "relu -DDATA_TYPE=float",
        "matmul -DDATA_TYPE=float -DTILE=16", "softmax -DDATA_TYPE=float"}
    kernels = [s["kernel"] for s in plan.request["steps"]]
    assert kernels[:3] == ["conv2d_3x3", "bias_relu", "max_pool2d"]
    assert kernels[-3:] == ["matmul", "bias_add", "softmax"]
    weights = sum(a.nbytes for a in model.weights.values())
    assert len(plan.payload) == weights + model.input().nbytes + 4 * sum(
        1 for s in plan.request["steps"] for a in s["args"] if "scalar" in a)
    requests, payload = wire_models([plan, plan])  # a second model's offsets move past the first's
    assert payload == plan.payload * 2
    assert requests[1]["tensors"][0]["data"] == len(plan.payload) + requests[0]["tensors"][0]["data"]


def test_files_that_travel(tmp_path: Path) -> None:
    other = tmp_path / "mobilenet.pb"
    other.write_bytes(b"\0" * 64)
    files, models = load_models([other, GRAPH, WEIGHTS])
    assert files == [other, GRAPH, WEIGHTS] and [m.name for m in models] == ["tiny_cnn"]
    (tmp_path / "plain.json").write_text('{"just": "json"}')
    assert load_models([tmp_path / "plain.json"]) == ([tmp_path / "plain.json"], [])


@pytest.mark.parametrize(("change", "field"), [
    (lambda g: g["nodes"][0].update(weight="fc.weight"), "nodes[0]"),
    (lambda g: g["nodes"][1].update(op="maxpool"), "nodes[1].op"),
    (lambda g: g["nodes"][5].update(inputs=["pw", "nowhere"]), "nodes[5].inputs"),
    (lambda g: g.update(tolerance=0), "tolerance"),
    (lambda g: g.update(output="logits"), "output"),
])
def test_a_bad_graph_is_an_input_error(tmp_path: Path, change: Any, field: str) -> None:
    graph = json.loads(GRAPH.read_text())
    change(graph)
    shutil.copy(WEIGHTS, tmp_path / WEIGHTS.name)
    (tmp_path / GRAPH.name).write_text(json.dumps(graph))
    with pytest.raises(InputError, match=re.escape(f"tiny_cnn.json: field '{field}'")):
        load_model(tmp_path / GRAPH.name)


NODE_KEYS = st.sampled_from(["name", "op", "inputs", "weight", "bias", "stride", "pad", "k", "activation", "x"])
GRAPH_KEYS = st.sampled_from(["name", "weights", "input", "output", "tolerance", "nodes", "format", "y"])
NAMES = st.sampled_from(["image", "conv1", "pw", "fc", "probs", "conv1.weight", "fc.bias", "scalar", "nope"])


@settings(max_examples=100)
@given(edits=st.lists(st.tuples(st.integers(-1, 8), NODE_KEYS | GRAPH_KEYS, JSON | NAMES | st.integers(-3, 70)),
                      min_size=1, max_size=3))
def test_any_graph_is_a_model_or_an_input_error(edits: list[tuple[int, str, Any]]) -> None:
    """Whatever a graph says, loading it gives a model that plans, or an InputError; never another exception."""
    with tempfile.TemporaryDirectory() as folder:
        arrays = dict(np.load(WEIGHTS))
        np.savez(Path(folder) / WEIGHTS.name, scalar=np.float32(1), **arrays)
        graph = json.loads(GRAPH.read_text())
        for index, key, value in edits:
            nodes = graph.get("nodes")
            if index < 0:
                graph[key] = value
            elif isinstance(nodes, list) and index < len(nodes) and isinstance(nodes[index], dict):
                nodes[index][key] = value
        (Path(folder) / GRAPH.name).write_text(json.dumps(graph))
        try:
            model = load_model(Path(folder) / GRAPH.name)
        except InputError:
            return
        if model is not None:
            plan_model(model, load_library(KERNELS))


def test_a_bad_model_stops_the_push_before_any_device(cli: Cli, fleet: Fleet, tmp_path: Path) -> None:
    graph = json.loads(GRAPH.read_text())
    graph["nodes"][7]["weight"] = "conv1.bias"
    shutil.copy(WEIGHTS, tmp_path / WEIGHTS.name)
    (tmp_path / GRAPH.name).write_text(json.dumps(graph))
    run = cli("push", "--fleet", fleet.inventory, "--model", tmp_path / GRAPH.name, "--cache", tmp_path / "cache")
    assert run.code == 2 and "tiny_cnn.json: field 'nodes[7]'" in run.err and "Traceback" not in run.err
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------------
# on a local agent: the forward pass from the binaries, a wrong kernel, the start-up figures
# --------------------------------------------------------------------------------------------------

def _broken_library(folder: Path) -> Library:
    """The library with its f32 conv2d built with -DERR (a different program key, the same files)."""
    shutil.copytree(KERNELS, folder)
    manifest = yaml.safe_load((folder / "kernels.yml").read_text())
    manifest["programs"]["conv2d"]["variants"]["f32"]["options"].append(f"-DERR={BROKEN_ERR!r}")
    (folder / "kernels.yml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return load_library(folder)


class Started:
    built: Built
    plans: list[ModelPlan]
    specs: list[dict[str, Any]]
    reply: dict[str, Any]
    payload: bytes
    startup: Startup
    models: list[ModelResult]


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    """One release with the model's programs and the broken conv2d; one startup op running both models."""
    model = load_model(GRAPH)
    assert model is not None
    library = load_library(KERNELS)
    broken = _broken_library(tmp_path_factory.mktemp("broken") / "kernels")
    plans = [plan_model(model, library), plan_model(model, broken)]
    keys = set(plans[0].program_keys) | set(plans[1].program_keys)
    env = {k: v for k, v in os.environ.items() if k not in ("OCL_ICD_VENDORS", "DEPLOYER_OPENCL_LIBRARY")}
    env.update(POCL_CACHE_DIR=str(tmp_path_factory.mktemp("pocl-cache")), POCL_DEVICES="pthread")  # root's own
    agent = Agent.serve(tmp_path_factory.mktemp("board") / "rd", env)
    try:
        result = Started()
        result.plans = plans
        both = (*library.programs, *(p for p in broken.programs if p.name == "conv2d"))
        union = Library(library.folder, library.seed, library.compile_options, both)
        result.built = Built(agent, union, "model", only=keys)
        result.specs = program_specs(union, result.built.skipped)
        models, payload = wire_models(plans)
        result.reply, result.payload = agent.ok(
            "startup", payload, opencl={}, cache_file=result.built.build["cache_file"],
            expected=result.built.expected, programs=result.specs, models=models, timeout_s=300)
        reply = Reply(result.reply, result.payload)
        result.startup = parse_startup(reply, [s["key"] for s in result.specs])
        result.models = check_models(plans, reply)
        yield result
        agent.bye()
    finally:
        agent.kill()


def test_forward_pass_on_the_device_matches_numpy(started: Started) -> None:
    good = started.models[0]
    assert good.ok is True and good.detail is None, good
    assert good.max_abs_error is not None and good.max_abs_error < started.plans[0].model.tolerance
    assert good.first_inference_ms is not None and good.steady_ms is not None
    assert 0 < good.steady_ms < good.first_inference_ms
    assert started.reply["models"][0]["runs"] == 10


def test_a_wrong_kernel_fails_the_model_naming_error_and_tolerance(started: Started) -> None:
    bad = started.models[1]
    assert bad.ok is False and bad.max_abs_error is not None and bad.max_abs_error > 1e-3
    assert bad.detail is not None and f"max abs error {bad.max_abs_error:.3g}" in bad.detail
    assert "exceeds tolerance 0.0001 for model tiny_cnn" in bad.detail


def test_startup_figures_are_not_driver_cache_hits(started: Started) -> None:
    """The measuring child runs with POCL_KERNEL_CACHE=0: its source builds cost what the compile stage's cold
    builds cost (each program was built there already, with the same options: with PoCL's cache on they would
    be hits of ~20 ms). Creating a program from its binary is far cheaper than building it."""
    figures = {p.key: p for p in started.startup.programs}
    assert set(figures) == {s["key"] for s in started.specs} and len(figures) == 9
    assert all(p.error is None for p in figures.values())
    compiled = {p["key"]: p["build_ms"] for p in started.built.build["programs"]}
    source = sum(p.build_from_source_ms or 0 for p in figures.values())
    binary = sum(p.load_from_binary_ms or 0 for p in figures.values())
    assert source > 0.5 * (sum(compiled.values()) - max(compiled.values()))  # the first build pays the compiler's start
    assert binary < source / 5
    assert started.startup.compiler_start_ms is not None
    as_json = started.startup.to_json()
    assert as_json["build_from_source_ms"] == pytest.approx(source, abs=0.01)
    assert as_json["load_from_binary_ms"] == pytest.approx(binary, abs=0.01)


def test_startup_requests_are_checked_before_any_driver_runs(started: Started) -> None:
    agent, built = started.built.agent, started.built
    (model,), payload = wire_models(started.plans[:1])
    fields = {"opencl": {}, "cache_file": built.build["cache_file"], "expected": built.expected,
              "programs": started.specs[:1]}

    def refused(change: Any, words: str) -> None:
        broken = json.loads(json.dumps(model))
        change(broken)
        message = agent.fail("startup", "bad_request", payload, models=[broken], **fields)
        assert words in message, message

    refused(lambda m: m["steps"][0].update(program_key="nope -DX"), "not in 'expected'")
    refused(lambda m: m["tensors"][0].update(data=len(payload) - 4), "outside the")
    refused(lambda m: m["steps"][3]["args"][0].update(tensor="ghost"), "no tensor 'ghost'")
    refused(lambda m: m.update(input="probs"), "is not a tensor with data")
    refused(lambda m: m["steps"][0]["args"].append({"image": 0, "size": 16}), "expected {tensor}")
    refused(lambda m: m.update(runs=10**6), "out of range")
    case = {"id": "i", "program_key": next(iter(built.expected)), "kernel": "k", "global": [1], "local": None,
            "args": [{"image": 0, "size": 32, "width": 1, "height": 1}]}
    message = agent.fail("smoke", "bad_request", b"\0" * 64, opencl={}, cache_file=built.build["cache_file"],
                         expected=built.expected, cases=[case])
    assert "not a 1x1 RGBA float image" in message


# --------------------------------------------------------------------------------------------------
# end to end: deploy push --model on a pthread and a basic device
# --------------------------------------------------------------------------------------------------

def test_push_runs_the_model_on_every_device(fleet: Fleet, cli: Cli, tmp_path: Path) -> None:
    run = cli("push", "--fleet", fleet.inventory, "--limit", "sim-01,sim-02", "--kernels", KERNELS,
              "--cache", tmp_path / "cache", "--model", GRAPH, "--json", "--smoke", "always")
    assert run.code == 0, run.err
    devices = {d["name"]: d for d in run.json()["devices"]}
    assert "basic" in devices["sim-02"]["fingerprint"]["device"]["name"]
    for name, device in devices.items():
        (model,) = device["models"]
        assert set(model) == {"name", "ok", "max_abs_error", "first_inference_ms", "steady_ms", "detail"}
        assert model["name"] == "tiny_cnn" and model["ok"] is True and model["max_abs_error"] < 1e-4
        assert model["first_inference_ms"] > model["steady_ms"] > 0
        startup = device["startup"]
        assert startup["build_from_source_ms"] > startup["load_from_binary_ms"] > 0
        assert len(startup["programs"]) == 16 and all(p["error"] is None for p in startup["programs"])
        print(name, json.dumps({"model": model, "startup": startup}))  # the figures, for `pytest -s`
    home = Path(fleet.device("sim-01").folder) / "home" / ".deployer" / "current" / "models"
    assert sorted(p.name for p in home.iterdir()) == ["tiny_cnn.json", "tiny_cnn.npz"]
    assert (home / "tiny_cnn.npz").read_bytes() == WEIGHTS.read_bytes()


def test_summary_shows_models_and_startup(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = DeviceOutcome("pi-01", ok=True, models=[ModelResult("tiny_cnn", True, 6e-8, 812.4, 1.25)],
                            startup=Startup((ProgramStartup("a", 150.0, 1.5), ProgramStartup("b", 170.0, 1.0)), 500.0))
    failed = DeviceOutcome("pi-02", ok=False, error="smoke: model tiny_cnn: ...", failed_stage="smoke",
                           models=[ModelResult("tiny_cnn", False, 0.02, 900.0, 2.0, "exceeds tolerance")])
    unchanged = DeviceOutcome("pi-03", ok=True, models=[ModelResult("tiny_cnn", None,
                                                                    detail="not run: its programs are unchanged")])
    _print_summary(FleetResult((outcome, failed, unchanged)))
    out = capsys.readouterr().out
    assert "pi-03: model tiny_cnn not run: its programs are unchanged" in out
    assert "pi-01: model tiny_cnn passed, max abs error 6e-08, first inference 812 ms, steady 1.25 ms" in out
    assert "pi-01: start-up of 2 programs: 320 ms from source, 2 ms from the cached binaries" in out
    assert "pi-02: model tiny_cnn failed, max abs error 0.02" in out


MS = st.floats() | st.integers(-5, 10**10) | JSON
MODEL_RECORD = st.fixed_dictionaries({}, optional={
    "ok": st.booleans() | JSON, "error": st.text(max_size=20) | JSON, "first_inference_ms": MS, "steady_ms": MS,
    "outputs": st.lists(st.fixed_dictionaries({"size": st.integers(-5, 80)}) | JSON, max_size=2) | JSON})
PROGRAM_RECORD = st.fixed_dictionaries({}, optional={
    "key": st.sampled_from(["a", "b"]) | JSON, "error": st.text(max_size=9) | JSON,
    "build_from_source_ms": MS, "load_from_binary_ms": MS})
PLAN = plan_model(load_model(GRAPH) or pytest.fail("no model"), load_library(KERNELS))


@given(models=st.lists(MODEL_RECORD, max_size=2) | JSON, programs=st.lists(PROGRAM_RECORD, max_size=3) | JSON,
       compiler=MS, payload=st.binary(max_size=96))
def test_any_startup_reply_is_a_result_or_an_agent_error(models: Any, programs: Any, compiler: Any,
                                                         payload: bytes) -> None:
    """The device is untrusted: whatever it replies to `startup` becomes figures and verdicts, or AgentError."""
    reply = Reply({"models": models, "programs": programs, "compiler_start_ms": compiler}, payload)
    try:
        startup = parse_startup(reply, ["a", "b"])
        assert [p.key for p in startup.programs] == ["a", "b"]
        json.dumps(startup.to_json(), allow_nan=False)
    except AgentError:
        pass
    try:
        (result,) = check_models([PLAN], reply)
        assert result.ok in (True, False) and (result.ok or result.detail)
    except AgentError:
        pass


def test_a_warning_shared_by_many_boards_is_said_once(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's first command printed the same three MACE warnings for each simulated board."""
    cpu, empty = "MACE will not use this cache: MACE runs only on GPU", "MACE will not use this cache: empty name"
    outcomes = [DeviceOutcome(f"sim-0{i}", ok=True, warnings=[cpu, empty] if i < 7 else [cpu]) for i in range(1, 8)]
    _print_summary(FleetResult(tuple(outcomes)))
    out = " ".join(capsys.readouterr().out.split())
    assert out.count(cpu) == 1 and out.count(empty) == 1
    assert f"sim-01, sim-02, sim-03, sim-04 and 3 more: warning: {cpu}" in out
    assert f"sim-01, sim-02, sim-03, sim-04 and 2 more: warning: {empty}" in out
