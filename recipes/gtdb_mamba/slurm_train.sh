#!/bin/bash
# Multi-node training under SLURM: one task per GPU, `srun` starts them, biorecipes_shared reads SLURM_PROCID /
# SLURM_NTASKS / SLURM_JOB_NODELIST for the rendezvous. Submit from the recipe folder:
#   GTDB=/data/gtdb/release220 RELEASE=r220 sbatch slurm_train.sh [hydra overrides]
# Requeued or pre-empted jobs resume from the newest checkpoint in run_dir (SIGUSR1 arrives 5 min before the end).
#SBATCH --job-name=gtdb_mamba
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

: "${GTDB:?set GTDB to the folder holding gtdb_genomes_reps_rXXX/ and the metadata TSVs}"
: "${RELEASE:?set RELEASE, e.g. r220}"
RUN_DIR="${RUN_DIR:-runs/gtdb_${RELEASE}}"
# The genome index is memory-mapped by every task: node-local disk keeps that off the shared filesystem.
CACHE_DIR="${CACHE_DIR:-${TMPDIR:-/tmp}/gtdb_mamba_cache}"

srun --kill-on-bad-exit=1 python train.py \
  "data.genomes_root=${GTDB}/gtdb_genomes_reps_${RELEASE}/database" \
  "data.metadata_files=[${GTDB}/bac120_metadata_${RELEASE}.tsv,${GTDB}/ar53_metadata_${RELEASE}.tsv]" \
  "data.cache_dir=${CACHE_DIR}" \
  "data.num_workers=$((SLURM_CPUS_PER_TASK - 2))" \
  "run_dir=${RUN_DIR}" \
  "$@"
