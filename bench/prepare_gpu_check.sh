#!/usr/bin/env bash
# Prepares what bench/gpu_check.sh needs on a GPU machine that has no network, in .gpu_check/ (git-ignored):
#   .gpu_check/wheels/               jaxchat's dependencies that the machine's image lacks, as wheels for CPython 3.12
#                                    on x86-64 Linux (the image has jax 0.11.2 with the CUDA 13 plugin, flax, optax,
#                                    orbax-checkpoint, chex, tiktoken, pyarrow, tensorboard, absl-py, PyYAML, tqdm,
#                                    torch 2.11; docs/performance.md, "GPU check")
#   .gpu_check/nanochat-348fbb3/     nanochat's source at the commit of jaxchat's default recipe
#   .gpu_check/nanochat-92d63d4/     ... and at the record's
# Then carry .gpu_check with the repository (what travels: the tracked files and .gpu_check, 64 MiB in all; this
# prints the total).
#
#   bash bench/prepare_gpu_check.sh [--nanochat-git=DIR]   # DIR: a nanochat clone (or bare repository) holding both
#                                                           # commits; default: a fresh clone of nanochat's GitHub
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpu_check
NANOCHAT_GIT=""
for arg in "$@"; do
  case "$arg" in
    --nanochat-git=*) NANOCHAT_GIT="${arg#*=}" ;;
    *) echo "error: unknown argument $arg (only --nanochat-git=DIR)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

# Pinned to the versions jaxchat is tested with (pyproject.toml's minimums). Left out: wandb and its dependencies
# (about 25 MB of wheels, over what travels with the repository; gpu_check logs nowhere and jaxchat imports wandb only
# for --wandb runs). grain's dependencies missing from the image: array-record, portpicker.
WHEELS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 rustbpe==0.1.0
        tensorboardX==2.6.5)
rm -rf "$OUT/wheels"
mkdir -p "$OUT/wheels"
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --implementation cp --no-deps \
  -d "$OUT/wheels" "${WHEELS[@]}"

COMMITS=(348fbb3 92d63d4)
if [ -z "$NANOCHAT_GIT" ]; then
  NANOCHAT_GIT=$(mktemp -d)/nanochat
  git clone -q --bare https://github.com/karpathy/nanochat "$NANOCHAT_GIT"
fi
for c in "${COMMITS[@]}"; do
  rm -rf "$OUT/nanochat-$c"
  mkdir -p "$OUT/nanochat-$c"
  # the source only: the notebooks and images under dev/ are not needed to build the model and optimizer
  GD="$NANOCHAT_GIT"; [ -d "$GD/.git" ] && GD="$GD/.git"  # a clone or a bare repository
  git --git-dir="$GD" archive "$c" nanochat scripts pyproject.toml | tar -x -C "$OUT/nanochat-$c"
  git --git-dir="$GD" rev-parse "$c^{commit}" > "$OUT/nanochat-$c/COMMIT"
done

mib() { du -sb "$@" | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
tracked=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {printf "%.1f", s / 1048576}')
echo "wheels: $(mib "$OUT/wheels") MiB ($(ls "$OUT/wheels" | wc -l) files); nanochat checkouts: $(mib "$OUT"/nanochat-*) MiB"
echo "what travels: tracked files $tracked MiB + $OUT $(mib "$OUT") MiB (limit 64 MiB)"
