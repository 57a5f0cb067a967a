#!/usr/bin/env bash
# Creates the environment nonlocalnet runs in (if missing or out of date) and installs nonlocalnet into it with
# its test extras. Re-running is cheap: nothing is installed while the requirements are unchanged.
#   bash scripts/setup.sh            # .venv beside the checkout, the torch this machine's pip installs
#   bash scripts/setup.sh lowest     # the lowest declared torch / torchvision (a cached environment)
#   bash scripts/setup.sh newest     # the newest the registry serves (a cached environment)
# (NONLOCALNET_TORCH=lowest|newest does the same for setup.sh, main.sh and test.sh.)
set -euo pipefail
NONLOCALNET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$NONLOCALNET_ROOT/scripts/_env.sh"
nonlocalnet_env "${1:-${NONLOCALNET_TORCH:-default}}"
