#!/usr/bin/env bash
# Out-of-the-box run on the bundled Arabidopsis sample (about 2-3 minutes on 2 idle CPU cores): a small model, 2 epochs,
# loss printed every step, checkpoints in outputs/sample_<time>/dna_model/, logs in outputs/sample_<time>/logs/.
set -euo pipefail
cd "$(dirname "$0")"
out=outputs/sample_$(date +%Y%m%d_%H%M%S)
python train.py \
  --data_dir sample_data \
  --species_distribution arabidopsis_thaliana=1.0,arabidopsis_lyrata=0.8,arabidopsis_arenosa=0.6 \
  --output_dir "$out" --resume none \
  --d_model 128 --n_heads 4 --n_layers 2 --dropout 0.0 \
  --batch_size 16 --accumulation_steps 1 --context_size 64 \
  --learning_rate 2e-3 --warmup_steps 20 --n_epochs 2 --steps_per_epoch 100 \
  --global_context 20000 --memory_normalize_every 50 "$@"
echo "outputs in $out (loss curve: $out/logs/loss_curve.png)"
