#!/usr/bin/env bash
# What a GPU can tell about nonlocalnet, in one run of at most 8 minutes on one CUDA device (see benchmarks/gpu.py):
#   bash benchmarks/gpu.sh                 # results in gpu-results/gpu.md (+ each step's log and JSON)
#   bash benchmarks/gpu.sh --out DIR
#   bash benchmarks/gpu.sh --dry-run       # the same steps on the CPU at tiny sizes, no CUDA call (CI runs it)
# It needs only the repository. The interpreter: NONLOCALNET_PYTHON if set; else a python3 whose torch sees a
# CUDA device (a GPU machine's own torch, used as it is); else the project's environment (nox's `tests` session's,
# built through scripts/nox.sh, which installs torch from the registry). What nonlocalnet needs beyond torch is
# installed where missing, from the registry; the peers (mmcv-lite, mmengine, pytorchvideo) are tried the same way,
# and a peer that cannot be installed is reported as unavailable in the tables rather than stopping the run. On a
# machine without network, NONLOCALNET_WHEELS names a folder of wheels of exactly what that machine lacks
# (dependencies included): they are installed as they are (no resolution, no index) into a folder put on
# PYTHONPATH, the machine's own environment left untouched.
set -euo pipefail
NONLOCALNET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# a relative wheel folder is the caller's, read before the cd below
[ -n "${NONLOCALNET_WHEELS:-}" ] && NONLOCALNET_WHEELS="$(cd "$NONLOCALNET_WHEELS" && pwd)"
cd "$NONLOCALNET_ROOT"
dry_run=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry_run=1; done

log() { echo "[gpu] $*" >&2; }

export NONLOCALNET_GPU_STARTED="${NONLOCALNET_GPU_STARTED:-$(date +%s)}"  # the 8 minutes count from here

PY="${NONLOCALNET_PYTHON:-}"
if [ -z "$PY" ] && [ "$dry_run" = 0 ] && command -v python3 >/dev/null \
   && python3 -c 'import torch, torchvision' 2>/dev/null; then
  PY="$(command -v python3)"  # a machine's own torch, used as it is (building one needs the registry)
  if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    log "using $PY (its torch sees CUDA)"
  else
    log "warning: $PY's torch sees no CUDA device; gpu.py stops with the reason"
  fi
fi
if [ -z "$PY" ]; then
  bash "$NONLOCALNET_ROOT/scripts/nox.sh" -s tests --install-only >&2
  PY="${NONLOCALNET_CACHE:-$HOME/.cache/nonlocalnet}/nox/tests/bin/python"
fi

# import name -> pip name: nonlocalnet's dependencies and the test runner, then the peers (optional)
needed=(yaml:pyyaml safetensors:safetensors tqdm:tqdm av:av matplotlib:matplotlib pycocotools:pycocotools
        tensorboard:tensorboard pytest:pytest)
peers=(timm:timm mmcv:mmcv-lite mmengine:mmengine pytorchvideo:pytorchvideo)
missing() {  # the pip names of those that are not installed (one interpreter, nothing imported: each import of a
  # torch-based package would cost seconds)
  "$PY" - "$@" <<'PYTHON'
import importlib.util, sys
for pair in sys.argv[1:]:
    module, name = pair.split(":")
    if importlib.util.find_spec(module) is None:
        print(name)
PYTHON
}
install() {  # from the registry, best effort and bounded (a machine without network must not spend minutes here)
  PIP_DISABLE_PIP_VERSION_CHECK=1 timeout 45 "$PY" -m pip install --quiet --retries 0 --timeout 5 "$@" 2>&1 \
    | tail -3 >&2 || true
}
if [ "$dry_run" = 0 ] && [ -n "${NONLOCALNET_WHEELS:-}" ]; then
  site="${TMPDIR:-/tmp}/nonlocalnet-gpu-site"
  log "installing the wheels in $NONLOCALNET_WHEELS into $site"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
    --target "$site" "$NONLOCALNET_WHEELS"/*.whl 2>&1 | tail -3 >&2 || log "warning: some wheels did not install"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$dry_run" = 0 ]; then
  mapfile -t want < <(missing "${needed[@]}")
  if [ "${#want[@]}" -gt 0 ]; then log "installing ${want[*]}"; install "${want[@]}"; fi
  mapfile -t want < <(missing "${peers[@]}")
  if [ "${#want[@]}" -gt 0 ]; then log "installing the peers ${want[*]}"; install "${want[@]}"; fi
  mapfile -t still < <(missing "${needed[@]}")
  [ "${#still[@]}" -eq 0 ] || log "still missing: ${still[*]} (the steps that need them will say so)"
fi

export PYTHONPATH="$NONLOCALNET_ROOT${PYTHONPATH:+:$PYTHONPATH}"  # nonlocalnet and benchmarks from this checkout
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu "$@"
