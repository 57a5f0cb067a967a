#!/usr/bin/env bash
# Runs nox (the project's sessions: noxfile.py, `bash scripts/nox.sh --list`) from plain Python and pip: nox lives in
# a small virtual environment of its own, created on first use in the cache beside the sessions' environments
# ($NONLOCALNET_CACHE, default ~/.cache/nonlocalnet), one per Python version. The interpreter: PYTHON, else python3.
# Arguments go to nox:
#   bash scripts/nox.sh -s tests -- -k block     # a session, with arguments for it after --
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
cache="${NONLOCALNET_CACHE:-$HOME/.cache/nonlocalnet}"
runner="$cache/nox-runner-$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if ! "$runner/bin/python" -c 'import nox' 2>/dev/null; then
  echo "[nox.sh] installing nox into $runner" >&2
  mkdir -p "$cache"
  building="$(mktemp -d "$runner.building.XXXXXX")"
  "$python" -m venv "$building"
  "$building/bin/python" -m pip install --quiet --disable-pip-version-check "nox>=2025" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
  # a venv moved whole keeps working through `bin/python -m` (only its scripts' shebangs name the old place):
  # whichever concurrent first run finishes first wins, the others drop theirs
  mv -T "$building" "$runner" 2>/dev/null || rm -rf "$building"
fi
cd "$root"
exec "$runner/bin/python" -m nox --noxfile "$root/noxfile.py" "$@"
