"""A small CNN in the deployer's model format: a JSON graph plus an `.npz` of weights (docs/models.md).

`load_model` reads and checks one (an `InputError` naming the file and field for anything wrong; `None`
for a file in any other format, which simply travels). `forward` is the numpy forward pass (float64).
`plan_model` lowers the graph onto the kernel library's f32 programs: named tensors (weights and input as
bytes) and kernel launches, which the agent's `startup` op runs from the pulled binaries; the input comes
from the graph's seed and the numpy output is what the device's output is compared with. `check_models`
turns the agent's reply into the JSON contract's `models[]` entries.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from deployer.agent import Reply, printable
from deployer.agent import field as reply_field
from deployer.errors import AgentError, InputError, Where
from deployer.kernels import Library
from deployer.smoke import check_output

FORMAT = "deployer-cnn/1"
OPS = ("conv2d", "depthwise_conv2d", "max_pool", "avg_pool", "add", "dense", "softmax")
ACTIVATIONS = ("none", "relu", "relu6")
VARIANT = "f32"  # the model runs on the float32 variants of the library's programs
STEADY_RUNS = 10
SOFTMAX_LANES = 16  # work-group size of the softmax kernel (a power of two)
MAX_ELEMENTS = 1 << 24  # per tensor: a graph that asks for more is refused, not allocated
MAX_INT = 1024  # stride, pad, k
NODE_FIELDS = ("name", "op", "inputs", "weight", "bias", "stride", "pad", "k", "activation")
GRAPH_FIELDS = ("format", "name", "weights", "input", "output", "tolerance", "nodes", "about")
# graph op (and its variant) -> (program, kernel entry) of the library
KERNELS = {
    "conv2d_3x3": ("conv2d", "conv2d_3x3"), "conv2d_1x1": ("conv2d", "conv2d_1x1"),
    "depthwise_conv2d": ("depthwise_conv2d", "depthwise_conv2d"),
    "max_pool": ("pooling", "max_pool2d"), "avg_pool": ("pooling", "avg_pool2d"),
    "add": ("eltwise", "eltwise_add"), "relu": ("relu", "relu"), "dense": ("matmul", "matmul"),
    "softmax": ("softmax", "softmax"),
    "none": ("bias_act", "bias_add"), "bias_relu": ("bias_act", "bias_relu"), "bias_relu6": ("bias_act", "bias_relu6"),
}
BIAS_KERNEL = {"none": "none", "relu": "bias_relu", "relu6": "bias_relu6"}


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    weight: str | None = None
    bias: str | None = None
    stride: int = 1
    pad: int = 0
    k: int = 0
    activation: str = "none"


@dataclass(frozen=True, slots=True, eq=False)
class Model:
    name: str
    graph: Path
    weights_file: Path
    input_name: str
    input_shape: tuple[int, ...]
    seed: int
    output: str
    tolerance: float
    nodes: tuple[Node, ...]
    weights: Mapping[str, np.ndarray]  # float32, by the names the nodes use
    shapes: Mapping[str, tuple[int, ...]]  # every tensor: input, weights, node outputs

    def input(self) -> np.ndarray:
        """The model's input: uniform in [0, 1) from the graph's seed, the same bytes on every run."""
        return np.random.default_rng(self.seed).random(self.input_shape, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# reading a model
# --------------------------------------------------------------------------------------------------

def _graph_path(path: Path) -> Path | None:
    """The graph of a pushed file: itself (a .json of our format), or the .json beside an .npz."""
    if path.suffix == ".npz":
        graph = path.with_suffix(".json")
        return graph if graph.is_file() else None
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return path if isinstance(document, dict) and document.get("format") == FORMAT else None


def load_model(path: Path) -> Model | None:
    """The model of a `--model` file in this format (its .json graph or its .npz), else None."""
    graph = _graph_path(path)
    if graph is None:
        return None
    file = str(graph)
    try:
        document = json.loads(graph.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(Where(file), None, f"cannot read the model graph: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InputError(Where(file), "format", f"expected {FORMAT!r} beside the weights {path.name}")
    return _parse_graph(graph, document)


def _need(file: str, document: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str = "") -> Any:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        raise InputError(Where(file), f"{what}{key}", f"expected {expected}, got {value!r}")
    return value


def _positive_ints(file: str, value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise InputError(Where(file), field, f"expected a list of positive integers, got {value!r}")
    return tuple(value)


def _parse_graph(graph: Path, document: Mapping[str, Any]) -> Model:
    file = str(graph)
    unknown = sorted(set(document) - set(GRAPH_FIELDS))
    if unknown:
        raise InputError(Where(file), unknown[0], f"unknown field (allowed: {', '.join(GRAPH_FIELDS)})")
    weights_name = _need(file, document, "weights", str)
    weights_file = graph.parent / weights_name
    if Path(weights_name).name != weights_name or not weights_name.endswith(".npz"):
        raise InputError(Where(file), "weights", f"expected an .npz file name beside the graph, got {weights_name!r}")
    spec = _need(file, document, "input", dict)
    tolerance = _need(file, document, "tolerance", (int, float))
    if not 0 < tolerance < 1:
        raise InputError(Where(file), "tolerance", f"expected a number in (0, 1), got {tolerance!r}")
    seed = _need(file, spec, "seed", int, "input.")
    if seed < 0:
        raise InputError(Where(file), "input.seed", f"expected an integer >= 0, got {seed}")
    nodes = tuple(_node(file, n, i) for i, n in enumerate(_need(file, document, "nodes", list)))
    model = Model(
        name=_need(file, document, "name", str), graph=graph, weights_file=weights_file,
        input_name=_need(file, spec, "name", str, "input."), seed=seed,
        input_shape=_positive_ints(file, spec.get("shape"), "input.shape"), output=_need(file, document, "output", str),
        tolerance=float(tolerance), nodes=nodes, weights=_load_weights(weights_file), shapes={},
    )
    if model.input_name in model.weights:
        raise InputError(Where(file), "input.name", f"{model.input_name!r} names an array of the weights")
    shapes = _infer_shapes(model)
    if model.output not in {node.name for node in nodes}:
        raise InputError(Where(file), "output", f"{model.output!r} is not a node of the graph")
    return replace(model, shapes=shapes)


def _node(file: str, node: Any, index: int) -> Node:
    what = f"nodes[{index}]."
    if not isinstance(node, dict):
        raise InputError(Where(file), f"nodes[{index}]", "expected an object")
    unknown = sorted(set(node) - set(NODE_FIELDS))
    if unknown:
        raise InputError(Where(file), what + unknown[0], f"unknown field (allowed: {', '.join(NODE_FIELDS)})")
    op = _need(file, node, "op", str, what)
    if op not in OPS:
        raise InputError(Where(file), what + "op", f"unknown op {op!r} (known: {', '.join(OPS)})")
    inputs = node.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise InputError(Where(file), what + "inputs", f"expected a list of tensor names, got {inputs!r}")
    ints = {}
    for key, default in (("stride", 1), ("pad", 0), ("k", 0)):
        value = node.get(key, default)
        low = 1 if key == "stride" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_INT:
            raise InputError(Where(file), what + key, f"expected an integer in [{low}, {MAX_INT}], got {value!r}")
        ints[key] = value
    activation = node.get("activation", "none")
    if activation not in ACTIVATIONS:
        raise InputError(Where(file), what + "activation", f"expected one of {', '.join(ACTIVATIONS)}")
    name = _need(file, node, "name", str, what)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name):
        raise InputError(Where(file), what + "name", f"{name!r}: use letters, digits, '_', '.', '-'")
    weight, bias = node.get("weight"), node.get("bias")
    for key, value in (("weight", weight), ("bias", bias)):
        if value is not None and not isinstance(value, str):
            raise InputError(Where(file), what + key, f"expected the name of an array in the weights, got {value!r}")
    return Node(name, op, tuple(inputs), weight, bias, ints["stride"], ints["pad"], ints["k"], activation)


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(Where(str(path)), None, f"cannot read the model weights: {exc}") from exc
    for name, array in arrays.items():
        if array.dtype != np.float32:
            raise InputError(Where(str(path)), name, f"expected float32 weights, got {array.dtype}")
    return arrays


def _infer_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, checking each node against its inputs and weights."""
    shapes: dict[str, tuple[int, ...]] = {model.input_name: model.input_shape}
    shapes.update({name: tuple(a.shape) for name, a in model.weights.items()})
    for index, node in enumerate(model.nodes):
        where = Where(str(model.graph))
        if node.name in shapes:
            raise InputError(where, f"nodes[{index}].name", f"{node.name!r} names another tensor already")
        missing = [i for i in node.inputs if i not in shapes]
        if missing:
            raise InputError(where, f"nodes[{index}].inputs", f"no tensor {missing[0]!r} before this node")
        try:
            shapes[node.name] = _node_shape(node, [shapes[i] for i in node.inputs], model.weights)
        except ValueError as exc:
            raise InputError(where, f"nodes[{index}]", f"{node.op} {node.name!r}: {exc}") from exc
    too_big = [name for name, shape in shapes.items() if math.prod(shape) > MAX_ELEMENTS]
    if too_big:
        raise InputError(Where(str(model.graph)), None, f"tensor {too_big[0]!r} has over {MAX_ELEMENTS} elements")
    return shapes


def _array(weights: Mapping[str, np.ndarray], name: str | None, what: str) -> tuple[int, ...]:
    if name is None or name not in weights:
        raise ValueError(f"{what} {name!r} is not an array of the weights file")
    return tuple(weights[name].shape)


def _node_shape(node: Node, inputs: list[tuple[int, ...]], weights: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    x = inputs[0]
    if node.op in ("conv2d", "depthwise_conv2d", "max_pool", "avg_pool") and len(x) != 3:
        raise ValueError(f"expects a [c, h, w] input, got {list(x)}")
    if node.op == "add":
        if len(inputs) != 2 or inputs[0] != inputs[1] or node.activation == "relu6":
            raise ValueError("adds two tensors of one shape; activation none or relu")
        return x
    if node.op in ("max_pool", "avg_pool"):
        if not 0 < node.k <= min(x[1:]):
            raise ValueError(f"window k={node.k} does not fit the input {list(x)}")
        return (x[0], (x[1] - node.k) // node.stride + 1, (x[2] - node.k) // node.stride + 1)
    if node.op == "softmax":
        if len(x) != 1:
            raise ValueError(f"expects a vector, got {list(x)}")
        return x
    w = _array(weights, node.weight, "weight")
    bias = _array(weights, node.bias, "bias")
    if len(w) not in (2, 4) or len(bias) != 1:
        raise ValueError(f"weight {list(w)} / bias {list(bias)}: expected a 2-D or 4-D weight and a 1-D bias")
    if node.op == "dense":
        if w != (math.prod(x), w[-1]) or bias != (w[-1],):
            raise ValueError(f"weight {list(w)} / bias {list(bias)} do not fit an input of {math.prod(x)} values")
        return (w[1],)
    depthwise = node.op == "depthwise_conv2d"
    k = w[-1]
    fits = (w == (x[0], 1, 3, 3)) if depthwise else (len(w) == 4 and w[1] == x[0] and w[2] == k and k in (1, 3))
    if not fits or bias != (w[0],) or (k == 1 and (node.stride, node.pad) != (1, 0)):
        raise ValueError(f"weight {list(w)} / bias {list(bias)} do not fit the input {list(x)} "
                         "(3x3 or 1x1 with stride 1 and no padding)")
    h, w_out = ((x[i] + 2 * node.pad - k) // node.stride + 1 for i in (1, 2))
    if h < 1 or w_out < 1:
        raise ValueError("the output would be empty")
    return (w[0], h, w_out)


def load_models(paths: Sequence[Path]) -> tuple[list[Path], list[Model]]:
    """The files that travel for `--model` paths (a model's graph and weights both, once each) and the
    models among them."""
    files: list[Path] = []
    models: list[Model] = []
    for path in paths:
        model = load_model(path)
        extra = [path] if model is None else [model.graph, model.weights_file]
        if model is not None and all(m.graph.resolve() != model.graph.resolve() for m in models):
            models.append(model)
        for file in extra:
            if all(f.resolve() != file.resolve() for f in files):
                files.append(file)
    return files, models


# --------------------------------------------------------------------------------------------------
# numpy forward pass
# --------------------------------------------------------------------------------------------------

def _windows(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    return sliding_window_view(padded, (k, k), axis=(1, 2))[:, ::stride, ::stride]


def _activate(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.asarray(np.maximum(x, 0))
    if activation == "relu6":
        return np.asarray(np.clip(x, 0, 6))
    return x


def _forward_node(node: Node, inputs: list[np.ndarray], w: np.ndarray | None, b: np.ndarray | None) -> np.ndarray:
    x = inputs[0]
    if node.op == "add":
        return _activate(inputs[0] + inputs[1], node.activation)
    if node.op == "max_pool":
        return _windows(x, node.k, node.stride, 0).max(axis=(3, 4))  # type: ignore[no-any-return]
    if node.op == "avg_pool":
        return _windows(x, node.k, node.stride, 0).mean(axis=(3, 4))  # type: ignore[no-any-return]
    if node.op == "softmax":
        e = np.exp(x - x.max())
        return e / e.sum()  # type: ignore[no-any-return]
    assert w is not None and b is not None
    if node.op == "dense":
        return _activate(x.reshape(-1) @ w + b, node.activation)
    windows = _windows(x, w.shape[-1], node.stride, node.pad)
    if node.op == "depthwise_conv2d":
        out = np.einsum("chwij,cij->chw", windows, w[:, 0])
    else:
        out = np.einsum("chwij,ocij->ohw", windows, w)
    return _activate(out + b[:, None, None], node.activation)


def forward(model: Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every node's output for input `x`, computed in float64 from the float32 weights."""
    values = {model.input_name: np.asarray(x, dtype=np.float64)}
    weights = {k: v.astype(np.float64) for k, v in model.weights.items()}
    for node in model.nodes:
        w = weights.get(node.weight) if node.weight else None
        b = weights.get(node.bias) if node.bias else None
        values[node.name] = _forward_node(node, [values[i] for i in node.inputs], w, b)
    return values


# --------------------------------------------------------------------------------------------------
# lowering onto the kernel library
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class ModelPlan:
    """One model ready for the agent: its request (payload offsets from 0), payload, expected output."""

    model: Model
    request: dict[str, Any]
    payload: bytes
    program_keys: tuple[str, ...]
    expected: np.ndarray


class _Lowering:
    def __init__(self, model: Model, library: Library) -> None:
        self.model, self.library = model, library
        self.payload = bytearray()
        self.tensors: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.tile = 16

    def tensor(self, name: str, shape: Sequence[int], data: np.ndarray | None = None) -> str:
        size = math.prod(shape) * 4
        offset = None
        if data is not None:
            raw = np.ascontiguousarray(data, dtype="<f4").tobytes()
            assert len(raw) == size
            offset = len(self.payload)
            self.payload += raw
        self.tensors.append({"name": name, "size": size, "data": offset})
        return name

    def step(self, kind: str, index: int, tensors: Sequence[str], scalars: Sequence[int],
             global_size: Sequence[int], local: Sequence[int] | None = None, local_bytes: int = 0) -> None:
        program_name, entry = KERNELS[kind]
        program = self.library.program(program_name)
        variant = program.variant(VARIANT) if program else None
        if program is None or variant is None:
            raise InputError(Where(str(self.model.graph)), f"nodes[{index}].op",
                             f"needs program {program_name!r} with an {VARIANT} variant in the kernel library")
        key = program.key(variant)
        if key not in self.keys:
            self.keys.append(key)
        if kind == "dense":
            tile = [o for o in variant.options if o.startswith("-DTILE=")]
            self.tile = int(tile[0].split("=", 1)[1]) if tile else 16
            global_size, local = [math.ceil(global_size[0] / self.tile) * self.tile, self.tile], [self.tile] * 2
        args: list[dict[str, Any]] = [{"tensor": t} for t in tensors]
        for value in scalars:
            args.append({"scalar": len(self.payload), "size": 4})
            self.payload += np.int32(value).tobytes()
        if local_bytes:
            args.append({"local": local_bytes})
        self.steps.append({"program_key": key, "kernel": entry, "args": args, "global": list(global_size),
                           "local": list(local) if local else None})

    def node(self, index: int, node: Node) -> None:
        shapes = self.model.shapes
        x = shapes[node.inputs[0]]
        out = shapes[node.name]
        if node.op in ("max_pool", "avg_pool"):
            self.step(node.op, index, [node.inputs[0], self.tensor(node.name, out)],
                      [x[0], x[1], x[2], out[1], out[2], node.k, node.stride], [out[2], out[1], out[0]])
        elif node.op == "softmax":
            self.step("softmax", index, [node.inputs[0], self.tensor(node.name, out)], [out[0]],
                      [SOFTMAX_LANES], [SOFTMAX_LANES], SOFTMAX_LANES * 4)
        elif node.op == "add":
            pre = self.tensor(node.name if node.activation == "none" else f"{node.name}.sum", out)
            self.step("add", index, [*node.inputs, pre], [math.prod(out)], [math.prod(out)])
            if node.activation == "relu":
                self.step("relu", index, [pre, self.tensor(node.name, out)], [math.prod(out)], [math.prod(out)])
        else:
            self.weighted(index, node, x, out)

    def weighted(self, index: int, node: Node, x: tuple[int, ...], out: tuple[int, ...]) -> None:
        assert node.weight is not None and node.bias is not None
        weights = self.model.weights
        w = self.tensor(node.weight, weights[node.weight].shape, weights[node.weight])
        pre = self.tensor(f"{node.name}.pre", out)
        if node.op == "dense":
            k = math.prod(x)
            self.step("dense", index, [node.inputs[0], w, pre], [1, out[0], k], [out[0]])
        elif node.op == "depthwise_conv2d":
            self.step("depthwise_conv2d", index, [node.inputs[0], w, pre],
                      [x[0], x[1], x[2], out[1], out[2], node.stride, node.pad], [out[2], out[1], out[0]])
        elif weights[node.weight].shape[-1] == 3:
            self.step("conv2d_3x3", index, [node.inputs[0], w, pre],
                      [x[0], x[1], x[2], out[0], out[1], out[2], node.stride, node.pad], [out[2], out[1], out[0]])
        else:
            self.step("conv2d_1x1", index, [node.inputs[0], w, pre], [x[0], x[1] * x[2], out[0]],
                      [x[1] * x[2], out[0]])
        bias = self.tensor(node.bias, weights[node.bias].shape, weights[node.bias])
        plane = math.prod(out[1:])
        self.step(BIAS_KERNEL[node.activation], index, [pre, bias, self.tensor(node.name, out)],
                  [plane, math.prod(out)], [math.prod(out)])


def plan_model(model: Model, library: Library) -> ModelPlan:
    """The model as named tensors and launches of the library's f32 kernels, with its input and the
    numpy output for that input."""
    lowering = _Lowering(model, library)
    x = model.input()
    lowering.tensor(model.input_name, model.input_shape, x)
    for index, node in enumerate(model.nodes):
        lowering.node(index, node)
    request = {"name": model.name, "tensors": lowering.tensors, "input": model.input_name,
               "outputs": [model.output], "steps": lowering.steps, "runs": STEADY_RUNS}
    expected = forward(model, x)[model.output]
    return ModelPlan(model, request, bytes(lowering.payload), tuple(lowering.keys), expected)


def wire_models(plans: Sequence[ModelPlan]) -> tuple[list[dict[str, Any]], bytes]:
    """The `models` of a startup request and its payload: each plan's offsets moved past the ones before."""
    requests, payload = [], bytearray()
    for plan in plans:
        base = len(payload)
        request = json.loads(json.dumps(plan.request))
        for tensor in request["tensors"]:
            if tensor["data"] is not None:
                tensor["data"] += base
        for step in request["steps"]:
            for arg in step["args"]:
                if "scalar" in arg:
                    arg["scalar"] += base
        requests.append(request)
        payload += plan.payload
    return requests, bytes(payload)


# --------------------------------------------------------------------------------------------------
# the device's answer
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ModelResult:
    """The JSON contract's `models[]` entry. `ok` is None when the model was not run (see `detail`)."""

    name: str
    ok: bool | None
    max_abs_error: float | None = None
    first_inference_ms: float | None = None
    steady_ms: float | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "max_abs_error": self.max_abs_error,
                "first_inference_ms": self.first_inference_ms, "steady_ms": self.steady_ms, "detail": self.detail}


def skipped_model(plan: ModelPlan, skipped: Mapping[str, str]) -> ModelResult | None:
    """The model's result on a device that skips one of the programs it needs, else None."""
    for key in plan.program_keys:
        if key in skipped:
            return ModelResult(plan.model.name, None, detail=f"not run: program {key!r} is skipped ({skipped[key]})")
    return None


def _ms(record: Mapping[str, Any], key: str) -> float | None:
    value = reply_field(record, key, (int, float), optional=True)
    if value is not None and not 0 <= value < 1e9:
        raise AgentError(f"agent reply field {key!r}: {value!r} is not a duration in ms")
    return None if value is None else float(value)


def check_models(plans: Sequence[ModelPlan], reply: Reply) -> list[ModelResult]:
    """Each model's verdict: the device ran it, its output has the right size, and it matches numpy within
    the graph's tolerance (|out - ref| <= tol * (1 + |ref|))."""
    records = reply.get("models", list)
    if len(records) != len(plans):
        raise AgentError(f"startup reply has {len(records)} model result(s), expected {len(plans)}", kind="bad_reply")
    payload, offset, results = memoryview(reply.payload), 0, []
    for plan, record in zip(plans, records, strict=True):
        name = plan.model.name
        sizes = [int(reply_field(o, "size", int)) for o in reply_field(record, "outputs", list)]
        if any(s < 0 for s in sizes) or offset + sum(sizes) > len(payload):
            raise AgentError(f"startup reply for model {name!r}: output sizes exceed the payload", kind="bad_reply")
        chunk, offset = payload[offset: offset + sum(sizes)], offset + sum(sizes)
        first, steady = _ms(record, "first_inference_ms"), _ms(record, "steady_ms")
        if not reply_field(record, "ok", bool):
            error = printable(str(reply_field(record, "error", str, optional=True) or "failed"), 500)
            results.append(ModelResult(name, False, detail=error))
            continue
        want = plan.expected.size * 4
        if sizes != [want]:
            results.append(ModelResult(name, False, detail=f"output of {sizes} bytes, expected [{want}]"))
            continue
        got = np.frombuffer(chunk, dtype="<f4")
        worst, why = check_output(plan.model.output, got, plan.expected, plan.model.tolerance, f"model {name}")
        results.append(ModelResult(name, why is None, worst, first, steady, why))
    return results
