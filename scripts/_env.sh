# Sourced by setup.sh, main.sh and test.sh: `nonlocalnet_env KIND` creates (or reuses) the environment of KIND
# and sets VENV to it.
#   default  .venv beside the checkout, with whatever torch this machine's pip installs for pyproject.toml
#            (the README's commands use it)
#   lowest   the lowest torch / torchvision pair declared (requirements/torch-lowest.txt)
#   newest   the newest torch / torchvision the registry serves, past any cap in the machine's pip config, with
#            the peers the comparison tests run against (the "bench" extra: mmcv-lite, mmengine, timm,
#            pytorchvideo), so that CI runs those tests too
# lowest and newest live in a cache (NONLOCALNET_ENVS, default ~/.cache/nonlocalnet/envs) keyed by the
# requirements, so that fresh clones reuse them: a new one is built only when pyproject.toml's dependencies,
# the pins or (for newest) the newest release change. The checkout itself is installed into it (editable, no
# dependencies) on every use, a few seconds.

nonlocalnet_log() { echo "[setup] $*" >&2; }

# the lines of pyproject.toml that decide what gets installed
nonlocalnet_requirements() {
  sed -n '/^requires-python/p;/^dependencies = \[/,/^\]/p;/^test = /p;/^bench = /p' "$NONLOCALNET_ROOT/pyproject.toml"
}

# newest release of a package on the registry, past the machine's cap ("" if the registry cannot be asked)
nonlocalnet_newest() {
  PIP_CONSTRAINT=/dev/null "$NONLOCALNET_PYTHON" -m pip index versions "$1" 2>/dev/null \
    | sed -n "s/^$1 (\(.*\))$/\1/p" | head -1
}

nonlocalnet_pip() {  # quiet pip, minus the notes about file:// index locations some machines configure
  # (setuptools notes every editable install with a warning that says nothing about this project)
  PYTHONWARNINGS="ignore:Editable installation" "$VENV/bin/python" -m pip --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
  return "${PIPESTATUS[0]}"
}

nonlocalnet_env() {
  local kind="$1" pins="" key dir stamp extras="test"
  NONLOCALNET_PYTHON="${PYTHON:-python3}"
  case "$kind" in
    default) ;;
    lowest) pins="$(grep -v '^#' "$NONLOCALNET_ROOT/requirements/torch-lowest.txt")" ;;
    newest)
      extras="test,bench"
      local torch vision
      torch="$(nonlocalnet_newest torch)"; vision="$(nonlocalnet_newest torchvision)"
      if [ -n "$torch" ] && [ -n "$vision" ]; then
        pins="torch==$torch"$'\n'"torchvision==$vision"
      else
        nonlocalnet_log "the registry did not answer; reusing the newest environment there is"
        pins="$(cat "$(ls -td "${NONLOCALNET_ENVS:-$HOME/.cache/nonlocalnet/envs}"/newest-*/ 2>/dev/null \
                       | head -1)pins.txt" 2>/dev/null || true)"
        [ -n "$pins" ] || { echo "error: no newest environment yet and the registry did not answer" >&2; return 2; }
      fi ;;
    *) echo "error: unknown environment '$kind' (NONLOCALNET_TORCH): expected default, lowest or newest" >&2
       return 2 ;;
  esac
  if [ "$kind" = default ]; then
    # the checkout's own environment follows every change of pyproject.toml (entry points, package data too)
    key="$({ "$NONLOCALNET_PYTHON" --version; cat "$NONLOCALNET_ROOT/pyproject.toml"; } | sha256sum | cut -c1-16)"
    VENV="$NONLOCALNET_ROOT/.venv"
  else
    key="$({ "$NONLOCALNET_PYTHON" --version; nonlocalnet_requirements; echo "$pins $extras"; } | sha256sum \
           | cut -c1-16)"
    local envs="${NONLOCALNET_ENVS:-$HOME/.cache/nonlocalnet/envs}"
    VENV="$envs/$kind-$key"
  fi
  stamp="$VENV/.nonlocalnet-requirements"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ]; then
    if [ "$kind" != default ]; then
      rm -rf "$VENV" "$(dirname "$VENV")/$kind-"*  # a half-built one, or one for older requirements
    fi
    if [ ! -x "$VENV/bin/python" ]; then
      nonlocalnet_log "creating $VENV with $("$NONLOCALNET_PYTHON" --version)"
      mkdir -p "$(dirname "$VENV")"
      "$NONLOCALNET_PYTHON" -m venv "$VENV"
    fi
    nonlocalnet_log "installing nonlocalnet's dependencies (torch, torchvision, ...) into $VENV${pins:+ with }$(echo $pins)"
    nonlocalnet_pip install --upgrade pip
    if [ -n "$pins" ]; then
      echo "$pins" > "$VENV/pins.txt"
      # the pins are the point of this environment: a cap in the machine's pip config does not apply to it
      PIP_CONSTRAINT="$VENV/pins.txt" nonlocalnet_pip install -e "$NONLOCALNET_ROOT[$extras]"
    else
      nonlocalnet_pip install -e "$NONLOCALNET_ROOT[$extras]"
    fi
    "$VENV/bin/python" -c "import nonlocalnet, torch, torchvision.ops" || return 1  # loudly, if it did not work
    echo "$key" > "$stamp"
  elif [ "$kind" != default ]; then
    # a cached environment serves many checkouts: point it at this one
    nonlocalnet_pip install --no-deps -e "$NONLOCALNET_ROOT"
  fi
  nonlocalnet_log "$kind environment: $("$VENV/bin/python" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")')"
}
