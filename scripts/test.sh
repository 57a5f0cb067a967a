#!/usr/bin/env bash
# The test suite. By default the quick tests (no `slow` marker), on 2 worker processes:
#   bash scripts/test.sh                 # quick tests
#   bash scripts/test.sh -m slow         # slow tests: export, compile, multi-process, end-to-end training
#   bash scripts/test.sh -m ""           # everything
# Other arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
marker=(-m "not slow")
for arg in "$@"; do
  if [ "$arg" = "-m" ] || [[ "$arg" == -m* ]]; then marker=(); fi
done
exec .venv/bin/python -m pytest -n "${NONLOCALNET_TEST_WORKERS:-2}" "${marker[@]}" "$@"
