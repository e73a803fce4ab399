#!/usr/bin/env bash
# Out-of-the-box run on the bundled Arabidopsis sample (about 2-3 minutes on 2 idle CPU cores): a small model, 2 epochs,
# loss printed every step. Outputs in outputs/sample_<time>/ (or OUT=DIR): checkpoints/, final_model/, metrics.jsonl,
# loss_curve.png, run_finished.json, dna_model/model_epoch_N.pt and logs/training_<time>.log.
# Running it again with the same OUT resumes an interrupted run, or says the run is finished and exits 0.
set -euo pipefail
cd "$(dirname "$0")"
out=${OUT:-outputs/sample_$(date +%Y%m%d_%H%M%S)}
# The settings are configs/sample.yaml; extra arguments (--field value or field=value) override them.
python train.py --config configs/sample.yaml --output_dir "$out" "$@"
echo "outputs in $out (loss curve: $out/loss_curve.png)"
