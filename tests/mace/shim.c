/* Test-only OpenCL shim (built by scripts/build_mace.sh as libOpenCL.so).
 *
 * MACE selects only GPU devices and names (for its cache) only Adreno, Mali and PowerVR GPUs; PoCL's device
 * is a CPU. Loaded in place of the ICD loader (first on LD_LIBRARY_PATH for MACE, which dlopens
 * "libOpenCL.so"; inventory `opencl.library` for deployer's agent), this library forwards every call to
 * libOpenCL.so.1 (it is linked against it, so dlsym on this library finds every other symbol there) and
 * changes only what it says about the device:
 *   - CL_DEVICE_TYPE answers GPU, and clGetDeviceIDs for GPU devices lists every device;
 *   - CL_DEVICE_NAME gets the prefix "PowerVR " (a name MACE keeps; it changes nothing else in MACE), or
 *     OPENCL_SHIM_NAME_PREFIX when set ("" : a GPU MACE cannot name);
 *   - with OPENCL_SHIM_PLATFORM_VERSION set, CL_PLATFORM_VERSION answers that text instead (a driver
 *     without commas in its version, or a driver upgrade, without another driver);
 *   - with OPENCL_SHIM_DEVICE_VERSION set, CL_DEVICE_VERSION answers that text.
 * (Named OPENCL_*: the agent's driver stamp covers such variables, so a change re-fingerprints the board.)
 * Both the probe and the agent see the same device through it. Never shipped: tests only.
 */
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#define NAME_PREFIX "PowerVR "

static void *real(const char *name) {
  static void *lib;
  if (!lib) lib = dlopen("libOpenCL.so.1", RTLD_NOW | RTLD_LOCAL);
  return lib ? dlsym(lib, name) : NULL;
}

static cl_int answer(const char *text, size_t size, void *value, size_t *size_ret) {
  size_t need = strlen(text) + 1;
  if (size_ret) *size_ret = need;
  if (value) {
    if (size < need) return CL_INVALID_VALUE;
    memcpy(value, text, need);
  }
  return CL_SUCCESS;
}

typedef cl_int (*get_ids_fn)(cl_platform_id, cl_device_type, cl_uint, cl_device_id *, cl_uint *);
typedef cl_int (*get_info_fn)(void *, cl_uint, size_t, void *, size_t *);

cl_int clGetDeviceIDs(cl_platform_id platform, cl_device_type type, cl_uint num, cl_device_id *devices,
                      cl_uint *num_ret) {
  get_ids_fn fn = (get_ids_fn)real("clGetDeviceIDs");
  if (!fn) return CL_DEVICE_NOT_FOUND;
  if (type & CL_DEVICE_TYPE_GPU) type = CL_DEVICE_TYPE_ALL;
  return fn(platform, type, num, devices, num_ret);
}

cl_int clGetDeviceInfo(cl_device_id device, cl_device_info param, size_t size, void *value, size_t *size_ret) {
  get_info_fn fn = (get_info_fn)real("clGetDeviceInfo");
  if (!fn) return CL_INVALID_DEVICE;
  if (param == CL_DEVICE_TYPE) {
    cl_device_type gpu = CL_DEVICE_TYPE_GPU;
    if (size_ret) *size_ret = sizeof(gpu);
    if (value) {
      if (size < sizeof(gpu)) return CL_INVALID_VALUE;
      memcpy(value, &gpu, sizeof(gpu));
    }
    return CL_SUCCESS;
  }
  if (param == CL_DEVICE_VERSION && getenv("OPENCL_SHIM_DEVICE_VERSION")) {
    return answer(getenv("OPENCL_SHIM_DEVICE_VERSION"), size, value, size_ret);
  }
  if (param == CL_DEVICE_NAME) {
    const char *prefix = getenv("OPENCL_SHIM_NAME_PREFIX") ? getenv("OPENCL_SHIM_NAME_PREFIX") : NAME_PREFIX;
    char name[512];
    size_t have = 0, skip = strlen(prefix) < 256 ? strlen(prefix) : 256;
    memcpy(name, prefix, skip);
    cl_int err = fn(device, param, sizeof(name) - skip, name + skip, &have);
    if (err != CL_SUCCESS) return err;
    return answer(name, size, value, size_ret);
  }
  return fn(device, param, size, value, size_ret);
}

cl_int clGetPlatformInfo(cl_platform_id platform, cl_platform_info param, size_t size, void *value,
                         size_t *size_ret) {
  get_info_fn fn = (get_info_fn)real("clGetPlatformInfo");
  if (!fn) return CL_INVALID_PLATFORM;
  if (param == CL_PLATFORM_VERSION && getenv("OPENCL_SHIM_PLATFORM_VERSION")) {
    return answer(getenv("OPENCL_SHIM_PLATFORM_VERSION"), size, value, size_ret);
  }
  return fn(platform, param, size, value, size_ret);
}
