#!/bin/bash
# Multi-node training under SLURM: one task per GPU, `srun` starts them, biorecipes_shared reads SLURM_PROCID /
# SLURM_NTASKS / SLURM_JOB_NODELIST for the rendezvous. Submit from the recipe folder:
#   GTDB=/data/gtdb/release220 RELEASE=r220 sbatch slurm_train.sh [hydra overrides]
# Preemption: SLURM sends SIGUSR1 to every task 120 s before the time limit (`--signal=USR1@120`, no `B:` so the
# training processes get it, not only this script); each saves a checkpoint and exits 0, so the job ends with exit 0.
# `sbatch` the same script again (or let --requeue do it): it resumes from the newest valid checkpoint in output_dir,
# and a finished run exits 0 at once without training. No torchrun here: a torchrun launcher that receives the
# signal exits 1 even when every worker saved cleanly.
#SBATCH --job-name=gtdb_mamba
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@120
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
  "output_dir=${RUN_DIR}" \
  "$@"
