#!/usr/bin/env bash
# Out-of-the-box run on the bundled sample (2-4 minutes on 2 CPU cores): a 0.5M-parameter OmniBioTA on real
# DNA (GenBank) and protein (FASTA) tokens; the validation loss falls from ln(512) = 6.24 to about 5.0.
# Outputs: runs/sample_<time>/ (metrics.jsonl, log_file.txt, loss_curve.png, checkpoints/, final_model/,
# run_finished.json). Rerunning with the same --save_name resumes (or, once finished, says so and exits 0).
set -euo pipefail
cd "$(dirname "$0")"
python train_encoder.py --base_dir sample_data/encoded --out_dir runs --save_name "sample_$(date +%Y%m%d_%H%M%S)" \
    --n_layer 2 --n_head 4 --n_embd 128 --ctx_len 256 --mini_batch_size 8 --batch_size 16 \
    --lr 0.08 --token_budget 200000 --test_freq 40000 --save_freq 100000 --log_freq 5 \
    --source_weights genbank=0.5,uniprot=0.5 "$@"
