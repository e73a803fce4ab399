#!/usr/bin/env bash
# Out-of-the-box run (`make train recipe=geneformer`): the tiny l0_sanity model on the bundled 500 real PBMC cells,
# 400 steps, about 2 minutes on 2 CPU cores. The loss starts at ln(767) = 6.64 and falls as the model learns which
# genes are co-expressed. Each run writes a fresh folder under runs/; extra arguments are passed on as overrides.
# `make train recipe=geneformer config=l0_sanity_v2` (or config=l0_sanity_v2 bash train_sample.sh) trains the same
# tiny model in the Geneformer V2 layout (<cls> genes... <eos>, GELU) on the V2 tokenization of the sample.
set -euo pipefail
cd "$(dirname "$0")"
run_dir="runs/train_sample_$(date +%Y%m%d_%H%M%S)"
python train.py --config-name "${config:-l0_sanity}" \
    training.max_steps=400 training.log_every_n_steps=20 training.save_every=200 \
    training.output_dir="$run_dir" "$@"
echo "metrics: $run_dir/metrics.jsonl  loss curve: $run_dir/loss_curve.png  model: $run_dir/final_model"
