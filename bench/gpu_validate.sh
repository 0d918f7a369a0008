#!/usr/bin/env bash
# NVIDIA OpenCL beside PoCL on the accelerator machine (issue 8). From the repo root there:
#   bash bench/gpu_validate.sh OUT_DIR
# Wheels for that machine's Python (3.12, no network) are carried in .whl/ (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# The machine registers only PoCL; our own vendors folder adds NVIDIA's ICD beside it.
vendors=$(mktemp -d)
echo libnvidia-opencl.so.1 > "$vendors/nvidia.icd"
cp /etc/OpenCL/vendors/pocl.icd "$vendors/" 2>/dev/null || true
export OCL_ICD_VENDORS=$vendors
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 - <<'PY'
import pyopencl as cl
for p in cl.get_platforms():
    print("platform:", p.name, "|", p.version, "|", [d.name for d in p.get_devices()])
PY
python3 bench/gpu_validate.py --out "$out"
