#!/usr/bin/env bash
# The longer run of bench/push.py: N = 32 devices at RTT 40 ms. The floor and the no-op re-push three times
# each, and one cold deploy push first (it also primes the devices for the no-op; 32 x 16 builds on one core
# take minutes, so the other tools' cold runs are left to the N = 8 runs). Peak RSS of every deploy run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-.venv/bin/python}"
exec "$python" bench/push.py --devices 32 --scenarios rtt40 --tools floor,deploy --reps 3 --cold-reps 1 \
    --no-help-check "$@"
