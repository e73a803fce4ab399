#!/usr/bin/env bash
# Out-of-the-box run on the bundled Arabidopsis sample (about 2-3 minutes on 2 idle CPU cores): a small model, 2 epochs,
# loss printed every step. Outputs in outputs/sample_<time>/ (or OUT=DIR): checkpoints/, final_model/, metrics.jsonl,
# loss_curve.png, run_finished.json, dna_model/model_epoch_N.pt and logs/training_<time>.log.
# Running it again with the same OUT resumes an interrupted run, or says the run is finished and exits 0.
set -euo pipefail
cd "$(dirname "$0")"
out=${OUT:-outputs/sample_$(date +%Y%m%d_%H%M%S)}
python train.py \
  --data_dir sample_data \
  --species_distribution arabidopsis_thaliana=1.0,arabidopsis_lyrata=0.8,arabidopsis_arenosa=0.6 \
  --output_dir "$out" \
  --d_model 128 --n_heads 4 --n_layers 2 --dropout 0.0 \
  --batch_size 16 --accumulation_steps 1 --context_size 64 \
  --learning_rate 2e-3 --warmup_steps 20 --n_epochs 2 --steps_per_epoch 100 \
  --global_context 20000 --memory_normalize_every 50 "$@"
echo "outputs in $out (loss curve: $out/loss_curve.png)"
