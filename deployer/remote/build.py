"""The `build` op: compile each program on the board's driver, write the MACE cache file and the manifest.

This module, the OpenCL binding and the container codec are what a binary depends on: the controller's
build keys hash exactly these three (deployer.protocol.bundle.BUILD_MODULES).
"""

import ctypes
import hashlib
import json
import os
import re
import time

from .fields import MISSING, req_field, req_int, req_str, req_str_list
from .framing import MAX_LINE, AgentFailure, bad_request, show
from .fs import log_slug, read_file_limited, resolve_inside, tail_text, write_atomic
from .layout import BUILD_KEY_RE, CACHE_FILE, LOG_TAIL, MANIFEST_FILE, MAX_GET, SHA256_RE
from .mace import (
    DEVICE_NAME_KEY,
    PLATFORM_INFO_KEY,
    PROGRAM_HASH_PREFIX,
    encode_mace_legacy,
    encode_mace_pb,
    mace_device_name,
    mace_platform_info,
    mace_program_hash,
    mace_program_key,
)
from .opencl import (
    CL_PROGRAM_BINARIES,
    CL_PROGRAM_BINARY_SIZES,
    CL_PROGRAM_BUILD_LOG,
    ClError,
    cl_error_name,
    ptr,
    size_t,
)
from .selection import ClContext, fingerprint_of
from .smoke import load_program


def parse_build(req, root):
    """Validate a build request; read every source and header. Returns (mace_version, specs)."""
    return req_str(req, "mace_version"), parse_program_specs(req, root)


def parse_program_specs(req, root):
    """The request's `programs` (build and startup): checked, with their sources and headers read."""
    programs = req_field(req, "programs", MISSING)
    if not isinstance(programs, list):
        raise bad_request("field 'programs': expected a list")
    specs, keys = [], set()
    for i, item in enumerate(programs):
        if not isinstance(item, dict):
            raise bad_request("programs[%d]: expected an object" % i)
        spec = {"key": req_str(item, "key"), "name": req_str(item, "name"), "source": req_str(item, "source"),
                "headers": req_str_list(item, "headers", []), "options": req_str_list(item, "options", []),
                "compile_options": req_str_list(item, "compile_options", []),
                "build_key": req_str(item, "build_key", None, pattern=BUILD_KEY_RE)}
        if spec["key"] != mace_program_key(spec["name"], spec["options"]):
            raise bad_request("programs[%d]: key %r is not MACE's key for name and options (%r)"
                              % (i, spec["key"], mace_program_key(spec["name"], spec["options"])))
        if spec["key"] in keys:
            raise bad_request("programs[%d]: key %r appears twice" % (i, spec["key"]))
        keys.add(spec["key"])
        for opt in spec["options"] + spec["compile_options"]:
            if re.search(r"\s", opt):
                raise bad_request("programs[%d]: option %r contains white space" % (i, opt))
        _load_program_files(spec, root)
        specs.append(spec)
    return specs


def _load_program_files(spec, root):
    source_path = resolve_inside(root, spec["source"])
    # Absolute, so each release's builds are its own: with one path for all releases, two processes
    # building the same program at once into one PoCL cache raced, and PoCL later aborted loading the
    # binary one of them got (pocl_binary_get_kernels_metadata: `len > 0').
    include_dir = os.path.dirname(source_path)
    if re.search(r"\s", include_dir):
        raise bad_request("kernel directory %r contains white space; build options cannot quote it "
                          "(choose a remote_dir without spaces)" % include_dir)
    try:
        spec["source_bytes"] = read_file_limited(source_path, MAX_GET, spec["source"])
        spec["header_bytes"] = [read_file_limited(resolve_inside(root, h), MAX_GET, h)
                                for h in spec["headers"]]
    except OSError as exc:
        raise AgentFailure("io", "program %r: cannot read %s: %s"
                           % (spec["key"], exc.filename, exc.strerror)) from exc
    spec["build_options"] = " ".join(spec["options"] + spec["compile_options"] + ["-I", include_dir])
    # The driver compiles a copy (PoCL: a temp file); a #line directive makes its log name the file
    # as the release has it, e.g. "kernels/relu.cl:3:7: error: ...". Line numbers stay the same.
    quoted = spec["source"].replace("\\", "\\\\").replace('"', '\\"')
    spec["compile_source"] = ('#line 1 "%s"\n' % quoted).encode("utf-8") + spec["source_bytes"]


def program_binary(cl, program):
    sizes = (size_t * 1)()
    cl.call("clGetProgramInfo", program, CL_PROGRAM_BINARY_SIZES, ctypes.sizeof(sizes), sizes, None)
    if sizes[0] == 0:
        raise AgentFailure("opencl", "the driver returned an empty binary (CL_PROGRAM_BINARY_SIZES is 0)")
    buf = ctypes.create_string_buffer(sizes[0])
    pointers = (ptr * 1)(ctypes.addressof(buf))
    cl.call("clGetProgramInfo", program, CL_PROGRAM_BINARIES, ctypes.sizeof(pointers), pointers, None)
    return buf.raw[:sizes[0]]


def build_one(ctx, spec):
    """Build one program from source: a record for the reply, and its binary (None on failure)."""
    cl = ctx.cl
    source = ctypes.c_char_p(spec["compile_source"])
    length = size_t(len(spec["compile_source"]))
    program = cl.create("clCreateProgramWithSource", ctx.context, 1, ctypes.byref(source),
                        ctypes.byref(length))
    try:
        start = time.perf_counter()
        options = spec["build_options"].encode("utf-8")
        code = cl.lib.clBuildProgram(program, 1, ctx.devices, options, None, None)
        build_ms = round((time.perf_counter() - start) * 1000.0, 3)
        try:
            log = cl.info_str("clGetProgramBuildInfo", (program, ctx.device), CL_PROGRAM_BUILD_LOG)
        except ClError as exc:
            log = "(no build log: %s)" % exc.message
        record = {"key": spec["key"], "ok": code == 0, "build_ms": build_ms, "binary_size": 0, "sha256": None,
                  "log": log}
        if code != 0:
            record["error"] = "%s in clBuildProgram" % cl_error_name(code)
            record["log"] = log.strip() and log or record["error"]
            return record, None
        binary = program_binary(cl, program)
        record.update(binary_size=len(binary), sha256=hashlib.sha256(binary).hexdigest())
        return record, binary
    finally:
        cl.release("clReleaseProgram", program)


def cache_pairs(sel, mace_version, built, mace_format="pb"):
    """The entries of mace_cl_compiled_program.bin for `built`, [(manifest entry, binary)]. MACE v1.0 (legacy)
    knows no device-name or program_hash_ entries."""
    p, d = sel.platform_desc, sel.device_desc
    pairs = [(PLATFORM_INFO_KEY, mace_platform_info(p["name"], p["profile"], p["version"], mace_version)
              .encode("utf-8"))]
    if mace_format == "pb":
        pairs.append((DEVICE_NAME_KEY, mace_device_name(d["name"], d["version"]).encode("utf-8")))
    for entry, binary in built:
        pairs.append((entry["key"], binary))
        if mace_format == "pb":
            pairs.append((PROGRAM_HASH_PREFIX + entry["key"], entry["program_hash"].encode("ascii")))
    return pairs


def write_logs(build_dir, records):
    """build/logs/<slug>.log for every program; a slug two keys share gets a hash suffix."""
    logs_dir = os.path.join(build_dir, "logs")
    os.makedirs(logs_dir, 0o755, exist_ok=True)
    used = set()
    for record in records:
        slug = log_slug(record["key"])
        if slug in used:
            slug = slug[:190] + "-" + hashlib.sha256(record["key"].encode("utf-8")).hexdigest()[:8]
        used.add(slug)
        write_atomic(os.path.join(logs_dir, slug + ".log"), [record["log"].encode("utf-8", "replace")])
        record["log_file"] = "build/logs/%s.log" % slug


def manifest_of(fingerprint, mace_version, built, cache, mace_format="pb"):
    """build/manifest.json: `built` is [(manifest entry, binary)]."""
    programs = [entry for entry, _ in built]
    return {"schema": 1, "fingerprint": fingerprint, "mace_version": mace_version, "mace_format": mace_format,
            "programs": programs, "cache_sha256": hashlib.sha256(cache).hexdigest(), "cache_size": len(cache)}


def fit_logs(reply, records):
    """Cut each returned log to LOG_TAIL, and further if the reply line would pass MAX_LINE."""
    limit = LOG_TAIL
    while True:
        for record, program in zip(records, reply["programs"]):
            program["log"] = tail_text(record["log"], limit)
        if len(json.dumps(reply)) < MAX_LINE - 4096 or limit < 64:
            return reply
        limit //= 2

MANIFEST_ENTRY_FIELDS = ("key", "name", "options", "compile_options", "binary_size", "sha256", "source_sha256",
                         "program_hash", "build_key")


def manifest_entry(spec, binary):
    """A built program's record in build/manifest.json."""
    return {"key": spec["key"], "name": spec["name"], "options": spec["options"],
            "compile_options": spec["compile_options"], "binary_size": len(binary),
            "sha256": hashlib.sha256(binary).hexdigest(),
            "source_sha256": hashlib.sha256(spec["source_bytes"]).hexdigest(),
            "program_hash": mace_program_hash(spec["source_bytes"], spec["header_bytes"]),
            "build_key": spec.get("build_key")}


def parse_reuse(req, payload):
    """[(reply record, manifest entry, binary)] of the binaries the session took from the base release."""
    reuse = []
    for i, item in enumerate(req_field(req, "reuse", []) or []):
        entry = item.get("entry") if isinstance(item, dict) else None
        if not isinstance(entry, dict):
            raise bad_request("reuse[%d]: expected an object with an entry" % i)
        offset, size = req_int(item, "offset", lo=0), req_int(item, "size", lo=1)
        if offset + size > len(payload):
            raise bad_request("reuse[%d]: range past the payload" % i)
        binary = payload[offset:offset + size]
        entry = dict((k, entry.get(k)) for k in MANIFEST_ENTRY_FIELDS)
        req_str(entry, "key")
        req_str(entry, "program_hash")
        if hashlib.sha256(binary).hexdigest() != entry["sha256"]:
            raise AgentFailure("checksum", "reused binary of %r does not match its manifest" % entry["key"])
        record = {"key": entry["key"], "ok": True, "build_ms": 0.0, "binary_size": size,
                  "sha256": entry["sha256"], "log": req_str(item, "log", ""), "reused": True}
        reuse.append((record, entry, binary))
    return reuse


def given_binaries(req, payload):
    """The controller's `given` [{key, sha256, size, from}] + the binaries in that order as the payload:
    (the list with each one's offset, the bytes), every binary checked against its sha256 (`checksum`)."""
    items = req_field(req, "given", []) or []
    if not isinstance(items, list):
        raise bad_request("field 'given': expected a list")
    if not items:
        return None, b""
    data = payload.read_all()
    out, at = [], 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_request("given[%d]: expected an object" % i)
        size = req_int(item, "size", lo=1)
        if at + size > len(data):
            raise bad_request("given[%d]: %d bytes past the payload's %d" % (i, size, len(data)))
        entry = {"key": req_str(item, "key"), "sha256": req_str(item, "sha256", pattern=SHA256_RE),
                 "from": req_str(item, "from", ""), "offset": at, "size": size}
        if hashlib.sha256(data[at:at + size]).hexdigest() != entry["sha256"]:
            raise AgentFailure("checksum", "the binary given for %s arrived with another sha256" % show(entry["key"]))
        out.append(entry)
        at += size
    if at != len(data):
        raise bad_request("the payload holds %d bytes the given binaries do not account for" % (len(data) - at))
    return out, data


def parse_given(req, payload, specs):
    """{key: (binary, origin)} of the programs whose binary another device of the same fingerprint built
    (`given`: [{key, sha256, offset, size, from}] into the payload, placed there by the session): each is
    checked against its sha256 and must be one of the request's `programs` (their source is the fallback)."""
    keys = set(spec["key"] for spec in specs)
    given = {}
    for i, item in enumerate(req_field(req, "given", []) or []):
        if not isinstance(item, dict):
            raise bad_request("given[%d]: expected an object" % i)
        key, sha = req_str(item, "key"), req_str(item, "sha256", pattern=SHA256_RE)
        offset, size = req_int(item, "offset", lo=0), req_int(item, "size", lo=1)
        if key not in keys:
            raise bad_request("given[%d]: %s is not one of the programs to build" % (i, show(key)))
        if key in given or offset + size > len(payload):
            raise bad_request("given[%d]: %s twice, or its range is past the payload" % (i, show(key)))
        binary = payload[offset:offset + size]
        if hashlib.sha256(binary).hexdigest() != sha:
            raise AgentFailure("checksum", "the binary given for %r does not match its sha256" % key)
        given[key] = (binary, req_str(item, "from", ""))
    return given


def take_given(ctx, spec, binary, origin):
    """A binary built elsewhere, accepted when this board's driver loads it (clCreateProgramWithBinary +
    clBuildProgram); refused, the program is compiled here from source and the record says why."""
    start = time.perf_counter()
    try:
        program, _ = load_program(ctx, binary)
    except AgentFailure as exc:
        record, built = build_one(ctx, spec)
        record["given"] = "refused: %s" % exc.message
        return record, built
    ctx.cl.release("clReleaseProgram", program)
    record = {"key": spec["key"], "ok": True, "build_ms": round((time.perf_counter() - start) * 1000.0, 3),
              "binary_size": len(binary), "sha256": hashlib.sha256(binary).hexdigest(),
              "log": "(built by %s; loaded by this board's driver)" % (origin or "another device"),
              "given": "loaded"}
    return record, binary


def op_build(cl, sel, req, root, payload=b""):
    mace_version, specs = parse_build(req, root)
    reuse = parse_reuse(req, payload)
    given = parse_given(req, payload, specs)
    results = []
    if specs:
        ctx = ClContext(cl, sel)
        try:
            results = [take_given(ctx, spec, *given[spec["key"]]) if spec["key"] in given else build_one(ctx, spec)
                       for spec in specs]
        finally:
            ctx.close()
    records = [r for r, _ in results] + [r for r, _, _ in reuse]
    built = [(manifest_entry(spec, binary), binary) for spec, (_, binary) in zip(specs, results)
             if binary is not None] + [(entry, binary) for _, entry, binary in reuse]
    built.sort(key=lambda item: item[0]["key"])
    mace_format = req_str(req, "mace_format", "pb")
    if mace_format not in ("pb", "legacy"):
        raise bad_request("mace_format must be pb or legacy (got %s)" % show(mace_format))
    pairs = cache_pairs(sel, mace_version, built, mace_format)
    cache = encode_mace_pb(pairs) if mace_format == "pb" else encode_mace_legacy(pairs)
    build_dir = os.path.join(root, "build")
    os.makedirs(build_dir, 0o755, exist_ok=True)
    write_logs(build_dir, records)
    write_atomic(os.path.join(root, CACHE_FILE), [cache])
    log_files = dict((r["key"], r["log_file"]) for r in records)
    for entry, _ in built:
        entry["log_file"] = log_files.get(entry["key"])
    manifest = manifest_of(fingerprint_of(sel), mace_version, built, cache, mace_format)
    write_atomic(os.path.join(root, MANIFEST_FILE), [json.dumps(manifest, indent=1, sort_keys=True).encode()])
    reply = {"programs": [dict(r) for r in records], "cache_file": CACHE_FILE, "manifest_file": MANIFEST_FILE,
             "cache_sha256": manifest["cache_sha256"], "cache_size": len(cache)}
    return fit_logs(reply, records), b""
