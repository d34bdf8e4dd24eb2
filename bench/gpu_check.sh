#!/usr/bin/env bash
# The GPU check in one command, from the repository root of a GPU machine without network (docs/performance.md,
# "GPU check"): installs jaxchat's missing dependencies from .gpu_check/wheels (bench/prepare_gpu_check.sh) and
# jaxchat itself, then runs bench/gpu_check.py: jaxchat's train step (d12, d24; bf16, --fp8) and nanochat's
# (.gpu_check/nanochat-348fbb3, or $NANOCHAT_DIR / --nanochat-dir=) on this GPU, a table and one JSON line.
#
#   bash bench/gpu_check.sh               # about 7 minutes on one H100 (--budget-s=430 for the measurements)
#   bash bench/gpu_check.sh --dry-run     # the same path on CPU at a tiny shape, nothing installed
#
# $PYTHON: the interpreter (default python3, on the GPU machine the one with jax and torch).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.gpu_check/wheels}
if [[ " $* " != *" --dry-run "* ]]; then
  t0=$SECONDS
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" "$WHEELS"/*.whl \
      || echo "gpu_check: installing $WHEELS failed; going on with what is installed"
  else
    echo "gpu_check: no wheels in $WHEELS (bash bench/prepare_gpu_check.sh); going on with what is installed"
  fi
  # jaxchat itself, without its dependencies and without fetching a build backend (setuptools is installed)
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "gpu_check: pip install -e . failed; jaxchat is imported from this checkout (PYTHONPATH)"
  echo "gpu_check: installs took $((SECONDS - t0)) s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -u bench/gpu_check.py "$@"
