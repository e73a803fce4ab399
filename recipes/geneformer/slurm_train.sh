#!/usr/bin/env bash
# Geneformer on SLURM, one python process per GPU started by srun (no torchrun launcher), preemption-safe:
#   OUTPUT_DIR=/scratch/$USER/gf106m sbatch slurm_train.sh --config-name 106m data.train_path=... data.vocab_path=...
# --signal=USR1@120 sends SIGUSR1 to every task 120 s before the time limit (and SLURM sends SIGTERM on
# preemption): each rank saves a checkpoint and exits 0, so the job ends as COMPLETED, not FAILED. A torchrun launcher
# that received the signal would exit 1 even after every worker saved. If the run is not finished yet the job
# requeues itself; the same command then resumes from the newest valid checkpoint (the default,
# training.resume=true). A finished run exits 0 at once without training.
#SBATCH --job-name=geneformer
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-geneformer-%j.out
set -euo pipefail
: "${OUTPUT_DIR:?set OUTPUT_DIR to the run folder (checkpoints, final model and metrics go there)}"
cd "${SLURM_SUBMIT_DIR:-.}"
# biorecipes_shared.distributed reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the first host of the node list.
srun --kill-on-bad-exit=1 python train.py training.output_dir="$OUTPUT_DIR" "$@"
if [ ! -f "$OUTPUT_DIR/run_finished.json" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "run not finished (preempted or out of time): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
