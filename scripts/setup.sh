#!/usr/bin/env bash
# Creates .venv beside the repository (if missing) and installs nonlocalnet into it with its test extras.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.nonlocalnet-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing nonlocalnet and its dependencies (torch, torchvision, ...) into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install --quiet -e ".[test]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import nonlocalnet, torch, torchvision.ops" # fails loudly if the install did not work
  echo "$want" > "$stamp"
fi
