"""The tiny-CNN model format (docs/models.md): a JSON graph and its .npz weights, read and checked with
file-named errors, shapes inferred. What runs it (the numpy reference, the lowering to kernels) is
`deployer.tasks.models`.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployer.errors import InputError, Where

if TYPE_CHECKING:  # numpy is imported where it is used: a push that runs nothing never loads it
    import numpy as np

FORMAT = "deployer-cnn/1"
OPS = ("conv2d", "depthwise_conv2d", "max_pool", "avg_pool", "add", "dense", "softmax")
ACTIVATIONS = ("none", "relu", "relu6")
MAX_ELEMENTS = 1 << 24  # per tensor: a graph that asks for more is refused, not allocated
MAX_INT = 1024  # stride, pad, k
NODE_FIELDS = ("name", "op", "inputs", "weight", "bias", "stride", "pad", "k", "activation")
GRAPH_FIELDS = ("format", "name", "weights", "input", "output", "tolerance", "nodes", "about")


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
        import numpy as np
        return np.random.default_rng(self.seed).random(self.input_shape, dtype=np.float32)


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
    import numpy as np
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
