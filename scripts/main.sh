#!/usr/bin/env bash
# The main job on the built-in data: trains a C2D baseline and the same network with a non-local block of
# each of the paper's four instantiations, and prints / saves the comparison (a miniature of Table 2(a)).
# Extra arguments go to `nonlocalnet compare` (see `nonlocalnet compare --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/nonlocalnet compare --out outputs/compare "$@"
