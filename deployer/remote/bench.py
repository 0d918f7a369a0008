"""The `bench` op: the latency of each kernel case (and model) from the cached binaries, as the benchmark
tools measure it (TFLite's benchmark_model, TVM's time_evaluator, MACE's mobile-ai-bench): program
creation timed apart, warm-up runs discarded, then repeats until both a count and a minimum time are
reached, each timed by its OpenCL profiling event (device time) and by the wall clock, with a pause
between items against heat. Every repeat is returned: the controller keeps them and judges the nights.

A case's buffers are bench-sized: each input is its tile (sent once) repeated to the buffer's size, so a
large bench size does not travel; a size the device cannot allocate fails that case only.
"""

import ctypes
import time

from .fields import req_field, req_int, req_str
from .framing import AgentFailure, bad_request, show
from .opencl import (
    CL_DEVICE_MAX_MEM_ALLOC_SIZE,
    CL_MEM_COPY_HOST_PTR,
    CL_MEM_READ_ONLY,
    CL_MEM_WRITE_ONLY,
    CL_PROFILING_COMMAND_END,
    CL_PROFILING_COMMAND_START,
    cl_ulong,
    ptr,
    size_t,
)
from .selection import ClContext
from .smoke import check_sizes, load_checked_programs, load_program, parse_expected
from .startup import parse_models, run_model

MAX_REPEATS = 1000  # per item: the reply and the history stay bounded
MAX_BUFFER = 1 << 34  # a bench buffer larger than 16 GiB is refused before anything is allocated

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Any, Dict, List  # noqa: F401


def parse_settings(req):
    return {
        "warmup": req_int(req, "warmup", 3, 0, 100),
        "min_repeats": req_int(req, "min_repeats", 10, 1, MAX_REPEATS),
        "max_repeats": req_int(req, "max_repeats", 200, 1, MAX_REPEATS),
        "min_time_ms": req_int(req, "min_time_ms", 500, 0, 600000),
        "pause_ms": req_int(req, "pause_ms", 100, 0, 60000),
        "item_timeout_ms": req_int(req, "item_timeout_ms", 60000, 1, 3600000),
    }


def parse_bench_cases(req, payload_size, expected):
    """Cases as `smoke` has them, except that every buffer argument has a `size` (the buffer's bytes) and
    an input's `in`/`tile` name its tile in the payload."""
    cases = req_field(req, "cases", [])
    if not isinstance(cases, list):
        raise bad_request("field 'cases': expected a list")
    for i, case in enumerate(cases):
        where = "cases[%d]" % i
        if not isinstance(case, dict) or not isinstance(case.get("id"), str):
            raise bad_request("%s: expected an object with a string 'id'" % where)
        if req_str(case, "program_key") not in expected:
            raise bad_request("%s: program_key is not in 'expected'" % where)
        req_str(case, "kernel")
        args = case.get("args")
        if not isinstance(args, list):
            raise bad_request("%s: 'args' must be a list" % where)
        for j, arg in enumerate(args):
            _check_arg(arg, payload_size, "%s.args[%d]" % (where, j))
        check_sizes(case, "global", where, optional=False)
        check_sizes(case, "local", where, optional=True)
    return cases


def _check_arg(arg, payload_size, where):
    if not isinstance(arg, dict):
        raise bad_request("%s: expected an object" % where)
    for name in ("size", "in", "tile", "out", "scalar", "local"):
        value = arg.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise bad_request("%s: %r must be an integer >= 0 (got %s)" % (where, name, show(value)))
    if "in" in arg:
        if not arg.get("tile") or arg["in"] + arg["tile"] > payload_size or not arg.get("size"):
            raise bad_request("%s: an input needs a tile inside the payload and a size" % where)
    elif "scalar" in arg:
        if arg["scalar"] + arg.get("size", 0) > payload_size:
            raise bad_request("%s: scalar bytes outside the payload" % where)
    elif "out" not in arg and "local" not in arg:
        raise bad_request("%s: expected one of in, out, scalar, local" % where)


def _buffer(ctx, arg, payload, limit):
    size = arg["size"] if "in" in arg else arg["out"]
    if size > min(limit, MAX_BUFFER):
        raise AgentFailure("opencl", "a %d-byte buffer does not fit: the device allocates at most %d bytes "
                                     "at once (CL_DEVICE_MAX_MEM_ALLOC_SIZE)" % (size, limit))
    if "in" in arg:
        tile = payload[arg["in"]:arg["in"] + arg["tile"]]
        try:
            data = (tile * (size // len(tile) + 1))[:size]
        except MemoryError:
            raise AgentFailure("opencl", "a %d-byte input does not fit in the board's memory" % size) from None
        host = ctypes.create_string_buffer(data, size)
        return ctx.cl.create("clCreateBuffer", ctx.context, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, size, host)
    return ctx.cl.create("clCreateBuffer", ctx.context, CL_MEM_WRITE_ONLY, size, None)


def _event_ms(cl, event):
    start, end = cl_ulong(0), cl_ulong(0)
    cl.call("clGetEventProfilingInfo", event, CL_PROFILING_COMMAND_START, 8, ctypes.byref(start), None)
    cl.call("clGetEventProfilingInfo", event, CL_PROFILING_COMMAND_END, 8, ctypes.byref(end), None)
    return max(0, end.value - start.value) / 1e6


def repeat(run_once, settings):
    """Warm up, then repeat until both the count and the minimum time are reached (at most max_repeats,
    within the item's timeout): (times, timed_out)."""
    for _ in range(settings["warmup"]):
        run_once()
    times = []  # type: List[float]
    start = time.monotonic()
    give_up = start + settings["item_timeout_ms"] / 1000.0
    while len(times) < settings["max_repeats"]:
        elapsed_ms = (time.monotonic() - start) * 1000.0
        if len(times) >= settings["min_repeats"] and elapsed_ms >= settings["min_time_ms"]:
            break
        if time.monotonic() > give_up:
            return times, True
        times.append(run_once())
    return times, False


def bench_case(ctx, program, case, payload, settings, limit):
    cl, kernel, mems = ctx.cl, None, []  # type: Any, Any, List[Any]
    record = {"id": case["id"], "ok": False, "error": None, "device_ms": [], "wall_ms": []}
    try:
        kernel = cl.create("clCreateKernel", program, case["kernel"].encode("utf-8"))
        for index, arg in enumerate(case["args"]):
            if "in" in arg or "out" in arg:
                mems.append(_buffer(ctx, arg, payload, limit))
                cl.call("clSetKernelArg", kernel, index, ctypes.sizeof(ptr), ctypes.byref(ptr(mems[-1])))
            elif "scalar" in arg:
                data = payload[arg["scalar"]:arg["scalar"] + arg["size"]]
                cl.call("clSetKernelArg", kernel, index, len(data), ctypes.create_string_buffer(data, len(data)))
            else:
                cl.call("clSetKernelArg", kernel, index, arg["local"], None)
        dims = len(case["global"])
        global_size = (size_t * dims)(*case["global"])
        local_size = (size_t * dims)(*case["local"]) if case.get("local") else None
        device_ms = []

        def run_once():
            event = ptr()
            start = time.perf_counter()
            cl.call("clEnqueueNDRangeKernel", ctx.queue, kernel, dims, None, global_size, local_size,
                    0, None, ctypes.byref(event))
            try:
                cl.call("clFinish", ctx.queue)
                wall = (time.perf_counter() - start) * 1000.0
                device_ms.append(round(_event_ms(cl, event), 6))
            finally:
                cl.release("clReleaseEvent", event)
            return round(wall, 6)

        wall_ms, timed_out = repeat(run_once, settings)
        warm = settings["warmup"]
        record.update(ok=not timed_out, device_ms=device_ms[warm:], wall_ms=wall_ms)
        if timed_out:
            record["error"] = "timed out after %d repeats (item timeout %d ms)" % (
                len(wall_ms), settings["item_timeout_ms"])
    except AgentFailure as exc:
        record["error"] = exc.message
    finally:
        for mem in mems:
            cl.release("clReleaseMemObject", mem)
        cl.release("clReleaseKernel", kernel)
    return record


def bench_model(ctx, programs, model, payload, settings):
    """A model's steady inferences, timed by the wall clock (a forward pass is several kernels)."""
    runs = max(settings["min_repeats"], 1)
    record, _ = run_model(ctx, programs, dict(model, runs=runs + settings["warmup"]), payload)
    times = record.get("times_ms") or []
    return {"name": model["name"], "ok": record["ok"], "error": record["error"],
            "wall_ms": times[settings["warmup"]:], "first_inference_ms": record["first_inference_ms"]}


def op_bench(cl, sel, req, root, payload):
    expected = parse_expected(req)
    settings = parse_settings(req)
    cases = parse_bench_cases(req, len(payload), expected)
    models = parse_models(req, len(payload), expected) if req.get("models") else []
    binaries = load_checked_programs(root, req_str(req, "cache_file"), expected)
    ctx = ClContext(cl, sel, profiling=True)
    programs, create_ms, errors = {}, {}, {}  # type: Dict[str, Any], Dict[str, float], Dict[str, str]
    try:
        limit = cl.info_num("clGetDeviceInfo", (ctx.device,), CL_DEVICE_MAX_MEM_ALLOC_SIZE, cl_ulong)
        for key in sorted(binaries):
            try:
                programs[key], create_ms[key] = load_program(ctx, binaries[key])
            except AgentFailure as exc:
                errors[key] = exc.message
        records, model_records = [], []
        for case in cases:
            if case["program_key"] in errors:
                records.append({"id": case["id"], "ok": False, "device_ms": [], "wall_ms": [],
                                "error": "program did not load from its binary: %s" % errors[case["program_key"]]})
            else:
                records.append(bench_case(ctx, programs[case["program_key"]], case, payload, settings, limit))
            time.sleep(settings["pause_ms"] / 1000.0)
        for model in models:
            model_records.append(bench_model(ctx, programs, model, payload, settings))
            time.sleep(settings["pause_ms"] / 1000.0)
    finally:
        for program in programs.values():
            cl.release("clReleaseProgram", program)
        ctx.close()
    return {"create_ms": create_ms, "create_errors": errors, "cases": records, "models": model_records}, b""
