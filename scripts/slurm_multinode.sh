#!/bin/bash
# Multi-node training under Slurm: one `accelerate launch` per node, DeepSpeed ZeRO across all GPUs.
#
#   sbatch --nodes=4 scripts/slurm_multinode.sh recipes/qwen2/72b.yaml [KEY.PATH=VALUE ...]
#
# Environment knobs (export before sbatch, or edit the defaults below):
#   ACCEL_CONFIG   accelerate config (default recipes/accelerate/zero3.yaml; zero3_offload.yaml for tight memory)
#   GPUS_PER_NODE  GPUs per node (default 8)
#   VENV           virtual environment to activate (default .venv)
# Stages that finished (manifest.json present) are skipped, so re-submitting the same command resumes;
# the sft / dpo stages also resume from their newest checkpoint in OUTPUT_DIR/NAME/checkpoints/.
# OUTPUT_DIR must be on a file system that every node sees.
#SBATCH --job-name=qwen2-posttrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
RECIPE=${1:?usage: sbatch --nodes=N scripts/slurm_multinode.sh RECIPE.yaml [KEY=VALUE ...]}
shift
ACCEL_CONFIG=${ACCEL_CONFIG:-recipes/accelerate/zero3.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
VENV=${VENV:-.venv}

cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
mkdir -p logs
# shellcheck disable=SC1091
source "$VENV/bin/activate"

NNODES=${SLURM_NNODES:-1}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-29500}
export NCCL_ASYNC_ERROR_HANDLING=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}

# One srun task per node; each starts GPUS_PER_NODE workers with its own machine rank.
srun --kill-on-bad-exit=1 bash -c "
  accelerate launch \
    --config_file '$ACCEL_CONFIG' \
    --num_machines $NNODES \
    --num_processes $((NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $HEAD \
    --main_process_port $PORT \
    --rdzv_backend static \
    -m posttrain.cli run '$RECIPE' $*
"
