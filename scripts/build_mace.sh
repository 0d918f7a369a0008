#!/usr/bin/env bash
# Builds a real MACE runtime for the tests that prove deployer's cache files (tests/test_mace_runtime.py):
#   libmace_static.a with OpenCL (from a patched COPY of ../shared/third_party, never the original),
#   the project's probe (tests/mace/probe.cc: a small net of MACE ops run on the OpenCL runtime), and a
#   test-only OpenCL shim (tests/mace/shim.c: PoCL's CPU device answered as a PowerVR GPU, see docs/mace.md).
#
#   bash scripts/build_mace.sh [OUT]     OUT defaults to .build/mace (git-ignored)
#   bash scripts/build_mace.sh --app-kernels DIR DEST [OUT]
#       the probe as an app whose libmace embeds the OpenCL kernels of DIR (a changed copy of MACE's
#       mace/ops/opencl/cl): MACE's code generator runs on DIR, and its one object file is linked ahead of
#       OUT's libmace_static.a (seconds, not a rebuild of libmace)
#
# Builds only what is absent or out of date (a stamp of the inputs' names, sizes and mtimes), so CI runs it
# once per run and every later call returns at once. Exit 0: OUT/probe, OUT/shim/libOpenCL.so are ready;
# 4: the MACE sources are absent (a user's clone; the tests skip, or fail under DEPLOYER_REQUIRE_MACE=1);
# anything else: the build failed (OUT/build.log says why).
# Packages (scripts/install.sh --test installs them): cmake g++ make libprotobuf-dev protobuf-compiler
# libgflags-dev ocl-icd-opencl-dev python3-jinja2.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
app_kernels=""
if [[ "${1:-}" == "--app-kernels" ]]; then
  app_kernels="$(realpath "$2")" app_dest="$(realpath -m "$3")"
  shift 3
fi
out="$(realpath -m "${1:-$repo/.build/mace}")"
third="${DEPLOYER_MACE_SOURCES:-$repo/../shared/third_party}"
if [[ ! -f "$third/mace/CMakeLists.txt" ]]; then
  echo "build_mace: no MACE sources at $third/mace (they come with ../shared/third_party)" >&2
  exit 4
fi
third="$(realpath "$third")"
jobs="${DEPLOYER_MACE_JOBS:-$(nproc)}"
multiarch="$(gcc -print-multiarch)"
libdir="/usr/lib/$multiarch"
mkdir -p "$out"
log="$out/build.log"
exec 9>"$out/.lock"
flock 9  # one build at a time (parallel test workers, two checkouts sharing a build folder)

inputs_stamp() {  # names, sizes and mtimes of everything a step depends on: cheap, and changes with any edit
  find "$@" -type f -printf '%p %s %T@\n' | LC_ALL=C sort | sha256sum | cut -c1-64
}

# 1. libmace, from a copy with two build-file changes, (a) and (b) below (docs/mace.md, section 7). RECIPE names this
#    step's commands: change it with them (not with the rest of this script, which would rebuild for nothing).
RECIPE=1
lib_stamp="recipe $RECIPE $(inputs_stamp "$third")"
lib="$out/build/mace/libmace/libmace_static.a"
if [[ ! -f "$lib" || "$(cat "$out/libmace.stamp" 2>/dev/null)" != "$lib_stamp" ]]; then
  echo "build_mace: building libmace with OpenCL in $out (a few minutes; log: $log)" >&2
  rm -rf "$out/src" "$out/build" "$out/libmace.stamp"
  mkdir -p "$out/src" "$out/build" "$out/bin"
  cp -a "$third/mace" "$third/opencl-headers" "$third/opencl-clhpp" "$third/half" "$out/src/"
  src="$out/src/mace"
  # (a) every third-party dependency from local copies instead of downloads
  mkdir -p "$out/src/clhpp/CL"
  cp "$out/src/opencl-clhpp/input_cl2.hpp" "$out/src/clhpp/CL/cl2.hpp"
  cat > "$src/third_party/third_party.cmake" <<EOF
# Replaced by deployer's scripts/build_mace.sh: local copies, no downloads.
set(MACE_THIRD_PARTY_DIR "\${PROJECT_BINARY_DIR}/third_party" CACHE STRING "unused")
include_directories(SYSTEM "$out/src/opencl-headers/opencl20" "$out/src/clhpp" "$out/src/half")
set(PROTOC_BIN protoc CACHE FILEPATH "protoc compiler." FORCE)
add_custom_target(protoc_bin)
add_custom_target(protobuf)
add_custom_target(opencl_headers)
add_custom_target(opencl_clhpp)
add_custom_target(half)
add_library(libprotobuf_lite STATIC IMPORTED GLOBAL)
set_property(TARGET libprotobuf_lite PROPERTY IMPORTED_LOCATION "$libdir/libprotobuf-lite.a")
add_library(gflags STATIC IMPORTED GLOBAL)
set_property(TARGET gflags PROPERTY IMPORTED_LOCATION "$libdir/libgflags.a")
EOF
  # (b) the static library bundles Debian's libprotobuf-lite.a, not the one of a protobuf build
  sed -i "s|@BASE_PATH@/third_party/protobuf/src/protobuf-build/libprotobuf-lite.a|$libdir/libprotobuf-lite.a|" \
    "$src/mace/libmace/mace.mri.in"
  mkdir -p "$src/tools/python/py_proto"
  ln -sf /usr/bin/python3 "$out/bin/python"  # the kernel code generator runs `python` (needs jinja2)
  start=$(date +%s)
  (
    cd "$out/build"
    # Outside a git tree of MACE's own, MaceVersion() is "unknown": GIT_DIR keeps the worktree around
    # the build folder from answering `git describe` instead.
    export PATH="$out/bin:$PATH" GIT_DIR=/nonexistent
    cmake "$src" -DMACE_ENABLE_OPENCL=ON -DMACE_ENABLE_NEON=OFF -DMACE_ENABLE_QUANTIZE=OFF -DMACE_ENABLE_TESTS=OFF \
      -DMACE_ENABLE_BENCHMARKS=OFF -DMACE_ENABLE_CCACHE=OFF -DMACE_CC_FLAGS=-Wno-error=deprecated-declarations
    make -j"$jobs" combined
  ) >"$log" 2>&1 || { echo "build_mace: libmace build failed, last lines of $log:" >&2; tail -n 30 "$log" >&2; exit 1; }
  echo "libmace built in $(( $(date +%s) - start )) s" | tee -a "$log" >&2
  echo "$lib_stamp" > "$out/libmace.stamp"
fi

# 2. the probe and the shim (seconds)
tool_stamp="$(inputs_stamp "$repo/tests/mace" "$repo/scripts/build_mace.sh" "$lib")"
if [[ ! -x "$out/probe" || ! -f "$out/shim/libOpenCL.so" || "$(cat "$out/tools.stamp" 2>/dev/null)" != "$tool_stamp" ]]; then
  rm -f "$out/tools.stamp"
  mkdir -p "$out/shim"
  gcc -O1 -Wall -Werror -shared -fPIC -I"$out/src/opencl-headers/opencl12" -o "$out/shim/libOpenCL.so" \
    "$repo/tests/mace/shim.c" -Wl,--no-as-needed -l:libOpenCL.so.1 -ldl \
    || { echo "build_mace: the OpenCL shim did not build" >&2; exit 1; }
  g++ -O0 -std=c++11 -Wall -Werror -Wno-deprecated-declarations -I"$out/src/mace/include" -I"$out/build" -I"$out/src/mace" \
    -o "$out/probe" "$repo/tests/mace/probe.cc" \
    "$lib" -ldl -pthread \
    || { echo "build_mace: the probe did not build" >&2; exit 1; }
  echo "$tool_stamp" > "$out/tools.stamp"
fi

# 3. --app-kernels: the same probe against other kernel sources
if [[ -n "$app_kernels" ]]; then
  gen="$(mktemp -d)"
  trap 'rm -rf "$gen"' EXIT
  /usr/bin/python3 "$out/src/mace/mace/python/tools/encrypt_opencl_codegen.py" --cl_kernel_dir="$app_kernels/" \
    --output_path="$gen/mace/codegen/opencl/encrypt_opencl_kernel.cc" >/dev/null \
    || { echo "build_mace: MACE's kernel code generator failed on $app_kernels" >&2; exit 1; }
  g++ -O0 -std=c++11 -w -I"$gen" -I"$out/src/mace" -c -o "$gen/kernels.o" \
    "$gen/mace/codegen/opencl/encrypt_opencl_kernel.cc"
  g++ -O0 -std=c++11 -Wall -Werror -Wno-deprecated-declarations -I"$out/src/mace/include" -I"$out/build" \
    -I"$out/src/mace" -o "$app_dest" "$repo/tests/mace/probe.cc" "$gen/kernels.o" "$lib" -ldl -pthread \
    || { echo "build_mace: the probe with the kernels of $app_kernels did not link" >&2; exit 1; }
  echo "$app_dest"
  exit 0
fi
echo "$out"
