#!/usr/bin/env bash
# One SLURM job = one segment of a training run; the same script serves the first run and every requeue.
#   sbatch slurm_train.sh --base_dir data/encoded --save_name omni_base --n_layer 12 ... (train_encoder.py flags)
# srun starts one python process per GPU (no torchrun): biorecipes_shared reads SLURM_PROCID/SLURM_NTASKS and the
# node list. --signal=USR1@120 sends SIGUSR1 to those processes 2 minutes before the time limit (or on
# preemption): every rank saves a checkpoint and exits 0, so the job ends with exit code 0; the requeued job
# (--requeue, or sbatch again) resumes from that checkpoint. A finished run exits 0 at once.
#SBATCH --job-name=omnibiote
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=omnibiote-%j.log
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-8}"
srun --kill-on-bad-exit=1 python train_encoder.py "$@"
