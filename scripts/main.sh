#!/usr/bin/env bash
# The main job on the built-in data: trains a C2D baseline and the same network with a non-local block of
# each of the paper's four instantiations, and prints / saves the comparison (a miniature of Table 2(a)).
# Extra arguments go to `nonlocalnet compare` (see `nonlocalnet compare --help`).
set -euo pipefail
NONLOCALNET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$NONLOCALNET_ROOT/scripts/_env.sh"
nonlocalnet_env "${NONLOCALNET_TORCH:-default}"
cd "$NONLOCALNET_ROOT"
exec "$VENV/bin/nonlocalnet" compare --out outputs/compare "$@"
