# Sourced by setup.sh, main.sh and test.sh: `nonlocalnet_env KIND` creates (or reuses) the environment of KIND
# and sets VENV to it.
#   default  .venv beside the checkout, with whatever torch this machine's pip installs for pyproject.toml
#            (the README's commands use it)
#   lowest   the lowest torch / torchvision pair declared (requirements/torch-lowest.txt)
#   newest   the newest torch / torchvision the registry serves, past any cap in the machine's pip config, with
#            the peers the comparison and conversion tests run against (the "bench" extra: mmcv-lite, mmengine, timm,
#            pytorchvideo; mmaction2 without its dependencies, requirements/peers-no-deps.txt), so that CI runs
#            those tests too, and torchcodec 0.N for torch 2.N (the data.decoder=torchcodec tests; it also needs
#            FFmpeg's shared libraries on the system, which .ci/run installs from Debian)
# lowest and newest live in a cache (NONLOCALNET_ENVS, default ~/.cache/nonlocalnet/envs) keyed by the
# requirements, so that fresh clones reuse them: a new one is built only when pyproject.toml's dependencies,
# the pins or (for newest) the newest release change, and the old one is removed once the new one works. Each
# use points it at the calling checkout (an editable install without dependencies, when it points elsewhere).
# Builds and re-points take a lock (flock) on the cache folder.

nonlocalnet_log() { echo "[setup] $*" >&2; }

# the lines of pyproject.toml that decide what gets installed
nonlocalnet_requirements() {
  sed -n '/^requires-python/p;/^dependencies = \[/,/^\]/p;/^test = /p;/^bench = /p' "$NONLOCALNET_ROOT/pyproject.toml"
  grep -v '^#' "$NONLOCALNET_ROOT/requirements/peers-no-deps.txt"
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
  local kind="$1" pins="" key stamp extras="test" envs="${NONLOCALNET_ENVS:-$HOME/.cache/nonlocalnet/envs}"
  NONLOCALNET_PYTHON="${PYTHON:-python3}"
  case "$kind" in
    default) ;;
    lowest)
      pins="$(grep -v '^#' "$NONLOCALNET_ROOT/requirements/torch-lowest.txt")"
      if ! "$NONLOCALNET_PYTHON" -c 'import sys; sys.exit(sys.version_info >= (3, 13))'; then
        echo "error: the lowest torch ($(echo $pins)) has no wheels for $("$NONLOCALNET_PYTHON" --version);" \
             "run it with PYTHON=python3.12 (or older)" >&2
        return 2
      fi ;;
    newest)
      extras="test,bench"
      local torch vision
      torch="$(nonlocalnet_newest torch || true)"; vision="$(nonlocalnet_newest torchvision || true)"
      if [ -n "$torch" ] && [ -n "$vision" ]; then
        # torchvision pinned, torch the newest that it accepts (a torch released before its torchvision would
        # make both pins impossible); the key below still changes with either release
        pins="torchvision==$vision"
        key="torch $torch"
      else
        local previous
        previous="$(ls -td "$envs"/newest-*/ 2>/dev/null | head -1 || true)"
        [ -n "$previous" ] && [ -f "${previous}.nonlocalnet-requirements" ] || {
          echo "error: the registry did not answer and there is no newest environment yet in $envs" >&2; return 2; }
        nonlocalnet_log "the registry did not answer; reusing ${previous%/}"
        VENV="${previous%/}"
        nonlocalnet_point_at_checkout "$envs"
        return
      fi ;;
    *) echo "error: unknown environment '$kind' (NONLOCALNET_TORCH): expected default, lowest or newest" >&2
       return 2 ;;
  esac
  if [ "$kind" = default ]; then
    # the checkout's own environment follows every change of pyproject.toml (entry points, package data too)
    key="$({ "$NONLOCALNET_PYTHON" --version; cat "$NONLOCALNET_ROOT/pyproject.toml"; } | sha256sum | cut -c1-16)"
    VENV="$NONLOCALNET_ROOT/.venv"
  else
    [ "$kind" = newest ] && key="${key:-} torchcodec"
    key="$({ "$NONLOCALNET_PYTHON" --version; nonlocalnet_requirements; echo "$pins $extras ${key:-}"; } \
           | sha256sum | cut -c1-16)"
    VENV="$envs/$kind-$key"
    mkdir -p "$envs"
    exec {NONLOCALNET_LOCK}>"$envs/.lock"
    flock "$NONLOCALNET_LOCK"  # one build or re-point of the shared environments at a time
  fi
  stamp="$VENV/.nonlocalnet-requirements"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ]; then
    [ "$kind" = default ] || rm -rf "$VENV"  # a half-built one
    if [ ! -x "$VENV/bin/python" ]; then
      nonlocalnet_log "creating $VENV with $("$NONLOCALNET_PYTHON" --version)"
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
    case ",$extras," in *,bench,*)  # peers whose declared dependencies the tests do not need (see the file)
      nonlocalnet_pip install --no-deps -r "$NONLOCALNET_ROOT/requirements/peers-no-deps.txt"
      # torchcodec is built against one torch release: 0.N for 2.N (its own compatibility table)
      local minor
      minor="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split(".")[1])')"
      nonlocalnet_pip install --no-deps "torchcodec==0.$minor.*" \
        || nonlocalnet_log "no torchcodec 0.$minor for torch 2.$minor on the registry: the torchcodec tests skip" ;;
    esac
    "$VENV/bin/python" -c "import nonlocalnet, torch, torchvision.ops" || return 1  # loudly, if it did not work
    echo "$key" > "$stamp"
    if [ "$kind" != default ]; then  # the new one works: the ones for older requirements can go
      local old
      for old in "$envs/$kind-"*; do [ "$old" = "$VENV" ] || rm -rf "$old"; done
    fi
  elif [ "$kind" != default ]; then
    nonlocalnet_point_at_checkout "$envs"
  fi
  nonlocalnet_log "$kind environment: $("$VENV/bin/python" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")')"
}

# a cached environment serves many checkouts: its editable nonlocalnet must be this one (re-installed if not)
nonlocalnet_point_at_checkout() {
  local here
  here="$(cd / && "$VENV/bin/python" -c 'import nonlocalnet, os; print(os.path.dirname(os.path.dirname(nonlocalnet.__file__)))' 2>/dev/null || true)"
  if [ "$here" != "$NONLOCALNET_ROOT" ]; then
    if [ -z "${NONLOCALNET_LOCK:-}" ]; then mkdir -p "$1"; exec {NONLOCALNET_LOCK}>"$1/.lock"; flock "$NONLOCALNET_LOCK"; fi
    nonlocalnet_pip install --no-deps -e "$NONLOCALNET_ROOT"
  fi
}
