"""The compile step every non-deploy contender runs on each device: `python3 compile.py KERNELS OUT`.

What a shell user would write: stdlib + ctypes (no pyopencl on a board). It builds every program variant of
the library listed in KERNELS/programs.json (written by bench/push.py from kernels.yml: name, source,
options, requires) with the library's compile options and `-I KERNELS`, the same builds deploy's agent
makes, and writes each binary (CL_PROGRAM_BINARIES) to OUT/<name>.bin. Prints the seconds it spent building.
"""
import ctypes
import json
import os
import sys
import time

KERNELS, OUT = os.path.abspath(sys.argv[1]), sys.argv[2]
p, i32, u32, sz = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32, ctypes.c_size_t
cl = ctypes.CDLL("libOpenCL.so.1")
for name, res, args in [("clCreateContext", p, [p, u32, p, p, p, p]),
                        ("clCreateProgramWithSource", p, [p, u32, p, p, p]),
                        ("clBuildProgram", i32, [p, u32, p, ctypes.c_char_p, p, p]),
                        ("clGetProgramInfo", i32, [p, u32, sz, p, p]),
                        ("clGetDeviceInfo", i32, [p, u32, sz, p, p]), ("clReleaseProgram", i32, [p])]:
    getattr(cl, name).restype, getattr(cl, name).argtypes = res, args
start = time.perf_counter()
platform, device, err = p(), p(), i32()
assert cl.clGetPlatformIDs(1, ctypes.byref(platform), None) == 0
assert cl.clGetDeviceIDs(platform, 0xFFFFFFFF, 1, ctypes.byref(device), None) == 0
ext = ctypes.create_string_buffer(8192)
cl.clGetDeviceInfo(device, 0x1030, 8192, ext, None)  # CL_DEVICE_EXTENSIONS
context = cl.clCreateContext(None, 1, ctypes.byref(device), None, None, ctypes.byref(err))
spec = json.load(open(os.path.join(KERNELS, "programs.json")))
os.makedirs(OUT, exist_ok=True)
built = 0
for prog in spec["programs"]:
    if any(r.encode() not in ext.value.split() for r in prog["requires"]):
        continue  # e.g. cl_khr_fp16 on PoCL: deploy skips these too
    src = open(os.path.join(KERNELS, prog["source"]), "rb").read()
    text, length = ctypes.c_char_p(src), sz(len(src))
    program = cl.clCreateProgramWithSource(context, 1, ctypes.byref(text), ctypes.byref(length), ctypes.byref(err))
    options = " ".join(prog["options"] + spec["compile_options"] + ["-I", KERNELS]).encode()
    code = cl.clBuildProgram(program, 1, ctypes.byref(device), options, None, None)
    if code != 0:
        sys.exit("build of %s failed: %d" % (prog["name"], code))
    size = sz()
    cl.clGetProgramInfo(program, 0x1165, ctypes.sizeof(size), ctypes.byref(size), None)
    buf = ctypes.create_string_buffer(size.value)
    pointers = (p * 1)(ctypes.addressof(buf))
    cl.clGetProgramInfo(program, 0x1166, ctypes.sizeof(pointers), pointers, None)
    with open(os.path.join(OUT, prog["name"] + ".bin"), "wb") as f:
        f.write(buf.raw)
    cl.clReleaseProgram(program)
    built += 1
print("compile_s %.3f built %d" % (time.perf_counter() - start, built))
