#!/usr/bin/env bash
# Out-of-the-box run on the bundled sample (2-4 minutes on 2 CPU cores): a 0.5M-parameter OmniBioTA on real
# DNA (GenBank) and protein (FASTA) tokens; the validation loss falls from ln(512) = 6.24 to about 5.0.
# Outputs: runs/sample_<time>/ (metrics.jsonl, log_file.txt, loss_curve.png, checkpoints/, final_model/,
# run_finished.json). Rerunning with the same --save_name resumes (or, once finished, says so and exits 0).
set -euo pipefail
cd "$(dirname "$0")"
# the settings are configs/sample.yaml; --save_name gives each run its own folder runs/sample_<time>
python train_encoder.py --config configs/sample.yaml --save_name "sample_$(date +%Y%m%d_%H%M%S)" "$@"
