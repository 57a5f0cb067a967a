#!/usr/bin/env bash
# The test suite, set-up included (nox's `tests` session through scripts/nox.sh). By default the quick tests (no
# `slow` marker), on 2 worker processes (NONLOCALNET_TEST_WORKERS):
#   bash scripts/test.sh                 # quick tests
#   bash scripts/test.sh -m slow         # slow tests: export, compile, multi-process, end-to-end training
#   bash scripts/test.sh -m ""           # everything
#   NONLOCALNET_TORCH=lowest bash scripts/test.sh    # on the lowest declared torch (newest: the newest), the
#                                                    # sessions tests-lowest and tests-newest
# Other arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${NONLOCALNET_TORCH:-default}" in
  default) session=tests ;;
  lowest|newest) session="tests-$NONLOCALNET_TORCH" ;;
  *) echo "error: unknown NONLOCALNET_TORCH '$NONLOCALNET_TORCH': expected default, lowest or newest" >&2; exit 2 ;;
esac
exec bash "$root/scripts/nox.sh" -s "$session" -- "$@"
