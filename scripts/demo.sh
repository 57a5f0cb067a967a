#!/usr/bin/env bash
# The demo on the built-in data, set-up included (nox's `demo` session through scripts/nox.sh): trains a C2D
# baseline and the same network with a non-local block of each of the paper's four instantiations, and prints /
# saves the comparison (a miniature of Table 2(a)) under outputs/demo.
# Extra arguments go to `nonlocalnet demo` (see `nonlocalnet demo --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec bash "$root/scripts/nox.sh" -s demo -- "$@"
