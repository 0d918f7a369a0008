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
echo "== ruff" && "$bin/ruff" check .
echo "== mypy" && "$bin/mypy" deployer tests
echo "== vermin" && "$bin/vermin" -q -t=3.6- --no-tips --violations --eval-annotations deployer/remote tests/hooks
echo "== lint-imports" && "$bin/lint-imports" --no-cache | tail -n 3
# libmace once per run, before the suite (built only when absent or out of date; the tests reuse it). Without
# its sources, or when it does not build, the tests that need it skip with the reason, or fail under
# DEPLOYER_REQUIRE_MACE=1 (.ci/run), which also stops here.
echo "== libmace" && { bash scripts/build_mace.sh || [[ "${DEPLOYER_REQUIRE_MACE:-}" != 1 ]]; }
echo "== pytest" && exec "$bin/python" -m pytest -q "$@"
