#!/usr/bin/env bash
# Several 8xGPU nodes, one JAX process per node. Submit with: sbatch --nodes=N launch/slurm.sh [train flags]
#SBATCH --job-name=jaxchat
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
# Every process reads SLURM_NTASKS / SLURM_PROCID / SLURM_STEP_NODELIST through jax.distributed.initialize(),
# builds the same global mesh over all N x 8 GPUs and reads its own share of the data. Data, tokenizer and the
# eval bundle must already be in $JAXCHAT_BASE_DIR on every node (a shared filesystem is simplest).
# Resume after a preemption by resubmitting with --resume-from-step=last.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
srun --kill-on-bad-exit=1 python -m jaxchat.train --config=configs/d26.py "$@"
