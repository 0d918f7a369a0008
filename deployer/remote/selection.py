"""Which OpenCL device a board's inventory entry selects, why there is none, and its fingerprint."""

import ctypes
import hashlib
import json
import os
import sys
from collections import namedtuple

from .framing import AgentFailure, bad_request, show
from .opencl import (
    CL_DEVICE_NOT_FOUND,
    CL_QUEUE_PROFILING_ENABLE,
    cl_devices,
    cl_error_name,
    cl_platforms,
    describe_device,
    describe_platform,
    ptr,
)

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Optional  # noqa: F401

# ----- why there is no platform -------------------------------------------------------------------


def icd_folder():
    # type: () -> str
    """Where the ICD loader looks: $OCL_ICD_VENDORS (a dir or one file) or /etc/OpenCL/vendors."""
    return os.environ.get("OCL_ICD_VENDORS") or "/etc/OpenCL/vendors"


def icd_files():
    """(where searched, .icd files) as the ICD loader sees them, in icd_folder()."""
    where = icd_folder()
    label = where + (" ($OCL_ICD_VENDORS)" if os.environ.get("OCL_ICD_VENDORS") else "")
    if os.path.isfile(where):
        return label, [where]
    try:
        names = sorted(n for n in os.listdir(where) if n.endswith(".icd"))
    except OSError:
        names = []
    return label, [os.path.join(where, n) for n in names]


def icd_library(path):
    """The library an ICD file names (its first line); OSError if the file cannot be read."""
    with open(path, "rb") as handle:
        return handle.read(4096).decode("utf-8", "replace").strip().split("\n")[0].strip()


def diagnose_no_platform():
    """An ICD file naming a library that does not load is the usual cause; say which one."""
    where, files = icd_files()
    for path in files:
        try:
            library = icd_library(path)
        except OSError as exc:
            return AgentFailure("icd_missing_library", "cannot read ICD file %s: %s" % (path, exc))
        try:
            ctypes.CDLL(library)
        except OSError as exc:
            return AgentFailure("icd_missing_library",
                                "ICD file %s names %r, which cannot be loaded: %s" % (path, library, exc))
    if files:
        return AgentFailure("no_platform", "no OpenCL platform: the ICD files in %s (%s) load but report no "
                            "platform" % (where, ", ".join(os.path.basename(f) for f in files)))
    return AgentFailure("no_platform", "no OpenCL platform: no .icd file in %s" % where)

# ----- selecting a device -------------------------------------------------------------------------

Selection = namedtuple("Selection", "platform device device_type library")

Found = namedtuple("Found", "platform_index device_index handle desc")

Selected = namedtuple("Selected", "platform_index platform platform_desc device_index device device_desc")

DEVICE_TYPES = ("gpu", "cpu", "accelerator", "any")


def parse_selection(value):
    """The inventory's `opencl:` map: platform/device by index or name substring, and a device type."""
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise bad_request("field 'opencl': expected an object (got %s)" % show(value))
    unknown = sorted(set(value) - {"platform", "device", "device_type", "library"})
    if unknown:
        raise bad_request("field 'opencl': unknown keys %s" % ", ".join(unknown))
    for name in ("platform", "device"):
        item = value.get(name)
        if item is not None and (isinstance(item, bool) or not isinstance(item, (int, str))
                                 or (isinstance(item, int) and item < 0) or item == ""):
            raise bad_request("field 'opencl.%s': expected an index >= 0 or a name (got %s)"
                              % (name, show(item)))
    device_type = value.get("device_type") or "any"
    if device_type not in DEVICE_TYPES:
        raise bad_request("field 'opencl.device_type': expected one of %s (got %s)"
                          % (", ".join(DEVICE_TYPES), show(device_type)))
    library = value.get("library")
    if library is not None and (not isinstance(library, str) or not library or "\0" in library
                                or ("/" in library and not library.startswith("/"))):
        raise bad_request("field 'opencl.library': expected an absolute path or a library file name (got %s)"
                          % show(library))
    return Selection(value.get("platform"), value.get("device"), device_type, library)


def _matches(spec, index, name):
    if isinstance(spec, int):
        return index == spec
    return spec.lower() in name.lower()


def _listing(platforms, found):
    lines = []
    for pi, desc in enumerate(platforms):
        devs = ["%d %r (%s)" % (f.device_index, f.desc["name"], "/".join(f.desc["type"]))
                for f in found if f.platform_index == pi]
        lines.append("platform %d %r: %s" % (pi, desc["name"], ", ".join(devs) or "no devices"))
    return "; ".join(lines)


def _type_ok(desc, device_type):
    return device_type == "any" or device_type.upper() in desc["type"]


def select_device(cl, selection):
    """Pick one (platform, device), or fail with no_platform / icd_missing_library / no_device /
    no_match. Without a platform or device given, the first GPU of any platform wins, else the first
    device of the first platform that has one."""
    handles = cl_platforms(cl)
    if not handles:
        raise diagnose_no_platform()
    platforms = [describe_platform(cl, h) for h in handles]
    found = []
    for pi, handle in enumerate(handles):
        for di, dev in enumerate(cl_devices(cl, handle)):
            found.append(Found(pi, di, dev, describe_device(cl, dev)))
    wanted = [pi for pi, p in enumerate(platforms)
              if selection.platform is None or _matches(selection.platform, pi, p["name"])]
    if not wanted:
        raise AgentFailure("no_match", "no platform matches opencl.platform %r; there are: %s"
                           % (selection.platform, _listing(platforms, found)))
    on_wanted = [f for f in found if f.platform_index in wanted]
    if not on_wanted:
        names = ", ".join(repr(platforms[pi]["name"]) for pi in wanted)
        raise AgentFailure("no_device", "no OpenCL device on platform %s (clGetDeviceIDs: %s)"
                           % (names, cl_error_name(CL_DEVICE_NOT_FOUND)))
    typed = [f for f in on_wanted if _type_ok(f.desc, selection.device_type)]
    if not typed and selection.device_type == "gpu" and all("CPU" in f.desc["type"] for f in on_wanted):
        first = on_wanted[0]
        raise AgentFailure("no_device", "only a CPU device (%s) on platform %s; set opencl.device_type: any "
                           "to accept it" % (first.desc["name"], platforms[first.platform_index]["name"]))
    if selection.device is None:
        gpus = [f for f in typed if "GPU" in f.desc["type"]]
        chosen = (gpus or typed)[0] if typed else None  # type: Optional[Found]
    else:
        chosen = next((f for f in typed if _matches(selection.device, f.device_index, f.desc["name"])), None)
    if chosen is None:
        raise AgentFailure("no_match", "no device matches opencl %s; there are: %s"
                           % (json.dumps(selection._asdict(), sort_keys=True), _listing(platforms, found)))
    return Selected(chosen.platform_index, handles[chosen.platform_index], platforms[chosen.platform_index],
                    chosen.device_index, chosen.handle, chosen.desc)


def fingerprint_of(sel):
    p, d = sel.platform_desc, sel.device_desc
    ident = "|".join([p["name"], p["version"], d["name"], d["driver_version"]])
    return {
        "platform": dict(p), "device": dict(d),
        "cpu_only": "CPU" in d["type"] and "GPU" not in d["type"],
        "platform_index": sel.platform_index, "device_index": sel.device_index,
        "python": "%d.%d.%d" % tuple(sys.version_info[:3]),
        "id": hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16],
    }


class ClContext:
    """A context and in-order queue on the selected device; released by close()."""

    def __init__(self, cl, sel, profiling=False):
        self.cl, self.device = cl, sel.device
        self.devices = (ptr * 1)(sel.device)
        self.context = cl.create("clCreateContext", None, 1, self.devices, None, None)
        try:
            properties = CL_QUEUE_PROFILING_ENABLE if profiling else 0  # `bench` reads device time from events
            self.queue = cl.create("clCreateCommandQueue", self.context, sel.device, properties)
        except AgentFailure:
            cl.release("clReleaseContext", self.context)
            raise

    def read_buffer(self, mem, size):
        """A blocking read: on the in-order queue it also waits for every kernel enqueued before it."""
        host = ctypes.create_string_buffer(size)
        self.cl.call("clEnqueueReadBuffer", self.queue, mem, 1, 0, size, host, 0, None, None)
        return host.raw[:size]

    def close(self):
        self.cl.release("clReleaseCommandQueue", self.queue)
        self.cl.release("clReleaseContext", self.context)
