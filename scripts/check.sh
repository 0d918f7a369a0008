#!/usr/bin/env bash
# What CI runs after `scripts/install.sh --test`: the checks a review would make, then the whole suite.
#   ruff         lint of everything (the board's code keeps 3.6 syntax: per-file ignores in pyproject.toml)
#   mypy         strict on the controller packages and the tests; deployer.remote (Python 3.6 code with type
#                comments) at check_untyped_defs: every body is checked, annotations are not required
#   vermin       deployer.remote and the test hook it loads run on Python >= 3.6
#   lint-imports the package layers and the board program's stdlib-only contract (pyproject.toml)
#   libmace      a real MACE runtime for the cache proof (scripts/build_mace.sh; skipped without its sources)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
# libmace once per run (built only when absent or out of date; the tests reuse it). It builds in the
# background at the lowest CPU priority while the lints and the suite run: it takes only the CPU they leave
# idle (the suite waits on timeouts and boards much of the time), and the MACE tests, which come later,
# wait for it (the script holds a lock while it builds). Without its sources, or when it does not build,
# those tests skip with the reason, or fail under DEPLOYER_REQUIRE_MACE=1 (.ci/run), which fails here too.
mkdir -p .build
echo "== libmace: building in the background (log: .build/build_mace.out)"
nice -n 19 bash scripts/build_mace.sh >.build/build_mace.out 2>&1 &
build=$!
trap 'kill "$build" 2>/dev/null || true' EXIT
echo "== ruff" && "$bin/ruff" check .
echo "== mypy" && "$bin/mypy" deployer tests
echo "== vermin" && "$bin/vermin" -q -t=3.6- --no-tips --violations --eval-annotations deployer/remote tests/hooks
echo "== lint-imports" && "$bin/lint-imports" --no-cache | tail -n 3
echo "== pytest" && { "$bin/python" -m pytest -q "$@" && tests=0 || tests=$?; }
built=0 && wait "$build" || built=$?
echo "== libmace: $(tail -n 1 .build/build_mace.out 2>/dev/null || echo 'no output') (exit $built)"
if [[ $built -ne 0 && "${DEPLOYER_REQUIRE_MACE:-}" == 1 ]]; then
  echo "libmace did not build and DEPLOYER_REQUIRE_MACE=1" >&2
  exit 1
fi
exit "$tests"
