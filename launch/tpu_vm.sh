#!/usr/bin/env bash
# A Cloud TPU VM slice (v5e-8, v6e-8, v5p-8, or a slice over several hosts), driven from your machine with gcloud:
# the same command on every host of the slice. See README.md "TPUs" for which depth fits which slice.
#
#   TPU=my-slice ZONE=my-zone launch/tpu_vm.sh setup                          # clone and install; the data
#   TPU=my-slice ZONE=my-zone launch/tpu_vm.sh train --depth=24 --fsdp=8 --device-batch-size=auto --run=d24-v6e
#
# Every host starts `python -m jaxchat.train` with the same flags and no process flags: on a TPU VM jaxchat calls
# jax.distributed.initialize() without arguments, and JAX finds the slice's hosts, this host's id and the
# coordinator (worker 0) in the TPU VM's metadata (a one-host slice is one process). $JAXCHAT_BASE_DIR (data,
# tokenizer, checkpoints) must be one filesystem that every host mounts when the slice has several hosts (an NFS
# share, for instance): checkpoints are written cooperatively into it. Resume after a failure or preemption by
# running `train` again with --resume-from-step=last.
set -euo pipefail
: "${TPU:?set TPU to the name of the TPU VM (gcloud compute tpus tpu-vm list)}"
: "${ZONE:?set ZONE to its zone}"
REPO="${REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}"  # what the hosts clone
DIR="${DIR:-jaxchat}"  # the checkout on each host, relative to the home directory
BASE="${JAXCHAT_BASE_DIR:-}"  # passed on to every host when set here
on_hosts() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker="$1" --command="$2"; }
env_prefix="${BASE:+JAXCHAT_BASE_DIR=$(printf %q "$BASE") }"

case "${1:-}" in
  setup)
    : "${REPO:?set REPO to a git URL of jaxchat that the hosts can clone}"
    # every host: jaxchat with the tpu extra (libtpu, as `jax[tpu]` pins it to the installed jax); worker 0: the data
    # shards and the tokenizer into the (shared) base directory
    on_hosts all "set -e; [ -d $DIR ] || git clone $(printf %q "$REPO") $DIR; cd $DIR && python3 -m venv .venv \
      && .venv/bin/pip install -q -e '.[tpu]'"
    on_hosts 0 "set -e; cd $DIR && ${env_prefix}.venv/bin/python -m jaxchat.dataset -n 240 \
      && ${env_prefix}.venv/bin/python -m jaxchat.tok_train"
    ;;
  train)
    shift
    on_hosts all "cd $DIR && ${env_prefix}.venv/bin/python -m jaxchat.train $(printf '%q ' "$@")"
    ;;
  *)
    echo "usage: TPU=name ZONE=zone $0 setup | train [python -m jaxchat.train flags]" >&2
    exit 2
    ;;
esac
