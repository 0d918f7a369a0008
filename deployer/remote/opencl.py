"""The OpenCL binding: libOpenCL.so.1 through ctypes (boards rarely have pyopencl; they always have a driver)."""

import ctypes
import os

from .framing import AgentFailure

CL_ERRORS = {
    -1: "CL_DEVICE_NOT_FOUND", -2: "CL_DEVICE_NOT_AVAILABLE", -3: "CL_COMPILER_NOT_AVAILABLE",
    -4: "CL_MEM_OBJECT_ALLOCATION_FAILURE", -5: "CL_OUT_OF_RESOURCES", -6: "CL_OUT_OF_HOST_MEMORY",
    -7: "CL_PROFILING_INFO_NOT_AVAILABLE", -8: "CL_MEM_COPY_OVERLAP", -9: "CL_IMAGE_FORMAT_MISMATCH",
    -10: "CL_IMAGE_FORMAT_NOT_SUPPORTED", -11: "CL_BUILD_PROGRAM_FAILURE", -12: "CL_MAP_FAILURE",
    -13: "CL_MISALIGNED_SUB_BUFFER_OFFSET", -14: "CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST",
    -15: "CL_COMPILE_PROGRAM_FAILURE", -16: "CL_LINKER_NOT_AVAILABLE", -17: "CL_LINK_PROGRAM_FAILURE",
    -18: "CL_DEVICE_PARTITION_FAILED", -19: "CL_KERNEL_ARG_INFO_NOT_AVAILABLE",
    -30: "CL_INVALID_VALUE", -31: "CL_INVALID_DEVICE_TYPE", -32: "CL_INVALID_PLATFORM",
    -33: "CL_INVALID_DEVICE", -34: "CL_INVALID_CONTEXT", -35: "CL_INVALID_QUEUE_PROPERTIES",
    -36: "CL_INVALID_COMMAND_QUEUE", -37: "CL_INVALID_HOST_PTR", -38: "CL_INVALID_MEM_OBJECT",
    -39: "CL_INVALID_IMAGE_FORMAT_DESCRIPTOR", -40: "CL_INVALID_IMAGE_SIZE", -41: "CL_INVALID_SAMPLER",
    -42: "CL_INVALID_BINARY", -43: "CL_INVALID_BUILD_OPTIONS", -44: "CL_INVALID_PROGRAM",
    -45: "CL_INVALID_PROGRAM_EXECUTABLE", -46: "CL_INVALID_KERNEL_NAME", -47: "CL_INVALID_KERNEL_DEFINITION",
    -48: "CL_INVALID_KERNEL", -49: "CL_INVALID_ARG_INDEX", -50: "CL_INVALID_ARG_VALUE",
    -51: "CL_INVALID_ARG_SIZE", -52: "CL_INVALID_KERNEL_ARGS", -53: "CL_INVALID_WORK_DIMENSION",
    -54: "CL_INVALID_WORK_GROUP_SIZE", -55: "CL_INVALID_WORK_ITEM_SIZE", -56: "CL_INVALID_GLOBAL_OFFSET",
    -57: "CL_INVALID_EVENT_WAIT_LIST", -58: "CL_INVALID_EVENT", -59: "CL_INVALID_OPERATION",
    -60: "CL_INVALID_GL_OBJECT", -61: "CL_INVALID_BUFFER_SIZE", -62: "CL_INVALID_MIP_LEVEL",
    -63: "CL_INVALID_GLOBAL_WORK_SIZE", -64: "CL_INVALID_PROPERTY", -65: "CL_INVALID_IMAGE_DESCRIPTOR",
    -66: "CL_INVALID_COMPILER_OPTIONS", -67: "CL_INVALID_LINKER_OPTIONS",
    -68: "CL_INVALID_DEVICE_PARTITION_COUNT", -69: "CL_INVALID_PIPE_SIZE", -70: "CL_INVALID_DEVICE_QUEUE",
    -71: "CL_INVALID_SPEC_ID", -72: "CL_MAX_SIZE_RESTRICTION_EXCEEDED", -1001: "CL_PLATFORM_NOT_FOUND_KHR",
}

CL_DEVICE_NOT_FOUND = -1

CL_PLATFORM_NOT_FOUND_KHR = -1001

CL_PLATFORM_PROFILE, CL_PLATFORM_VERSION, CL_PLATFORM_NAME = 0x0900, 0x0901, 0x0902

CL_PLATFORM_VENDOR = 0x0903

CL_DEVICE_TYPE, CL_DEVICE_MAX_COMPUTE_UNITS, CL_DEVICE_MAX_WORK_GROUP_SIZE = 0x1000, 0x1002, 0x1004

CL_DEVICE_IMAGE_SUPPORT, CL_DEVICE_NAME, CL_DEVICE_VENDOR = 0x1016, 0x102B, 0x102C

CL_DRIVER_VERSION, CL_DEVICE_VERSION, CL_DEVICE_EXTENSIONS = 0x102D, 0x102F, 0x1030

CL_DEVICE_TYPE_ALL = 0xFFFFFFFF

DEVICE_TYPE_BITS = [(2, "CPU"), (4, "GPU"), (8, "ACCELERATOR"), (16, "CUSTOM"), (1, "DEFAULT")]

CL_PROGRAM_BINARY_SIZES, CL_PROGRAM_BINARIES, CL_PROGRAM_BUILD_LOG = 0x1165, 0x1166, 0x1183

CL_MEM_READ_WRITE, CL_MEM_WRITE_ONLY, CL_MEM_READ_ONLY, CL_MEM_COPY_HOST_PTR = 1, 1 << 1, 1 << 2, 1 << 5

CL_RGBA, CL_FLOAT = 0x10B5, 0x10DE

CL_QUEUE_PROFILING_ENABLE = 1 << 1
CL_PROFILING_COMMAND_START, CL_PROFILING_COMMAND_END = 0x1282, 0x1283
CL_DEVICE_GLOBAL_MEM_SIZE, CL_DEVICE_MAX_MEM_ALLOC_SIZE = 0x101F, 0x1010

cl_int, cl_uint, cl_ulong = ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint64

size_t, ptr = ctypes.c_size_t, ctypes.c_void_p

# name: (restype, argtypes). Pointers are plain void*: ctypes passes arrays and byref() through them.
CL_SIGNATURES = {
    "clGetPlatformIDs": (cl_int, [cl_uint, ptr, ptr]),
    "clGetPlatformInfo": (cl_int, [ptr, cl_uint, size_t, ptr, ptr]),
    "clGetDeviceIDs": (cl_int, [ptr, cl_ulong, cl_uint, ptr, ptr]),
    "clGetDeviceInfo": (cl_int, [ptr, cl_uint, size_t, ptr, ptr]),
    "clCreateContext": (ptr, [ptr, cl_uint, ptr, ptr, ptr, ptr]),
    "clCreateCommandQueue": (ptr, [ptr, ptr, cl_ulong, ptr]),
    "clCreateProgramWithSource": (ptr, [ptr, cl_uint, ptr, ptr, ptr]),
    "clCreateProgramWithBinary": (ptr, [ptr, cl_uint, ptr, ptr, ptr, ptr, ptr]),
    "clBuildProgram": (cl_int, [ptr, cl_uint, ptr, ctypes.c_char_p, ptr, ptr]),
    "clGetProgramBuildInfo": (cl_int, [ptr, ptr, cl_uint, size_t, ptr, ptr]),
    "clGetProgramInfo": (cl_int, [ptr, cl_uint, size_t, ptr, ptr]),
    "clCreateKernel": (ptr, [ptr, ctypes.c_char_p, ptr]),
    "clSetKernelArg": (cl_int, [ptr, cl_uint, size_t, ptr]),
    "clCreateBuffer": (ptr, [ptr, cl_ulong, size_t, ptr, ptr]),
    "clEnqueueNDRangeKernel": (cl_int, [ptr, ptr, cl_uint, ptr, ptr, ptr, cl_uint, ptr, ptr]),
    "clEnqueueReadBuffer": (cl_int, [ptr, ptr, cl_uint, size_t, size_t, ptr, cl_uint, ptr, ptr]),
    "clEnqueueWriteBuffer": (cl_int, [ptr, ptr, cl_uint, size_t, size_t, ptr, cl_uint, ptr, ptr]),
    "clFinish": (cl_int, [ptr]),
    "clReleaseMemObject": (cl_int, [ptr]),
    "clReleaseKernel": (cl_int, [ptr]),
    "clReleaseProgram": (cl_int, [ptr]),
    "clReleaseCommandQueue": (cl_int, [ptr]),
    "clReleaseContext": (cl_int, [ptr]),
    "clGetEventProfilingInfo": (cl_int, [ptr, cl_uint, size_t, ptr, ptr]),
    "clReleaseEvent": (cl_int, [ptr]),
}

# Looked up only when a case needs them: a loader without them still runs everything else.
# clCreateImage2D (deprecated in 1.2, exported by every loader) also serves OpenCL 1.1 boards.
CL_OPTIONAL_SIGNATURES = {
    "clCreateImage2D": (ptr, [ptr, cl_ulong, ptr, size_t, size_t, size_t, ptr, ptr]),
}


class ClImageFormat(ctypes.Structure):
    _fields_ = [("image_channel_order", cl_uint), ("image_channel_data_type", cl_uint)]


def cl_error_name(code):
    return "%s (%d)" % (CL_ERRORS.get(code, "UNKNOWN_CL_ERROR"), code)


class ClError(AgentFailure):
    """A CL call that returned an error code: kind `opencl`, message like
    `CL_INVALID_KERNEL_NAME (-46) in clCreateKernel`."""

    def __init__(self, code, call):
        AgentFailure.__init__(self, "opencl", "%s in %s" % (cl_error_name(code), call))
        self.code = code


class OpenCL:
    """The ICD loader, opened with ctypes, and thin checked wrappers around its calls."""

    def __init__(self, library=None):
        # The inventory's opencl.library (the request's `opencl.library`) wins; DEPLOYER_OPENCL_LIBRARY in
        # an inventory's env: is the older way to point at a board's non-standard loader.
        library = library or os.environ.get("DEPLOYER_OPENCL_LIBRARY") or "libOpenCL.so.1"
        try:
            self.lib = ctypes.CDLL(library)
        except OSError as exc:
            raise AgentFailure("no_loader", "cannot load the OpenCL ICD loader %s: %s"
                               % (library, exc)) from exc
        for name, (restype, argtypes) in CL_SIGNATURES.items():
            try:
                fn = getattr(self.lib, name)
            except AttributeError:
                raise AgentFailure("no_loader", "OpenCL library %s has no %s" % (library, name)) from None
            fn.restype, fn.argtypes = restype, argtypes

    def optional(self, name):
        """A function of CL_OPTIONAL_SIGNATURES; an `opencl` failure naming it when the loader lacks it."""
        try:
            fn = getattr(self.lib, name)
        except AttributeError:
            raise AgentFailure("opencl", "the OpenCL library has no %s" % name) from None
        fn.restype, fn.argtypes = CL_OPTIONAL_SIGNATURES[name]
        return fn

    def call(self, name, *args):
        code = getattr(self.lib, name)(*args)
        if code != 0:
            raise ClError(code, name)

    def create(self, name, *args):
        """Call a clCreate* function whose last argument is `cl_int *errcode_ret`."""
        err = cl_int(0)
        handle = getattr(self.lib, name)(*args, ctypes.byref(err))
        if err.value != 0 or not handle:
            raise ClError(err.value or -9999, name)
        return handle

    def info_bytes(self, fn, handles, param):
        size = size_t(0)
        self.call(fn, *handles, param, 0, None, ctypes.byref(size))
        buf = ctypes.create_string_buffer(max(size.value, 1))
        self.call(fn, *handles, param, size.value, buf, None)
        return buf.raw[:size.value]

    def info_str(self, fn, handles, param):
        return self.info_bytes(fn, handles, param).split(b"\0", 1)[0].decode("utf-8", "replace")

    def info_num(self, fn, handles, param, ctype):
        value = ctype(0)
        self.call(fn, *handles, param, ctypes.sizeof(value), ctypes.byref(value), None)
        return value.value

    def release(self, name, handle):
        if handle:
            getattr(self.lib, name)(handle)  # errors on release are not worth failing an op for


def cl_platforms(cl):
    """Platform handles; [] when the loader finds none (-1001 from ocl-icd, or a count of 0)."""
    count = cl_uint(0)
    code = cl.lib.clGetPlatformIDs(0, None, ctypes.byref(count))
    if code == CL_PLATFORM_NOT_FOUND_KHR or (code == 0 and count.value == 0):
        return []
    if code != 0:
        raise ClError(code, "clGetPlatformIDs")
    ids = (ptr * count.value)()
    cl.call("clGetPlatformIDs", count.value, ids, None)
    return list(ids)


def cl_devices(cl, platform):
    count = cl_uint(0)
    code = cl.lib.clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 0, None, ctypes.byref(count))
    if code == CL_DEVICE_NOT_FOUND or (code == 0 and count.value == 0):
        return []
    if code != 0:
        raise ClError(code, "clGetDeviceIDs")
    ids = (ptr * count.value)()
    cl.call("clGetDeviceIDs", platform, CL_DEVICE_TYPE_ALL, count.value, ids, None)
    return list(ids)


def describe_platform(cl, platform):
    get = lambda param: cl.info_str("clGetPlatformInfo", (platform,), param)  # noqa: E731
    return {"name": get(CL_PLATFORM_NAME), "vendor": get(CL_PLATFORM_VENDOR),
            "version": get(CL_PLATFORM_VERSION), "profile": get(CL_PLATFORM_PROFILE)}


def describe_device(cl, device):
    get = lambda param: cl.info_str("clGetDeviceInfo", (device,), param)  # noqa: E731
    num = lambda param, ctype: cl.info_num("clGetDeviceInfo", (device,), param, ctype)  # noqa: E731
    bits = num(CL_DEVICE_TYPE, cl_ulong)
    return {
        "name": get(CL_DEVICE_NAME), "vendor": get(CL_DEVICE_VENDOR),
        "type": [label for bit, label in DEVICE_TYPE_BITS if bits & bit],
        "version": get(CL_DEVICE_VERSION), "driver_version": get(CL_DRIVER_VERSION),
        "compute_units": num(CL_DEVICE_MAX_COMPUTE_UNITS, cl_uint),
        "max_work_group_size": num(CL_DEVICE_MAX_WORK_GROUP_SIZE, size_t),
        "extensions": get(CL_DEVICE_EXTENSIONS).split(),
        "image_support": bool(num(CL_DEVICE_IMAGE_SUPPORT, cl_uint)),
    }
