"""Models on a device: the numpy forward pass (the reference), the lowering of a graph to the library's kernels,
the wire form sent to `startup`, and the check of what each device computed against the reference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployer.config.kernels import Library
from deployer.config.models import Model, Node
from deployer.errors import AgentError, InputError, Where
from deployer.protocol.reply import MAX_ERROR, Fields, Reply, output_sizes
from deployer.tasks.smoke import check_output
from deployer.text import visible

if TYPE_CHECKING:  # numpy is imported where it is used: a push that runs nothing never loads it
    import numpy as np

VARIANT = "f32"  # the model runs on the float32 variants of the library's programs
STEADY_RUNS = 10
SOFTMAX_LANES = 16  # work-group size of the softmax kernel (a power of two)

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

def _windows(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    return sliding_window_view(padded, (k, k), axis=(1, 2))[:, ::stride, ::stride]


def _activate(x: np.ndarray, activation: str) -> np.ndarray:
    import numpy as np
    if activation == "relu":
        return np.asarray(np.maximum(x, 0))
    if activation == "relu6":
        return np.asarray(np.clip(x, 0, 6))
    return x


def _forward_node(node: Node, inputs: list[np.ndarray], w: np.ndarray | None, b: np.ndarray | None) -> np.ndarray:
    import numpy as np
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
    import numpy as np
    values = {model.input_name: np.asarray(x, dtype=np.float64)}
    weights = {k: v.astype(np.float64) for k, v in model.weights.items()}
    for node in model.nodes:
        w = weights.get(node.weight) if node.weight else None
        b = weights.get(node.bias) if node.bias else None
        values[node.name] = _forward_node(node, [values[i] for i in node.inputs], w, b)
    return values

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
        import numpy as np
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
        import numpy as np
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


def check_models(plans: Sequence[ModelPlan], reply: Reply) -> list[ModelResult]:
    """Each model's verdict: the device ran it, its output has the right size, and it matches numpy within
    the graph's tolerance (|out - ref| <= tol * (1 + |ref|))."""
    import numpy as np
    records = Fields(reply.fields, "startup reply").items("models")
    if len(records) != len(plans):
        raise AgentError(f"startup reply has {len(records)} model result(s), expected {len(plans)}", kind="bad_reply")
    payload, offset, results = memoryview(reply.payload), 0, []
    for plan, record in zip(plans, records, strict=True):
        name = plan.model.name
        fields = Fields(record, f"startup reply model {name!r}")
        sizes = output_sizes(fields, len(payload))
        if offset + sum(sizes) > len(payload):
            raise AgentError(f"startup reply for model {name!r}: output sizes exceed the payload", kind="bad_reply")
        chunk, offset = payload[offset: offset + sum(sizes)], offset + sum(sizes)
        first, steady = fields.optional_ms("first_inference_ms"), fields.optional_ms("steady_ms")
        if not fields.flag("ok"):
            error = visible(fields.optional_text("error", MAX_ERROR) or "failed", 500)
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
