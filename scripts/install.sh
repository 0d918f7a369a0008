#!/usr/bin/env bash
# Installs deployer on Debian 12 as root: the system packages it drives, and a virtualenv in .venv.
#   bash scripts/install.sh          what `deploy` and its simulated fleet need
#   bash scripts/install.sh --test   the same, plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  python3 python3-venv python3-pip       # the controller (Debian's python3 is 3.11)
  openssh-server openssh-client          # simulated devices are real sshd servers
  dropbear-bin                           # ... or real dropbear servers (deploy sim up --server dropbear)
  ocl-icd-libopencl1 pocl-opencl-icd     # OpenCL: the ICD loader and PoCL 3.1 (not PyPI's pocl, see README)
  util-linux iproute2                    # unshare, nsenter, ip netns, veth and tc tbf for the simulated fleet
)
extra=()
if [[ "${1:-}" == "--test" ]]; then
  packages+=(protobuf-compiler)          # protoc decodes every written cache file in the tests
  packages+=(systemd)                    # systemd-analyze verify checks contrib/systemd's units (no running systemd)
  packages+=(chromium chromium-driver)   # report.html is opened in a real headless browser (selenium)
  packages+=(cmake g++ make libprotobuf-dev libgflags-dev ocl-icd-opencl-dev python3-jinja2)
                                         # a real libmace for the cache proof (scripts/build_mace.sh)
  extra=(".[test]")
else
  extra=(".")
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e "${extra[@]}"
echo "deploy installed in .venv (run .venv/bin/deploy --help)"
