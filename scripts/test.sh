#!/usr/bin/env bash
# The test suite. By default the quick tests (no `slow` marker), on 2 worker processes:
#   bash scripts/test.sh                 # quick tests
#   bash scripts/test.sh -m slow         # slow tests: export, compile, multi-process, end-to-end training
#   bash scripts/test.sh -m ""           # everything
#   NONLOCALNET_TORCH=lowest bash scripts/test.sh    # on the lowest declared torch (newest: the newest)
# Other arguments go to pytest.
set -euo pipefail
NONLOCALNET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$NONLOCALNET_ROOT/scripts/_env.sh"
nonlocalnet_env "${NONLOCALNET_TORCH:-default}"
cd "$NONLOCALNET_ROOT"
marker=(-m "not slow")
for arg in "$@"; do
  if [ "$arg" = "-m" ] || [[ "$arg" == -m* ]]; then marker=(); fi
done
exec "$VENV/bin/python" -m pytest -n "${NONLOCALNET_TEST_WORKERS:-2}" "${marker[@]}" "$@"
