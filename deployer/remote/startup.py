"""The `startup` op: start-up figures (from binary vs from source) and the models' forward passes."""

import ctypes
import statistics
import time

from .build import parse_program_specs
from .fields import req_int, req_str
from .framing import AgentFailure, bad_request, show
from .layout import MAX_MEMORY_PAYLOAD
from .opencl import CL_MEM_COPY_HOST_PTR, CL_MEM_READ_WRITE, ClError, ptr, size_t
from .selection import ClContext
from .smoke import check_arg, check_sizes, load_checked_programs, load_program, parse_expected, positive, range_arg

# `startup` runs in a child whose environment turns the drivers' own kernel caches off before the OpenCL
# library loads: otherwise "built from source" would be a cache hit (PoCL) or a JIT-cache hit (NVIDIA).
NO_DRIVER_CACHE_ENV = {"POCL_KERNEL_CACHE": "0", "CUDA_CACHE_DISABLE": "1"}

MAX_MODELS = 16

MAX_MODEL_STEPS = 4096

MAX_MODEL_RUNS = 1000

WARM_UP_SOURCE = b"__kernel void deployer_warm_up(__global int *x) { x[get_global_id(0)] = 0; }\n"


def _tensor_name(value, where):
    if not isinstance(value, str) or not value or len(value) > 200:
        raise bad_request("%s: expected a tensor name (got %s)" % (where, show(value)))
    return value


def _parse_tensors(model, payload_size, where):
    """{name: has data} of a model's tensors; data is a payload range of exactly the tensor's size."""
    tensors = model.get("tensors")
    if not isinstance(tensors, list) or not tensors:
        raise bad_request("%s: 'tensors' must be a non-empty list" % where)
    names, total = {}, 0
    for j, tensor in enumerate(tensors):
        at = "%s.tensors[%d]" % (where, j)
        if not isinstance(tensor, dict) or "name" not in tensor or set(tensor) - {"name", "size", "data"}:
            raise bad_request("%s: expected {name, size, data} (got %s)" % (at, show(tensor)))
        name = _tensor_name(tensor["name"], at)
        if name in names:
            raise bad_request("%s: tensor %r appears twice" % (at, name))
        total += positive(tensor, "size", at)
        if tensor.get("data") is not None:
            range_arg({"data": tensor["data"], "size": tensor["size"]}, "data", payload_size, at)
        names[name] = tensor.get("data") is not None
    if total > MAX_MEMORY_PAYLOAD:
        raise bad_request("%s: tensors total %d bytes, over the limit of %d" % (where, total, MAX_MEMORY_PAYLOAD))
    return names


def _parse_step(step, names, payload_size, expected, at):
    if not isinstance(step, dict):
        raise bad_request("%s: expected an object" % at)
    key = req_str(step, "program_key")
    if key not in expected:
        raise bad_request("%s: program_key %r is not in 'expected'" % (at, key))
    if not req_str(step, "kernel"):
        raise bad_request("%s: 'kernel' is empty" % at)
    args = step.get("args")
    if not isinstance(args, list):
        raise bad_request("%s: 'args' must be a list" % at)
    for k, arg in enumerate(args):
        arg_at = "%s.args[%d]" % (at, k)
        if isinstance(arg, dict) and set(arg) == {"tensor"}:
            if arg["tensor"] not in names:
                raise bad_request("%s: no tensor %s" % (arg_at, show(arg["tensor"])))
        elif isinstance(arg, dict) and ("scalar" in arg or "local" in arg):
            check_arg(arg, payload_size, arg_at)
        else:
            raise bad_request("%s: expected {tensor}, {scalar, size} or {local} (got %s)" % (arg_at, show(arg)))
    check_sizes(step, "global", at, optional=False)
    check_sizes(step, "local", at, optional=True)
    if step.get("local") is not None and len(step["local"]) != len(step["global"]):
        raise bad_request("%s: 'local' and 'global' differ in length" % at)


def parse_models(req, payload_size, expected):
    """The request's `models`: named tensors (weights and input are payload ranges), steps that launch
    the library's kernels on them, the input tensor (uploaded again before every run), the outputs."""
    models = req.get("models", [])
    if not isinstance(models, list) or len(models) > MAX_MODELS:
        raise bad_request("field 'models': expected a list of at most %d models" % MAX_MODELS)
    for i, model in enumerate(models):
        where = "models[%d]" % i
        if not isinstance(model, dict):
            raise bad_request("%s: expected an object" % where)
        req_str(model, "name")
        req_int(model, "runs", 10, lo=0, hi=MAX_MODEL_RUNS)
        names = _parse_tensors(model, payload_size, where)
        if not names.get(_tensor_name(model.get("input"), where + ".input")):
            raise bad_request("%s: input %s is not a tensor with data" % (where, show(model.get("input"))))
        outputs = model.get("outputs")
        if not isinstance(outputs, list) or not outputs or any(o not in names for o in outputs):
            raise bad_request("%s: 'outputs' must be a non-empty list of tensor names" % where)
        steps = model.get("steps")
        if not isinstance(steps, list) or not 0 < len(steps) <= MAX_MODEL_STEPS:
            raise bad_request("%s: 'steps' must be a list of 1 to %d steps" % (where, MAX_MODEL_STEPS))
        for j, step in enumerate(steps):
            _parse_step(step, names, payload_size, expected, "%s.steps[%d]" % (where, j))
    return models


def _model_kernel(ctx, programs, step, mems, payload):
    """Create one step's kernel and set its arguments: (kernel, dims, global, local)."""
    cl, key = ctx.cl, step["program_key"]
    if key not in programs:
        raise AgentFailure("opencl", "program %r did not load from its binary" % key)
    kernel = cl.create("clCreateKernel", programs[key], step["kernel"].encode("utf-8"))
    try:
        for index, arg in enumerate(step["args"]):
            if "tensor" in arg:
                cl.call("clSetKernelArg", kernel, index, ctypes.sizeof(ptr), ctypes.byref(ptr(mems[arg["tensor"]])))
            elif "scalar" in arg:
                data = payload[arg["scalar"]:arg["scalar"] + arg["size"]]
                cl.call("clSetKernelArg", kernel, index, len(data), ctypes.create_string_buffer(data, len(data)))
            else:
                cl.call("clSetKernelArg", kernel, index, arg["local"], None)
    except AgentFailure as exc:
        cl.release("clReleaseKernel", kernel)
        raise AgentFailure(exc.kind, "%s (kernel %s)" % (exc.message, step["kernel"])) from exc
    dims = len(step["global"])
    local = (size_t * dims)(*step["local"]) if step.get("local") else None
    return kernel, dims, (size_t * dims)(*step["global"]), local


def _forward(ctx, launches, outputs):
    for kernel, dims, global_size, local_size in launches:
        ctx.cl.call("clEnqueueNDRangeKernel", ctx.queue, kernel, dims, None, global_size, local_size,
                    0, None, None)
    return [ctx.read_buffer(mem, size) for mem, size in outputs]


def run_model(ctx, programs, model, payload):
    """One model from programs already loaded: the first inference (buffers, weights upload, kernels,
    run, read back: what an app's first call pays), then `runs` steady ones (upload the input, run, read;
    each must give the first one's bytes). Returns (record, output bytes); a CL error fails the model only."""
    cl = ctx.cl
    record = {"name": model["name"], "ok": False, "error": None, "first_inference_ms": None,
              "steady_ms": None, "runs": 0, "outputs": []}
    mems, launches = {}, []
    sizes = dict((t["name"], t["size"]) for t in model["tensors"])
    try:
        start = time.perf_counter()
        for tensor in model["tensors"]:
            offset, size = tensor.get("data"), tensor["size"]
            host = None if offset is None else ctypes.create_string_buffer(payload[offset:offset + size], size)
            flags = CL_MEM_READ_WRITE | (0 if host is None else CL_MEM_COPY_HOST_PTR)
            mems[tensor["name"]] = cl.create("clCreateBuffer", ctx.context, flags, size, host)
        for step in model["steps"]:
            launches.append(_model_kernel(ctx, programs, step, mems, payload))
        outputs = [(mems[name], sizes[name]) for name in model["outputs"]]
        first = _forward(ctx, launches, outputs)
        first_ms = (time.perf_counter() - start) * 1000.0
        offset = next(t["data"] for t in model["tensors"] if t["name"] == model["input"])
        size = sizes[model["input"]]
        input_host = ctypes.create_string_buffer(payload[offset:offset + size], size)
        times = []
        for run in range(model.get("runs", 10)):
            start = time.perf_counter()
            cl.call("clEnqueueWriteBuffer", ctx.queue, mems[model["input"]], 1, 0, size, input_host, 0, None, None)
            again = _forward(ctx, launches, outputs)
            times.append((time.perf_counter() - start) * 1000.0)
            if again != first:
                raise AgentFailure("nondeterministic", "run %d of model %r gave other bytes than the first"
                                   % (run + 2, model["name"]))
        record.update(ok=True, first_inference_ms=round(first_ms, 3), runs=len(times),
                      times_ms=[round(t, 6) for t in times],
                      steady_ms=round(statistics.median(times), 3) if times else None,
                      outputs=[{"size": len(o)} for o in first])
        return record, b"".join(first)
    except AgentFailure as exc:
        record["error"] = exc.message
        return record, b""
    finally:
        for launch in launches:
            cl.release("clReleaseKernel", launch[0])
        for mem in mems.values():
            cl.release("clReleaseMemObject", mem)


def time_source_build(ctx, spec):
    """clCreateProgramWithSource + clBuildProgram of one program, in ms (load_program's counterpart). The
    program is released without asking for its binary: on PoCL that generates code an app building from
    source would only generate at its first run."""
    cl = ctx.cl
    source = ctypes.c_char_p(spec["compile_source"])
    length = size_t(len(spec["compile_source"]))
    start = time.perf_counter()
    program = cl.create("clCreateProgramWithSource", ctx.context, 1, ctypes.byref(source), ctypes.byref(length))
    try:
        code = cl.lib.clBuildProgram(program, 1, ctx.devices, spec["build_options"].encode("utf-8"), None, None)
        elapsed = round((time.perf_counter() - start) * 1000.0, 3)
    finally:
        cl.release("clReleaseProgram", program)
    if code != 0:
        raise ClError(code, "clBuildProgram (from source)")
    return elapsed


def op_startup(cl, sel, req, root, payload):
    """Start-up figures and models, in this order: (1) every program from its cached binary, as an app
    starts; (2) each model's first and steady inferences; (3) a throw-away build (the compiler's own
    start-up), then every program built from source. Run with NO_DRIVER_CACHE_ENV set."""
    expected = parse_expected(req)
    specs = parse_program_specs(req, root)
    missing = [s["key"] for s in specs if s["key"] not in expected]
    if missing:
        raise bad_request("programs %s are not in 'expected'" % ", ".join(repr(k) for k in missing))
    models = parse_models(req, len(payload), expected)
    binaries = load_checked_programs(root, req_str(req, "cache_file"), expected)
    ctx = ClContext(cl, sel)
    programs, load_ms, build_ms, errors, records, outputs = {}, {}, {}, {}, [], []
    try:
        for key in sorted(binaries):
            try:
                programs[key], load_ms[key] = load_program(ctx, binaries[key])
            except AgentFailure as exc:
                errors[key] = "from binary: %s" % exc.message
        for model in models:
            record, data = run_model(ctx, programs, model, payload)
            records.append(record)
            outputs.append(data)
        try:
            warm_up = time_source_build(ctx, {"compile_source": WARM_UP_SOURCE, "build_options": ""})
        except AgentFailure:
            warm_up = None
        for spec in specs:
            try:
                build_ms[spec["key"]] = time_source_build(ctx, spec)
            except AgentFailure as exc:
                errors[spec["key"]] = "from source: %s" % exc.message
    finally:
        for program in programs.values():
            cl.release("clReleaseProgram", program)
        ctx.close()
    figures = [{"key": s["key"], "load_from_binary_ms": load_ms.get(s["key"]),
                "build_from_source_ms": build_ms.get(s["key"]), "error": errors.get(s["key"])} for s in specs]
    data = b"".join(outputs)
    return {"programs": figures, "compiler_start_ms": warm_up, "models": records,
            "payload_size": len(data)}, data
