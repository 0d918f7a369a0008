#!/usr/bin/env bash
# What bench/push.py needs beyond the project's venv: ansible-core and pyinfra in bench/.venv (pip), and
# Debian's rsync, openssh-client and util-linux (taskset), installed with apt only when missing. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"

missing=()
command -v rsync >/dev/null || missing+=(rsync)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v taskset >/dev/null || missing+=(util-linux)
if ((${#missing[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x "$here/.venv/bin/python" ]; then
    "$python" -m venv "$here/.venv"
fi
if ! "$here/.venv/bin/python" -c 'import ansible, pyinfra' 2>/dev/null; then
    "$here/.venv/bin/pip" install -q --disable-pip-version-check 'ansible-core>=2.15' 'pyinfra>=3,<4'
fi
"$here/.venv/bin/python" -c 'import ansible.release, importlib.metadata as m
print("ansible-core", ansible.release.__version__, "pyinfra", m.version("pyinfra"))'
