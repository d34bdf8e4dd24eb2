#!/usr/bin/env bash
# Several 8xGPU nodes, one JAX process per node. Submit with: sbatch --nodes=N launch/slurm.sh [train flags]
# See launch/multihost.md (variables read, resuming, reading the logs).
#SBATCH --job-name=jaxchat
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
# jaxchat.train reads SLURM_NTASKS (process count) and SLURM_PROCID (process id); the coordinator is process 0's node.
# Each process sees all 8 GPUs of its node (JAX's own SLURM detection would give it one), every process builds the
# same global mesh over all N x 8 GPUs and reads its own share of the data. Data, tokenizer and the eval bundle must
# already be in $JAXCHAT_BASE_DIR, which must be one shared filesystem for all nodes (checkpoints are written
# cooperatively into it). Resume after a failure or preemption by resubmitting with --resume-from-step=last.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
export JAX_COORDINATOR_ADDRESS="${JAX_COORDINATOR_ADDRESS:-${head_node}:$((SLURM_JOB_ID % 4096 + 61440))}"
# --label prefixes every line with its task (= process) id; --kill-on-bad-exit ends the step when one process fails.
srun --label --kill-on-bad-exit=1 python -m jaxchat.train --config=configs/d26.py "$@"
