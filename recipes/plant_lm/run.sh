#!/usr/bin/env bash
# Multi-process training with torchrun on one node.
#   WORLD_SIZE=4 DATA_DIR=/data/plants bash run.sh --batch_size 16 --n_epochs 10
# WORLD_SIZE: processes (GPUs) on this node (default: all visible GPUs, else 1). DATA_DIR: <species>/*.fa[.gz]
# folders (default ./data). WANDB_MODE: passed to wandb (default offline); add --wandb true to log there.
# Extra arguments go to train.py. Several nodes: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${WORLD_SIZE:-}" ]; then
  WORLD_SIZE=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
export WANDB_MODE=${WANDB_MODE:-offline}
exec torchrun \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$WORLD_SIZE" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  train.py --data_dir "${DATA_DIR:-data}" "$@"
