"""The `smoke` op: load each program from the cached binary (checked first) and run the kernels' cases."""

import ctypes
import hashlib
import time

from .fields import MISSING, req_field, req_str
from .framing import AgentFailure, bad_request, show
from .fs import io_failure, read_file_limited, resolve_inside
from .layout import MAX_GET, MAX_MEMORY_PAYLOAD, SHA256_RE
from .mace import decode_any, decode_mace_pb
from .opencl import (
    CL_FLOAT,
    CL_MEM_COPY_HOST_PTR,
    CL_MEM_READ_ONLY,
    CL_MEM_WRITE_ONLY,
    CL_RGBA,
    ClError,
    ClImageFormat,
    cl_int,
    ptr,
    size_t,
)
from .selection import ClContext

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Any, Dict, List  # noqa: F401

def parse_expected(req):
    expected = req_field(req, "expected", MISSING)
    if not isinstance(expected, dict):
        raise bad_request("field 'expected': expected an object {program key: sha256}")
    for key, digest in expected.items():
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            raise bad_request("field 'expected': %r: expected 64 lower-case hex digits (got %s)"
                              % (key, show(digest)))
    return expected


def _differing_programs(data, expected):
    """For a file whose CRC fails: which expected programs differ from the controller's copy."""
    try:
        table = dict(reversed(decode_mace_pb(data, check_crc=False)))  # the first pair of a key wins
    except ValueError:
        return ""
    differ = sorted(k for k in expected if hashlib.sha256(table.get(k, b"")).hexdigest() != expected[k])
    return "; program(s) differing from the pulled copy: %s" % ", ".join(repr(k) for k in differ) if differ else ""


def load_checked_programs(root, cache_file, expected):
    """Read the cache file and return {key: bytes} for every expected key, each checked against its
    sha256. Any difference is binary_mismatch, found before a driver sees a byte."""
    path = resolve_inside(root, cache_file)
    try:
        data = read_file_limited(path, MAX_GET, cache_file)
    except OSError as exc:
        raise io_failure(exc, cache_file) from exc
    try:
        pairs = decode_any(data)[1]
    except ValueError as exc:
        raise AgentFailure("binary_mismatch", "cache file %s is malformed: %s%s"
                           % (cache_file, exc, _differing_programs(data, expected))) from exc
    table = {}  # type: Dict[str, Any]
    for key, value in pairs:
        table.setdefault(key, value)  # MACE: the first pair of a key wins
    programs = {}
    for key in sorted(expected):
        if key not in table:
            raise AgentFailure("binary_mismatch", "program %r is not in %s" % (key, cache_file))
        got = hashlib.sha256(table[key]).hexdigest()
        if got != expected[key]:
            raise AgentFailure("binary_mismatch", "program %r in %s has sha256 %s, expected %s"
                               % (key, cache_file, got, expected[key]))
        programs[key] = table[key]
    return programs


def range_arg(arg, name, payload_size, where):
    offset, size = arg.get(name), arg.get("size")
    for label, v in ((name, offset), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad_request("%s: '%s' must be an integer >= 0 (got %s)" % (where, label, show(v)))
    if size == 0 or offset + size > payload_size:
        raise bad_request("%s: bytes [%d, %d) are empty or outside the %d-byte payload"
                          % (where, offset, offset + size, payload_size))


def positive(arg, name, where, limit=MAX_MEMORY_PAYLOAD):
    n = arg.get(name)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= limit:
        raise bad_request("%s: '%s' must be an integer in [1, %d] (got %s)" % (where, name, limit, show(n)))
    return n


def _check_image_arg(arg, payload_size, where):
    """{image: offset, size, width, height}: an RGBA float image2d_t made from payload bytes."""
    if set(arg) != {"image", "size", "width", "height"}:
        raise bad_request("%s: an image takes image, size, width and height (got %s)" % (where, show(arg)))
    range_arg(arg, "image", payload_size, where)
    width, height = positive(arg, "width", where, 1 << 16), positive(arg, "height", where, 1 << 16)
    if arg["size"] != width * height * 16:
        raise bad_request("%s: %d bytes is not a %dx%d RGBA float image (%d bytes)"
                          % (where, arg["size"], width, height, width * height * 16))


def check_arg(arg, payload_size, where):
    if not isinstance(arg, dict):
        raise bad_request("%s: expected an object" % where)
    if "image" in arg:
        return _check_image_arg(arg, payload_size, where)
    kinds = [k for k in ("in", "out", "scalar", "local") if k in arg]
    if len(kinds) != 1 or set(arg) - {kinds[0], "size"}:
        raise bad_request("%s: expected one of {in, size}, {out}, {scalar, size}, {local}, "
                          "{image, size, width, height} (got %s)" % (where, show(arg)))
    if kinds[0] in ("in", "scalar"):
        range_arg(arg, kinds[0], payload_size, where)
    else:
        n = arg[kinds[0]]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_MEMORY_PAYLOAD:
            raise bad_request("%s: '%s' must be a size in bytes > 0 (got %s)" % (where, kinds[0], show(n)))
        if "size" in arg:
            raise bad_request("%s: '%s' takes no 'size'" % (where, kinds[0]))


def check_sizes(case, name, where, optional):
    value = case.get(name)
    if value is None and optional:
        return
    if (not isinstance(value, list) or not 1 <= len(value) <= 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise bad_request("%s: '%s' must be a list of 1 to 3 integers >= 1 (got %s)"
                          % (where, name, show(value)))


def parse_cases(req, payload_size, expected):
    cases = req_field(req, "cases", MISSING)
    if not isinstance(cases, list):
        raise bad_request("field 'cases': expected a list")
    total_out = 0
    for i, case in enumerate(cases):
        where = "cases[%d]" % i
        if not isinstance(case, dict):
            raise bad_request("%s: expected an object" % where)
        if not isinstance(case.get("id"), (str, int)) or isinstance(case.get("id"), bool):
            raise bad_request("%s: 'id' must be a string or integer" % where)
        key, kernel = req_str(case, "program_key"), req_str(case, "kernel")
        if key not in expected:
            raise bad_request("%s: program_key %r is not in 'expected' (every program is checked before "
                              "a driver loads it)" % (where, key))
        if not kernel:
            raise bad_request("%s: 'kernel' is empty" % where)
        args = case.get("args")
        if not isinstance(args, list):
            raise bad_request("%s: 'args' must be a list" % where)
        for j, arg in enumerate(args):
            check_arg(arg, payload_size, "%s.args[%d]" % (where, j))
            total_out += arg.get("out", 0)
        check_sizes(case, "global", where, optional=False)
        check_sizes(case, "local", where, optional=True)
        if case.get("local") is not None and len(case["local"]) != len(case["global"]):
            raise bad_request("%s: 'local' and 'global' differ in length" % where)
    if total_out > MAX_MEMORY_PAYLOAD:
        raise bad_request("outputs total %d bytes, over the limit of %d" % (total_out, MAX_MEMORY_PAYLOAD))
    return cases


def load_program(ctx, binary):
    """clCreateProgramWithBinary + clBuildProgram; returns (program, ms)."""
    cl = ctx.cl
    lengths = (size_t * 1)(len(binary))
    holder = ctypes.create_string_buffer(binary, len(binary))
    pointers = (ptr * 1)(ctypes.addressof(holder))
    status = (cl_int * 1)()
    start = time.perf_counter()
    program = cl.create("clCreateProgramWithBinary", ctx.context, 1, ctx.devices, lengths, pointers, status)
    try:
        code = cl.lib.clBuildProgram(program, 1, ctx.devices, b"", None, None)
        if code != 0:
            raise ClError(code, "clBuildProgram (from binary)")
    except AgentFailure:
        cl.release("clReleaseProgram", program)
        raise
    return program, round((time.perf_counter() - start) * 1000.0, 3)


def create_image(ctx, data, width, height):
    """A read-only CL_RGBA / CL_FLOAT image2d made from `data` (width * height * 16 bytes)."""
    host = ctypes.create_string_buffer(data, len(data))
    image_format = ClImageFormat(CL_RGBA, CL_FLOAT)
    err = cl_int(0)
    create = ctx.cl.optional("clCreateImage2D")
    mem = create(ctx.context, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, ctypes.byref(image_format),
                 width, height, 0, host, ctypes.byref(err))
    if err.value != 0 or not mem:
        raise ClError(err.value or -9999, "clCreateImage2D")
    return mem


def _set_args(ctx, kernel, case, payload, mems):
    """Set every kernel argument; returns [(mem, size)] of the outputs in argument order."""
    cl, outputs = ctx.cl, []
    for index, arg in enumerate(case["args"]):
        if "image" in arg:
            data = payload[arg["image"]:arg["image"] + arg["size"]]
            mem = create_image(ctx, data, arg["width"], arg["height"])
            mems.append(mem)
            cl.call("clSetKernelArg", kernel, index, ctypes.sizeof(ptr), ctypes.byref(ptr(mem)))
        elif "in" in arg or "out" in arg:
            if "in" in arg:
                data = payload[arg["in"]:arg["in"] + arg["size"]]
                host = ctypes.create_string_buffer(data, len(data))
                flags, size = CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, len(data)
            else:
                host, flags, size = None, CL_MEM_WRITE_ONLY, arg["out"]
            mem = cl.create("clCreateBuffer", ctx.context, flags, size, host)
            mems.append(mem)
            cl.call("clSetKernelArg", kernel, index, ctypes.sizeof(ptr), ctypes.byref(ptr(mem)))
            if "out" in arg:
                outputs.append((mem, size))
        elif "scalar" in arg:
            data = payload[arg["scalar"]:arg["scalar"] + arg["size"]]
            cl.call("clSetKernelArg", kernel, index, len(data), ctypes.create_string_buffer(data, len(data)))
        else:
            cl.call("clSetKernelArg", kernel, index, arg["local"], None)
    return outputs


def run_case(ctx, program, case, payload):
    """Run one case: (record, output bytes). A CL error fails only this case."""
    cl, kernel = ctx.cl, None
    mems = []  # type: List[Any]
    record = {"id": case["id"], "ok": False, "error": None, "outputs": [], "run_ms": None}
    try:
        kernel = cl.create("clCreateKernel", program, case["kernel"].encode("utf-8"))
        outputs = _set_args(ctx, kernel, case, payload, mems)
        dims = len(case["global"])
        global_size = (size_t * dims)(*case["global"])
        local_size = (size_t * dims)(*case["local"]) if case.get("local") else None
        start = time.perf_counter()
        cl.call("clEnqueueNDRangeKernel", ctx.queue, kernel, dims, None, global_size, local_size,
                0, None, None)
        cl.call("clFinish", ctx.queue)
        run_ms = round((time.perf_counter() - start) * 1000.0, 3)
        chunks = [ctx.read_buffer(mem, size) for mem, size in outputs]
        record.update(ok=True, outputs=[{"size": len(c)} for c in chunks], run_ms=run_ms)
        return record, b"".join(chunks)
    except AgentFailure as exc:
        record["error"] = exc.message
        return record, b""
    finally:
        for mem in mems:
            cl.release("clReleaseMemObject", mem)
        cl.release("clReleaseKernel", kernel)


def op_smoke(cl, sel, req, root, payload):
    expected = parse_expected(req)
    cases = parse_cases(req, len(payload), expected)
    binaries = load_checked_programs(root, req_str(req, "cache_file"), expected)
    ctx = ClContext(cl, sel)
    programs, load_ms, load_errors = {}, {}, {}
    try:
        for key in sorted(binaries):
            try:
                programs[key], load_ms[key] = load_program(ctx, binaries[key])
            except AgentFailure as exc:
                load_errors[key] = exc.message
        records, outputs = [], []
        for case in cases:
            key = case["program_key"]
            if key in load_errors:
                record = {"id": case["id"], "ok": False, "outputs": [], "run_ms": None,
                          "error": "program %r did not load from its binary: %s" % (key, load_errors[key])}
                data = b""
            else:
                record, data = run_case(ctx, programs[key], case, payload)
            records.append(record)
            outputs.append(data)
    finally:
        for program in programs.values():
            cl.release("clReleaseProgram", program)
        ctx.close()
    data = b"".join(outputs)
    return {"load_ms": load_ms, "load_errors": load_errors, "cases": records, "payload_size": len(data)}, data
